"""`LowRankDense`: a `keras.layers.Dense` with low-rank adapters."""

import keras
from keras import ops

from keras_lowrank import adapter_math
from keras_lowrank import keras_private
from keras_lowrank.layers import quantized
from keras_lowrank.layers.base import LowRankLayer
from keras_lowrank.layers.layout import KernelLayout


@keras.saving.register_keras_serializable(package="keras_lowrank")
class LowRankDense(LowRankLayer, keras.layers.Dense):
    """A Dense layer whose frozen kernel `W` (d×k) is adapted by `s·A·B`.

    `y = activation(x·W + s·(dropout(x)·A)·B + bias)`, with `A` (d×r),
    `B` (r×k) and `s = alpha/r` (or `alpha/sqrt(r)` with `scaling="rslora"`).
    The product is taken as `(x·A)·B`, so training never forms a d×k update.
    `B` starts at zero: the layer starts equal to the plain Dense layer.

    Args:
        units: output size, as for `keras.layers.Dense`.
        adapter: the adapter's options as one `AdapterSpec`
            (`adapter=AdapterSpec(rank=8, alpha=16)`); or give them as the
            keywords below (not both).
        rank: rank `r` of the update (`1 <= r <= min(d, k)`; default 8).
        alpha: scaling numerator; defaults to `rank`.
        scaling: `"standard"` (`alpha/r`) or `"rslora"` (`alpha/sqrt(r)`).
        dropout: dropout rate on the adapter's input.
        method: `"lora"` or `"dora"`.
        init: `"default"`, `"gaussian"`, `"pissa"` or `"olora"`.
        bias: `"none"` (bias frozen) or `"all"` (bias trains too).
        adapter_name: name of the adapter created in `build`.
        adapters, active_adapters, merged_adapters: the full adapter state, as
            written by `get_config` (used when loading; overrides the options
            above).
        **kwargs: every other `keras.layers.Dense` argument.

    Input shape:
        `(batch_size, ..., d)`.

    Output shape:
        `(batch_size, ..., units)`.

    Example:

    >>> import numpy as np
    >>> layer = LowRankDense(8, rank=2, alpha=4)
    >>> y = layer(np.ones((3, 5), "float32"))
    >>> tuple(y.shape), [w.name for w in layer.trainable_weights]
    ((3, 8), ['lowrank_A_default', 'lowrank_B_default'])
    """

    base_class = keras.layers.Dense

    def __init__(self, units, adapter=None, **kwargs):
        options, state = self.split_adapter_options(kwargs)
        super().__init__(units, **kwargs)
        self._init_adapters(adapter, options, state)

    _folds_in_inference = True

    def build(self, input_shape):
        super().build(input_shape)
        self._build_adapters()

    @classmethod
    def kernel_layout(cls, layer):
        kernel = keras_private.kernel_of(layer)
        shape = quantized.logical_kernel_shape(layer, kernel)
        return KernelLayout(shape, (), (0,), (1,))

    def _base_output(self, inputs):
        if self.quantization_mode is not None:
            return quantized.base_output(self, inputs)
        return ops.matmul(inputs, keras_private.kernel_of(self))

    def _kernel_output(self, inputs, kernel):
        return ops.matmul(inputs, kernel)

    def _finish_output(self, outputs):
        if self.bias is not None:
            outputs = ops.add(outputs, self.bias)
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs

    def _contract_a(self, x, a):
        return adapter_math.flat_matmul(x, a)

    def _contract_b(self, h, b):
        return adapter_math.flat_matmul(h, b)

    def _rows_contraction(self):
        return 1

    def _units_to_output(self, units, ndim):
        return units
