"""KerasHub mixture-of-experts expert layers: their kernels, and the one
forward pass per architecture that lets each kernel carry adapters.

An expert layer such as `MixtralMoeExperts` (also Qwen-MoE, Qwen3-MoE,
Qwen3.5-MoE, GPT-OSS and Gemma 4's expert bank) keeps its 3-D kernels as raw
variables and computes them inside one `call`, with nonlinearities between
them, so no adapter can be added from outside. `prepare(model)` turns every
known expert layer into its "host" class (same object, a class swap, as for
adapter layers) and gives it one `ExpertKernel` child per kernel, named
after the kernel variable; the host's `call` is the architecture's own
formula with each projection computed by its child. Targeting, adapting,
saving, merging and every other verb then see ordinary one-kernel layers at
paths such as `transformer_layer_0/<moe block>/<experts>/
expert_feedforward_gate_dense`.

Verbs that may adapt an expert kernel run inside `prepared(model)`;
`tidy(model)` (run by it and by every refresh) turns hosts whose children
hold no adapter back into the plain KerasHub class, so a model without
expert adapters is exactly the KerasHub model.

The formulas below copy KerasHub 0.32's expert `call`s (casts included);
`tests/test_moe.py` pins each against the KerasHub layer itself (a prepared
layer with no adapter gives bitwise the same output). Which layers are
routers (never adapted by a preset) is also known here.
"""

import contextlib
import dataclasses

import keras
from keras import ops

from keras_lowrank import keras_private
from keras_lowrank.layers.experts import ExpertKernel


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One expert kernel of an expert layer class.

    Attributes:
        attr: the layer's attribute holding the `(E, d, k)` variable.
        shared_input: the input is the tokens `(T, d)` (gate and up
            projections), not one hidden state per expert `(E, T, d)`.
    """

    attr: str
    shared_input: bool


def _mixtral_call(host, hidden_states):
    gate = _project(host, "_expert_feedforward_gate_dense", hidden_states)
    gate = ops.cast(gate, "float32")  # as KerasHub: SiLU in float32
    gate = host.activation(gate)
    gate = ops.cast(gate, host.compute_dtype)
    intermediate = _project(
        host, "_expert_feedforward_intermediate_dense", hidden_states
    )
    hidden = intermediate * gate
    return _project(host, "_expert_feedforward_output_dense", hidden)


def _qwen_call(host, hidden_states):
    # The fused kernel's columns are [gate | up].
    gate_up = _project(host, "_expert_feedforward_gate_dense", hidden_states)
    gate, up = ops.split(gate_up, 2, axis=-1)
    hidden = up * host.activation(gate)
    return _project(host, "_expert_feedforward_output_dense", hidden)


def _qwen3_5_call(host, hidden_states):
    gate_up = _project(host, "_expert_feedforward_gate_dense", hidden_states)
    gate, up = ops.split(gate_up, 2, axis=-1)
    gate = ops.cast(gate, "float32")
    gate = ops.silu(gate)
    gate = ops.cast(gate, hidden_states.dtype)
    hidden = up * gate
    return _project(host, "_expert_feedforward_output_dense", hidden)


def _gpt_oss_call(host, hidden_states):
    # The adapter adapts the linear map only: its term enters before the
    # bias, the interleaved gate/up split and the clamps, so merging it into
    # the kernel is exact.
    gate_up = _project(host, "gate_up_proj", hidden_states)
    gate_up = gate_up + host.gate_up_proj_bias[:, None, :]
    gate = gate_up[..., ::2]
    up = gate_up[..., 1::2]
    gate = ops.clip(gate, -1e9, host.limit)
    up = ops.clip(up, -host.limit, host.limit)
    glu = gate * ops.sigmoid(gate * host.alpha)
    gated_output = (up + 1) * glu
    out = _project(host, "down_proj", gated_output)
    return out + host.down_proj_bias[:, None, :]


def _gemma4_call(host, x, dispatch_weights):
    # Gemma 4's expert bank also scales each expert's output and combines
    # the experts with the router's weights. The adapter adapts `down_proj`
    # itself, so it sits inside the scale: `scale_e·h·(W_e + ΔW_e)`, what
    # merging gives.
    dtype = x.dtype
    gate = _project(host, "gate_proj", x)
    up_out = _project(host, "up_proj", x)
    gate = ops.cast(
        keras.activations.gelu(ops.cast(gate, "float32"), approximate=True),
        dtype,
    )
    hidden = gate * up_out
    out = _project(host, "down_proj", hidden)
    scale = ops.cast(host.per_expert_scale, dtype)
    out = out * ops.reshape(scale, (host.num_experts, 1, 1))
    dw = ops.transpose(ops.cast(dispatch_weights, dtype), (1, 0))
    return ops.sum(out * dw[:, :, None], axis=0)


_MIXTRAL = (
    Kernel("_expert_feedforward_gate_dense", True),
    Kernel("_expert_feedforward_intermediate_dense", True),
    Kernel("_expert_feedforward_output_dense", False),
)
_QWEN = (
    Kernel("_expert_feedforward_gate_dense", True),
    Kernel("_expert_feedforward_output_dense", False),
)

# KerasHub expert class name -> (its kernels, the adapted forward pass).
# Matched by exact class (name and a `keras_hub` module): a subclass may
# compute something else.
EXPERT_LAYERS = {
    "MixtralMoeExperts": (_MIXTRAL, _mixtral_call),
    "QwenMoeExperts": (_QWEN, _qwen_call),
    "Qwen3MoeExperts": (_QWEN, _qwen_call),
    "Qwen3_5MoeExperts": (_QWEN, _qwen3_5_call),
    "GptOssExperts": (
        (Kernel("gate_up_proj", True), Kernel("down_proj", False)),
        _gpt_oss_call,
    ),
    "Gemma4MoEBlock": (
        (
            Kernel("gate_proj", True),
            Kernel("up_proj", True),
            Kernel("down_proj", False),
        ),
        _gemma4_call,
    ),
}

# Names of the layers that route tokens to experts, and of the shared
# expert's gate (hidden -> 1): never selected by the `"mlp"`/`"all-linear"`
# presets (a router trained by a preset would change which experts every
# token sees); a target that names one still adapts it. The linear layers
# inside a router layer (`GptOssTopKRouter`, Gemma 4's `Gemma4Router`, whose
# Dense is just "proj") are routers too.
ROUTER_NAMES = (
    "sparse_feedforward_gate_dense",  # Mixtral, Qwen-MoE, Qwen3(.5)-MoE
    "router_dense",  # GPT-OSS
    "shared_expert_gate_dense",  # Qwen-MoE, Qwen3.5-MoE
)


def _original_class(layer):
    state = getattr(layer, "_lowrank_experts", None)
    return type(layer) if state is None else state


def expert_layer_kind(layer):
    """The `EXPERT_LAYERS` key of `layer` (plain or prepared), else `None`."""
    cls = _original_class(layer)
    if cls.__name__ in EXPERT_LAYERS and cls.__module__.startswith("keras_hub."):
        return cls.__name__
    return None


def is_host(layer):
    return getattr(layer, "_lowrank_experts", None) is not None


def child_attr(kernel_attr):
    """The host attribute that holds the `ExpertKernel` of `kernel_attr`."""
    return "lowrank_kernel" + (
        kernel_attr if kernel_attr.startswith("_") else "_" + kernel_attr
    )


def _project(host, attr, x):
    # Every kernel of a prepared host has its child (see `prepare`).
    return getattr(host, child_attr(attr))(x)


class ExpertHost:
    """Put in front of a KerasHub expert class by `prepare`: the same layer,
    its projections computed by its `ExpertKernel` children.

    Example:

    >>> import keras_hub
    >>> from keras_lowrank.integrations import moe
    >>> backbone = keras_hub.models.MixtralBackbone(
    ...     vocabulary_size=16, num_layers=1, num_query_heads=2,
    ...     hidden_dim=8, intermediate_dim=6, num_key_value_heads=1,
    ...     num_experts=4, top_k=2)
    >>> with moe.prepared(backbone):
    ...     hosts = [l for l in backbone._flatten_layers() if moe.is_host(l)]
    ...     print(type(hosts[0]).__name__)
    LowRankMixtralMoeExperts
    >>> [l for l in backbone._flatten_layers() if moe.is_host(l)]
    []
    """

    def call(self, *args, **kwargs):
        _, forward = EXPERT_LAYERS[expert_layer_kind(self)]
        return forward(self, *args, **kwargs)


_HOST_CLASSES = {}


def _host_class(original):
    cls = _HOST_CLASSES.get(original)
    if cls is None:
        cls = type(f"LowRank{original.__name__}", (ExpertHost, original), {})
        _HOST_CLASSES[original] = cls
    return cls


def hosts(model):
    """Every expert layer inside `model` (plain or prepared), in model order."""
    return [
        layer
        for layer in keras_private.all_sublayers(model)
        if expert_layer_kind(layer) is not None
    ]


def prepare(model):
    """Turns every built expert layer of `model` into a host with one
    `ExpertKernel` child per kernel (no variables are created)."""
    for layer in hosts(model):
        if is_host(layer) or not layer.built:
            continue
        kernels, _ = EXPERT_LAYERS[expert_layer_kind(layer)]
        original = type(layer)
        with keras_private.unlocked_state(layer):
            for kernel in kernels:
                child = ExpertKernel(
                    layer, kernel.attr, kernel.shared_input,
                    name=getattr(layer, kernel.attr).name,
                    dtype=layer.dtype_policy,
                )
                keras_private.place_under(child, layer)
                setattr(layer, child_attr(kernel.attr), child)
        keras_private.swap_class(layer, _host_class(original))
        layer._lowrank_experts = original
        keras_private.refresh_call_signature(layer)


def tidy(model):
    """Turns hosts whose children hold no adapter back into the plain
    KerasHub class, without their children."""
    from keras_lowrank.layers.convert import is_adapter_layer

    for layer in hosts(model):
        if not is_host(layer):
            continue
        kernels, _ = EXPERT_LAYERS[expert_layer_kind(layer)]
        children = [getattr(layer, child_attr(k.attr), None) for k in kernels]
        if any(
            child is not None and is_adapter_layer(child) and child.adapter_names
            for child in children
        ):
            continue
        with keras_private.unlocked_state(layer):
            for kernel, child in zip(kernels, children):
                if child is not None:
                    keras_private.delete_sublayer(layer, child_attr(kernel.attr))
        original = layer._lowrank_experts
        del layer._lowrank_experts
        keras_private.swap_class(layer, original)
        keras_private.refresh_call_signature(layer)
        keras_private.retrack_variables(layer)


@contextlib.contextmanager
def prepared(model):
    """Runs the block with every expert layer of `model` prepared, and tidies
    up afterwards, also after an error (example: see `ExpertHost`)."""
    prepare(model)
    try:
        yield
    finally:
        tidy(model)


def is_router(visit):
    """Whether the layer of `visit` (a `walk.Visit`) routes tokens to
    experts, or gates a shared expert."""
    return visit.layer.name in ROUTER_NAMES or any(
        type(parent).__name__.endswith("Router") for parent in visit.parents
    )


def no_expert_layers(model, argument):
    """The error for the `"experts"` preset on a model without expert
    layers this module knows."""
    return ValueError(
        f"keras_lowrank: {argument}='experts' matched no KerasHub "
        f"mixture-of-experts expert layer in model '{model.name}'. Expert "
        f"LoRA knows exactly {', '.join(sorted(EXPERT_LAYERS))} (not "
        "subclasses, whose `call` may compute something else). For other "
        "layers, name the layer instead (its Dense/EinsumDense sublayers)."
    )
