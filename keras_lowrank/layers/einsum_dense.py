"""`LowRankEinsumDense`: a `keras.layers.EinsumDense` with low-rank adapters."""

import keras
from keras import ops

from keras_lowrank import adapter_math
from keras_lowrank import keras_private
from keras_lowrank.layers import einsum_factorization
from keras_lowrank.layers import quantized
from keras_lowrank.layers.base import LowRankLayer


@keras.saving.register_keras_serializable(package="keras_lowrank")
class LowRankEinsumDense(LowRankLayer, keras.layers.EinsumDense):
    """An EinsumDense layer with a true rank-r update of its kernel.

    The kernel's axes are split by the equation into input (contracted),
    output and batch axes (see `einsum_factorization`); `A` has shape
    `(*batch, *in, r)` and `B` `(*batch, r, *out)`. The adapter path is
    `s·einsum(einsum(dropout(x), A), B)`; no kernel-sized update is formed.
    DoRA keeps one magnitude per output unit, batch axes included (shape
    `(*batch, *out)`), the norm taken over the input (contracted) axes.

    Args:
        equation: the einsum equation, as for `keras.layers.EinsumDense`.
        output_shape: as for `keras.layers.EinsumDense`.
        adapter: the adapter's options as one `AdapterSpec`; or give
            them as the keywords `rank`, `alpha`, `scaling`, `dropout`,
            `method`, `init`, `bias` (not both; see `LowRankDense`).
        adapter_name: name of the adapter created in `build`.
        adapters, active_adapters, merged_adapters: the saved adapter state
            (used when loading).
        **kwargs: every other `keras.layers.EinsumDense` argument.

    Input shape and output shape:
        As for `keras.layers.EinsumDense`.

    Example:

    >>> import numpy as np
    >>> layer = LowRankEinsumDense("abc,cde->abde", (None, 12, 32), rank=4)
    >>> y = layer(np.ones((2, 7, 384), "float32"))
    >>> tuple(y.shape), layer.count_params() - 384 * 12 * 32
    ((2, 7, 12, 32), 3072)
    """

    base_class = keras.layers.EinsumDense

    def __init__(self, equation, output_shape, adapter=None, **kwargs):
        options, state = self.split_adapter_options(kwargs)
        super().__init__(equation, output_shape, **kwargs)
        self._init_adapters(adapter, options, state)

    _folds_in_inference = True

    def build(self, input_shape):
        super().build(input_shape)
        self._build_adapters()

    @classmethod
    def _check_geometry(cls, layer, path):
        einsum_factorization.factorize(layer.equation, path)

    def _factorization(self):
        return einsum_factorization.factorize(
            self.equation, self.path or self.name
        )

    @classmethod
    def kernel_layout(cls, layer):
        factorization = einsum_factorization.factorize(layer.equation, layer.path)
        return factorization.layout(
            quantized.logical_kernel_shape(
                layer, keras_private.kernel_of(layer)
            )
        )

    def _base_output(self, inputs):
        if self.quantization_mode is not None:
            return quantized.base_output(self, inputs)
        return ops.einsum(self.equation, inputs, keras_private.kernel_of(self))

    def _kernel_output(self, inputs, kernel):
        return ops.einsum(self.equation, inputs, kernel)

    def _finish_output(self, outputs):
        if self.bias is not None:
            outputs = ops.add(outputs, self.bias)
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs

    def _contract_a(self, x, a):
        factorization = self._factorization()
        if factorization.matrix_form:
            # One 2-D matmul: see `adapter_math.flat_matmul` for why.
            layout = self._layout()
            a = ops.reshape(a, (layout.d, a.shape[-1]))
            return adapter_math.flat_matmul(x, a, len(layout.in_axes))
        return ops.einsum(factorization.a_equation, x, a)

    def _rows_contraction(self):
        if not self._factorization().matrix_form:
            return None
        return len(self._layout().in_axes)

    def _contract_b(self, h, b):
        factorization = self._factorization()
        if factorization.matrix_form:
            layout = self._layout()
            b = ops.reshape(b, (b.shape[0], layout.k))
            return adapter_math.flat_matmul(h, b, 1, layout.out_shape)
        return ops.einsum(factorization.b_equation, h, b)

    def _units_to_output(self, units, ndim):
        perm, shape_fn = einsum_factorization.units_broadcast(
            self._factorization(), ndim
        )
        if perm != tuple(range(len(perm))):
            units = ops.transpose(units, perm)
        return ops.reshape(units, shape_fn(self._layout().unit_shape))
