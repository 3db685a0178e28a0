"""`LowRankConv1D/2D/3D`: convolutions with low-rank adapters."""

import keras
from keras import ops

from keras_lowrank import keras_private
from keras_lowrank.layers.base import LowRankLayer
from keras_lowrank.layers.layout import KernelLayout
from keras_lowrank.spec import where


class _LowRankConv(LowRankLayer):
    """Shared geometry of the convolution adapters.

    The kernel `(*window, in_channels, filters)` is a matrix with
    `d = prod(window)·in_channels` inputs and `k = filters` outputs. `A` is a
    convolution kernel `(*window, in_channels, r)` applied with the layer's
    own strides, padding and dilation; `B` `(r, filters)` is a 1×1 mixing of
    the r channels. This is PEFT's Conv LoRA: a true rank-r update of the
    kernel's matrix form.
    """

    def __init__(self, filters, kernel_size, adapter=None, **kwargs):
        options, state = self.split_adapter_options(kwargs)
        super().__init__(filters, kernel_size, **kwargs)
        self._init_adapters(adapter, options, state)

    def build(self, input_shape):
        super().build(input_shape)
        self._build_adapters()

    def call(self, inputs, training=None):
        if self.padding == "causal":
            # Conv1D implements "causal" by left-padding the input and then
            # convolving with "valid" padding; both paths share the padding.
            inputs = ops.pad(inputs, keras_private.causal_padding(self))
        return super().call(inputs, training=training)

    @classmethod
    def _check_geometry(cls, layer, path):
        if layer.groups != 1:
            raise ValueError(
                f"{where(path)}: grouped convolutions (groups={layer.groups}) "
                "have a block-diagonal kernel without a single low-rank "
                "update. Exclude this layer, or use groups=1."
            )

    def _base_variables(self):
        kernel = keras_private.kernel_of(self)
        return [kernel] + ([self.bias] if self.use_bias else [])

    def _save_base_variables(self, store):
        # keras's convolutions save *all* their variables by index, which
        # would include the adapters; write what a plain Conv writes.
        for i, variable in enumerate(self._base_variables()):
            store[str(i)] = variable

    def _load_base_variables(self, store):
        base = self._base_variables()
        numbered = [key for key in store.keys() if key.isdigit()]
        if len(numbered) != len(base):
            raise ValueError(
                f"{where(self.path or self.name)}: the weights file holds "
                f"{len(numbered)} base variables, this layer has {len(base)} "
                "(kernel and bias). Load it into a layer with the same "
                "`use_bias`."
            )
        for i, variable in enumerate(base):
            variable.assign(store[str(i)])

    def _conv(self, inputs, kernel):
        return ops.conv(
            inputs,
            kernel,
            strides=list(self.strides),
            padding="valid" if self.padding == "causal" else self.padding,
            dilation_rate=self.dilation_rate,
            data_format=self.data_format,
        )

    @classmethod
    def kernel_layout(cls, layer):
        shape = keras_private.kernel_of(layer).shape
        ndim = len(shape)
        return KernelLayout(shape, (), tuple(range(ndim - 1)), (ndim - 1,))

    def _base_output(self, inputs):
        return self._conv(inputs, keras_private.kernel_of(self))

    def _finish_output(self, outputs):
        if self.use_bias:
            if self.data_format == "channels_last":
                shape = (1,) * (self.rank + 1) + (self.filters,)
            else:
                shape = (1, self.filters) + (1,) * self.rank
            outputs = ops.add(outputs, ops.reshape(self.bias, shape))
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs

    def _contract_a(self, x, a):
        return self._conv(x, a)

    def _contract_b(self, h, b):
        if self.data_format == "channels_last":
            return ops.matmul(h, b)
        return ops.moveaxis(ops.matmul(ops.moveaxis(h, 1, -1), b), -1, 1)

    def _units_to_output(self, units, ndim):
        if self.data_format == "channels_last":
            return units
        return ops.reshape(units, (-1,) + (1,) * self.rank)


_CONV_DOC = """A `keras.layers.Conv{n}D` with low-rank adapters.

    `A` is a `(*kernel_size, in_channels, r)` convolution with the layer's own
    strides, padding and dilation; `B` `(r, filters)` mixes the r channels, so
    `ΔW = A·B` is a true rank-r update of the kernel's matrix form
    (`prod(kernel_size)·in_channels` × `filters`). Grouped convolutions are
    refused. DoRA, as in PEFT: one magnitude per filter, the norm taken over
    the window and the input channels.

    Args:
        filters: number of output channels, as for `keras.layers.Conv{n}D`.
        kernel_size: window size, as for `keras.layers.Conv{n}D`.
        adapter: the adapter's options as one `AdapterSpec`; or give
            them as the keywords `rank`, `alpha`, `scaling`, `dropout`,
            `method`, `init`, `bias` (not both; see `LowRankDense`).
        adapter_name: name of the adapter created in `build`.
        adapters, active_adapters, merged_adapters: the saved adapter state.
        **kwargs: every other `keras.layers.Conv{n}D` argument.

    Input shape and output shape:
        As for `keras.layers.Conv{n}D`.

    Example:

    >>> import numpy as np
    >>> layer = LowRankConv{n}D(8, 3, rank=2)
    >>> tuple(layer(np.ones((1,) + (6,) * {n} + (4,), "float32")).shape)
    {output_shape}
    >>> [tuple(w.shape) for w in layer.trainable_weights]
    [{a_shape}, (2, 8)]
    """


@keras.saving.register_keras_serializable(package="keras_lowrank")
class LowRankConv1D(_LowRankConv, keras.layers.Conv1D):
    __doc__ = _CONV_DOC.format(
        n=1, output_shape=(1, 4, 8), a_shape=(3, 4, 2)
    )
    base_class = keras.layers.Conv1D


@keras.saving.register_keras_serializable(package="keras_lowrank")
class LowRankConv2D(_LowRankConv, keras.layers.Conv2D):
    __doc__ = _CONV_DOC.format(
        n=2, output_shape=(1, 4, 4, 8), a_shape=(3, 3, 4, 2)
    )
    base_class = keras.layers.Conv2D


@keras.saving.register_keras_serializable(package="keras_lowrank")
class LowRankConv3D(_LowRankConv, keras.layers.Conv3D):
    __doc__ = _CONV_DOC.format(
        n=3, output_shape=(1, 4, 4, 4, 8), a_shape=(3, 3, 3, 4, 2)
    )
    base_class = keras.layers.Conv3D
