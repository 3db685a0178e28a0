"""Expert kernels of mixture-of-experts layers, as layers that hold adapters.

KerasHub's MoE expert layers (`MixtralMoeExperts`, `Qwen3MoeExperts`,
`GptOssExperts`, ...) keep several 3-D kernels `(E, d, k)` as raw variables
of one layer and compute every expert on every token with einsums. Every
adapter verb here works on layers that each own one kernel, so each expert
kernel gets a small layer of its own, an `ExpertKernel`, placed under its
expert layer (see `keras_lowrank.integrations.moe`). It holds no variable:
its kernel stays the expert layer's variable, reached through a weak
reference (tracking it twice would save it twice). Adapting it gives a
`LowRankExpertKernel`, like any other layer, with per-expert factors
`A (E, d, r)` and `B (E, r, k)`.

Its input is either the tokens `(T, d)`, the same for every expert (the gate
and up projections), or one hidden state per expert `(E, T, d)` (the down
projection); its output is `(E, T, k)`. The adapter path is
`s·einsum(einsum(x, A), B)` over the same (expert, token) grid as the base,
so an expert a token is not routed to gets an exact zero from the routing
weights, sends no gradient to its factors, and `W_e + ΔW_e` is never formed
in training.
"""

import weakref

import keras
from keras import ops

from keras_lowrank.layers.base import LowRankLayer
from keras_lowrank.layers.layout import KernelLayout


@keras.saving.register_keras_serializable(package="keras_lowrank")
class ExpertKernel(keras.layers.Layer):
    """One `(E, d, k)` expert kernel of an MoE expert layer, as a layer.

    Made by `keras_lowrank.integrations.moe` (not by users); `call` is the
    expert layer's own einsum.

    Args:
        host: the expert layer that owns the kernel variable.
        kernel_attr: the host's attribute holding the kernel.
        shared_input: `True` if the input is `(T, d)`, the same tokens for
            every expert; `False` if it is `(E, T, d)`.
        **kwargs: `keras.layers.Layer` arguments (`name`, `dtype`).

    Example:

    >>> import keras_hub, keras_lowrank
    >>> backbone = keras_hub.models.MixtralBackbone(
    ...     vocabulary_size=16, num_layers=1, num_query_heads=2,
    ...     hidden_dim=8, intermediate_dim=6, num_key_value_heads=1,
    ...     num_experts=4, top_k=2)
    >>> _ = keras_lowrank.adapt(backbone, targets=["experts"], rank=2)
    >>> kernels = [l for l in backbone._flatten_layers()
    ...            if isinstance(l, ExpertKernel)]
    >>> sorted((k.name, tuple(k.kernel.shape)) for k in kernels)  # doctest: +NORMALIZE_WHITESPACE
    [('expert_feedforward_gate_dense', (4, 8, 6)),
     ('expert_feedforward_intermediate_dense', (4, 8, 6)),
     ('expert_feedforward_output_dense', (4, 6, 8))]
    """

    def __init__(self, host, kernel_attr, shared_input, **kwargs):
        super().__init__(**kwargs)
        # A weak reference is neither tracked by Keras nor registered by
        # torch, and Keras's saving walk does not follow it (it follows
        # every attribute that is a layer: a `host` property would loop):
        # the kernel keeps exactly one owner.
        self._host = weakref.ref(host)
        self.kernel_attr = kernel_attr
        self.shared_input = bool(shared_input)
        self.built = True

    @property
    def kernel(self):
        """The host's kernel variable, `(E, d, k)`."""
        return getattr(self._host(), self.kernel_attr)

    @property
    def equation(self):
        return "td,edk->etk" if self.shared_input else "etd,edk->etk"

    def call(self, inputs):
        return ops.einsum(self.equation, inputs, self.kernel)

    def compute_output_shape(self, input_shape):
        experts, _, k = self.kernel.shape
        tokens = input_shape[0] if self.shared_input else input_shape[1]
        return (experts, tokens, k)

    def get_config(self):
        # Rebuilt by the expert layer, never from a config: the host is not
        # serialisable here.
        raise NotImplementedError(
            "keras_lowrank: an ExpertKernel is part of its expert layer and "
            "is not saved on its own; save the model."
        )


@keras.saving.register_keras_serializable(package="keras_lowrank")
class LowRankExpertKernel(LowRankLayer, ExpertKernel):
    """An `ExpertKernel` with per-expert low-rank adapters.

    For each expert `e` the update is `s·A_e·B_e` with `A (E, d, r)` and
    `B (E, r, k)`: one rank for all experts (the batched einsum needs it, and
    PEFT does the same). For the same total adapter size as a rank-`R`
    adapter on one dense feed-forward layer, use `r = R // E`. DoRA keeps a
    magnitude per (expert, output unit).

    Only made in place, by `keras_lowrank.adapt` (targets `"experts"`, a
    kernel's name, or the presets `"mlp"`/`"all-linear"`), never
    constructed directly.

    Args:
        host, kernel_attr, shared_input: as for `ExpertKernel`.
        **kwargs: as for `ExpertKernel`.

    Example:

    >>> import keras_hub, keras_lowrank
    >>> backbone = keras_hub.models.Qwen3MoeBackbone(
    ...     vocabulary_size=16, num_layers=1, num_query_heads=2,
    ...     num_key_value_heads=1, hidden_dim=8, intermediate_dim=16,
    ...     moe_intermediate_dim=6, num_experts=4, head_dim=4, top_k=2)
    >>> _ = keras_lowrank.adapt(backbone, targets=["experts"], rank=2)
    >>> sorted((w.name, tuple(w.shape)) for w in backbone.trainable_weights)
    [('lowrank_A_default', (4, 6, 2)), ('lowrank_A_default', (4, 8, 2)), ('lowrank_B_default', (4, 2, 8)), ('lowrank_B_default', (4, 2, 12))]
    """

    base_class = ExpertKernel
    _folds_in_inference = True

    def __init__(self, *args, **kwargs):
        raise TypeError(
            "keras_lowrank: LowRankExpertKernel is made in place from an "
            "expert layer's kernel; use keras_lowrank.adapt(model, "
            "targets=['experts'])."
        )

    @classmethod
    def kernel_layout(cls, layer):
        return KernelLayout(layer.kernel.shape, (0,), (1,), (2,))

    @classmethod
    def kernel_variable(cls, layer):
        return layer.kernel

    def _save_base_variables(self, store):
        # The kernel is saved by its expert layer; `Layer.save_own_variables`
        # would write this layer's adapters a second time, under numbers.
        pass

    def _load_base_variables(self, store):
        pass

    def _base_output(self, inputs):
        return ops.einsum(self.equation, inputs, self.kernel)

    def _kernel_output(self, inputs, kernel):
        return ops.einsum(self.equation, inputs, kernel)

    def _finish_output(self, outputs):
        return outputs

    def _contract_a(self, x, a):
        equation = "td,edr->etr" if self.shared_input else "etd,edr->etr"
        return ops.einsum(equation, x, a)

    def _contract_b(self, h, b):
        return ops.einsum("etr,erk->etk", h, b)

    def _units_to_output(self, units, ndim):
        # `(E, k)` magnitudes against an `(E, T, k)` output.
        return ops.expand_dims(units, 1)
