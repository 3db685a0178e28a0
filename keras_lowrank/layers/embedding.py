"""`LowRankEmbedding`: a `keras.layers.Embedding` with low-rank adapters."""

import keras
from keras import ops

from keras_lowrank import adapter_math
from keras_lowrank import keras_private
from keras_lowrank.layers import quantized
from keras_lowrank.layers.base import LowRankLayer
from keras_lowrank.layers.layout import KernelLayout
from keras_lowrank.spec import where


@keras.saving.register_keras_serializable(package="keras_lowrank")
class LowRankEmbedding(LowRankLayer, keras.layers.Embedding):
    """An Embedding layer whose frozen table `E` (vocab×dim) gets `s·A·B`.

    `y = E[ids] + s·A[ids]·B`, with `A` (vocab×r) and `B` (r×dim). Only the
    looked-up rows of `A` are touched, so no vocab×dim update is formed.

    Initialisation follows PEFT's embedding LoRA: with `init="default"`, `A`
    starts at zero and `B` is standard normal (the roles are swapped relative
    to Dense because a he-uniform `A` over a 30k-row vocabulary would be tiny
    and learn slowly); with `init="gaussian"`, `A` is zero and `B` normal with
    std `1/r`. Either way the layer starts equal to the plain Embedding.
    Dropout does not apply (the input is token ids), so `dropout` must be 0.

    DoRA follows PEFT's embedding DoRA: one magnitude per embedding
    dimension, the norm taken over the vocabulary axis (`‖E_:,j + s·(AB)_:,j‖`),
    and `y = (m/‖·‖)·(E[ids] + s·A[ids]·B)`. The norm reads the whole table
    each step (`AᵀE`, r×dim), but no vocab×dim matrix is formed.

    Args:
        input_dim: vocabulary size, as for `keras.layers.Embedding`.
        output_dim: embedding size.
        adapter: the adapter's options as one `AdapterSpec`; or give
            them as the keywords `rank`, `alpha`, `scaling`, `dropout`,
            `method`, `init`, `bias` (not both; see `LowRankDense`).
        adapter_name: name of the adapter created in `build`.
        adapters, active_adapters, merged_adapters: the saved adapter state.
        **kwargs: every other `keras.layers.Embedding` argument.

    Input shape:
        integer ids, `(batch_size, ...)`.

    Output shape:
        `(batch_size, ..., output_dim)`.

    Example:

    >>> import numpy as np
    >>> layer = LowRankEmbedding(100, 16, rank=4)
    >>> tuple(layer(np.array([[1, 2, 3]])).shape)
    (1, 3, 16)
    """

    base_class = keras.layers.Embedding
    # Can hold token-rows adapters (`AdapterSpec.for_tokens`).
    takes_token_rows = True

    def __init__(self, input_dim, output_dim, adapter=None, **kwargs):
        options, state = self.split_adapter_options(kwargs)
        super().__init__(input_dim, output_dim, **kwargs)
        self._init_adapters(adapter, options, state)

    def build(self, input_shape=None):
        if self.built:
            return
        super().build(input_shape)
        self._build_adapters()

    @classmethod
    def check_spec(cls, spec, path):
        if spec.dropout:
            raise ValueError(
                f"{where(path)}: dropout={spec.dropout} cannot apply to an "
                "Embedding, whose input is token ids. Use dropout=0.0 for "
                "this layer (exclude it, or adapt it in a separate call)."
            )

    @classmethod
    def kernel_layout(cls, layer):
        kernel = keras_private.kernel_of(layer)
        shape = quantized.logical_kernel_shape(layer, kernel)
        return KernelLayout(shape, (), (0,), (1,))

    def _data_free_factors(self, spec, layout, seed):
        if spec.is_token_rows:
            return adapter_math.token_row_factors(
                spec.token_ids, *layout.kernel_shape
            )
        stddev = 1.0 if spec.init == "default" else 1.0 / spec.rank
        a = ops.zeros(layout.a_shape(spec.rank), "float32")
        b = keras.random.normal(
            layout.b_shape(spec.rank), stddev=stddev, dtype="float32", seed=seed
        )
        return a, b

    def _ids(self, inputs):
        if keras.backend.standardize_dtype(inputs.dtype) not in (
            "int32",
            "int64",
        ):
            inputs = ops.cast(inputs, "int32")
        return inputs

    def _base_output(self, inputs):
        if self.quantization_mode is not None:
            return quantized.base_output(self, inputs)
        outputs = ops.take(keras_private.kernel_of(self), self._ids(inputs), axis=0)
        return ops.cast(outputs, self.compute_dtype)

    def _finish_output(self, outputs):
        return outputs

    def _contract_a(self, x, a):
        return ops.take(a, self._ids(x), axis=0)

    def _contract_b(self, h, b):
        return ops.matmul(h, b)

    def _units_to_output(self, units, ndim):
        return units
