"""The adapter layers and the table that maps plain Keras layers to them."""

import keras

from keras_lowrank.layers.adapter_set import AdapterSet
from keras_lowrank.layers.base import LowRankLayer
from keras_lowrank.layers.conv import LowRankConv1D
from keras_lowrank.layers.conv import LowRankConv2D
from keras_lowrank.layers.conv import LowRankConv3D
from keras_lowrank.layers.dense import LowRankDense
from keras_lowrank.layers.einsum_dense import LowRankEinsumDense
from keras_lowrank.layers.embedding import LowRankEmbedding
from keras_lowrank.layers.experts import ExpertKernel
from keras_lowrank.layers.experts import LowRankExpertKernel
from keras_lowrank.layers.convert import plain_class
from keras_lowrank.layers.layout import KernelLayout
from keras_lowrank.layers.reversible_embedding import LowRankReversibleEmbedding

# Exact Keras class -> adapter class. Exact, not isinstance: a subclass of
# Dense may override `call`, and turning it into a LowRankDense would silently
# drop that behaviour.
ADAPTER_CLASSES = {
    keras.layers.Dense: LowRankDense,
    keras.layers.EinsumDense: LowRankEinsumDense,
    keras.layers.Embedding: LowRankEmbedding,
    keras.layers.Conv1D: LowRankConv1D,
    keras.layers.Conv2D: LowRankConv2D,
    keras.layers.Conv3D: LowRankConv3D,
    # An MoE expert kernel (see `experts` and `integrations.moe`).
    keras.layers.ReversibleEmbedding: LowRankReversibleEmbedding,
    ExpertKernel: LowRankExpertKernel,
}


def adapter_class_for(layer):
    """The adapter class for `layer`, or `None` if it has none."""
    if isinstance(layer, LowRankLayer):
        return type(layer)
    return ADAPTER_CLASSES.get(plain_class(type(layer)))


__all__ = [
    "ADAPTER_CLASSES",
    "AdapterSet",
    "ExpertKernel",
    "KernelLayout",
    "LowRankConv1D",
    "LowRankConv2D",
    "LowRankConv3D",
    "LowRankDense",
    "LowRankEinsumDense",
    "LowRankEmbedding",
    "LowRankExpertKernel",
    "LowRankLayer",
    "LowRankReversibleEmbedding",
    "adapter_class_for",
]
