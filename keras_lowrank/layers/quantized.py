"""Quantized frozen bases (QLoRA-style): adapters over int8 and int4 kernels.

Keras quantizes `Dense`, `EinsumDense` and `Embedding` in place
(`model.quantize("int8")`): the float kernel is replaced by an integer kernel
plus scales, the layer's dtype policy becomes e.g. `"int8_from_float32"`, and
Keras calls the layer's `quantized_call` (`_int8_call`, `_int4_call`) instead
of `call`. This module lets an adapter layer sit on such a kernel:

- the base path `x·W` is Keras's own quantized matmul (its custom gradient,
  its input quantizer), run on a view of the layer without bias, activation
  and Keras's built-in LoRA; the adapter then adds `s·(x·A)·B` in float and
  the layer adds bias and activation. The kernel is never dequantized to be
  merged with the factors in the forward pass;
- the factors stay float32 and are the only trainable variables;
- `.keras` files keep the integer kernel and the factors as they are (Keras's
  built-in LoRA re-quantizes `W + s·A·B` on save instead);
- merging is refused by default (it would be lossy and irreversible); the
  caller picks `"dequantize"` (float kernel, exact) or, when unloading,
  `"requantize"` (the merge error is measured and reported).

Supported modes are `"int8"` and `"int4"` (per-channel and sub-channel).
float8 (whose scales train inside the layer's own call), GPTQ and AWQ bases
are refused with an error, never silently ignored.
"""

import warnings

import keras
import numpy as np
from keras import ops

from keras_lowrank import keras_private
from keras_lowrank.spec import where

SUPPORTED_MODES = ("int8", "int4")
REFUSED_MODES = {
    "float8": (
        "float8 training fake-quantizes the kernel inside Keras's own call "
        "and trains its scaling factors there, which an adapter layer "
        "cannot keep"
    ),
    "gptq": (
        "GPTQ kernels are calibrated on the layer's own inputs and have no "
        "training path in Keras (Keras's built-in LoRA refuses them too)"
    ),
    "awq": (
        "AWQ kernels are calibrated on the layer's own inputs and have no "
        "training path in Keras"
    ),
}
MERGE_POLICIES = ("error", "dequantize")
UNLOAD_POLICIES = ("error", "dequantize", "requantize")


# --- what Keras can quantize ----------------------------------------------------


def keras_quantizes(layer):
    """Whether Keras implements `quantize` for `layer`'s plain class (Dense,
    EinsumDense, Embedding; not the convolutions)."""
    return isinstance(
        layer,
        (keras.layers.Dense, keras.layers.EinsumDense, keras.layers.Embedding),
    )


def resolve_mode(mode, config):
    """The mode of a `quantize(mode, config)` call (`config` may carry it)."""
    if mode is not None:
        return mode
    if isinstance(config, str):
        return config
    return getattr(config, "mode", None)


def check_mode(mode, path, action):
    """Raises unless a quantized base in `mode` can hold adapters.

    Args:
        mode: a quantization mode (`None` is fine: not quantized).
        path: the layer path, for the message.
        action: what the user tried, e.g. "adapt a layer quantized with" or
            "quantize an adapted layer to".
    """
    if mode is None or mode in SUPPORTED_MODES:
        return
    reason = REFUSED_MODES.get(mode, "it is not a mode keras_lowrank knows")
    raise TypeError(
        f"{where(path)}: cannot {action} {mode!r}: {reason}. Adapters "
        f"support {' and '.join(repr(m) for m in SUPPORTED_MODES)} bases. "
        "Use one of those, or leave this layer out (`exclude=` in adapt(), "
        "`filters=` in model.quantize())."
    )


def check_quantizable(layer, mode):
    """Raises unless `layer` (an adapter layer) may be quantized to `mode`
    now. Layers Keras cannot quantize (convolutions) pass: Keras then skips
    them with its own warning, and their adapters keep working in float."""
    if not keras_quantizes(layer):
        return
    path = layer.path
    check_mode(mode, path, "quantize an adapted layer to")
    # A class whose adapted forward pass has no quantized form refuses here.
    refuse = getattr(type(layer), "refuse_quantized", None)
    if refuse is not None:
        refuse(path, mode)
    if layer.merged_adapters:
        raise ValueError(
            f"{where(path)}: adapters {layer.merged_adapters} are merged "
            "into the kernel; quantizing now would bake them into the integer"
            " kernel for good. Call keras_lowrank.unmerge(model) first, then "
            "quantize."
        )


# --- geometry -----------------------------------------------------------------


def effective_policy(layer):
    """The layer's own dtype policy (resolving a `DTypePolicyMap`)."""
    policy = layer.dtype_policy
    if isinstance(policy, keras.dtype_policies.DTypePolicyMap):
        policy = policy[layer.path]
    return policy


def logical_kernel_shape(layer, kernel):
    """The float kernel's shape, also for an int4 kernel stored packed."""
    if layer.quantization_mode != "int4":
        return tuple(kernel.shape)
    if isinstance(layer, keras.layers.EinsumDense):
        return tuple(layer.original_kernel_shape)
    if isinstance(layer, keras.layers.Embedding):
        return (layer.input_dim, layer.output_dim)
    return (
        keras_private.quantization_attr(layer, "_orig_input_dim"),
        keras_private.quantization_attr(layer, "_orig_output_dim"),
    )


# --- forward ------------------------------------------------------------------


class _WithoutBiasAndActivation:
    """A quantized Keras layer seen without bias, activation and built-in
    LoRA, so that Keras's own `_int8_call`/`_int4_call` computes `x·W` alone.

    Everything else (the integer kernel, the scales, the input quantizer, the
    equation) is read from the layer itself.
    """

    bias = None
    activation = None
    lora_enabled = False

    def __init__(self, layer):
        object.__setattr__(self, "_layer", layer)

    def __getattr__(self, name):
        return getattr(self._layer, name)


def base_output(layer, inputs):
    """`x·W` of a quantized layer, by Keras's own quantized call.

    Keras's custom gradient gives the gradient with respect to the input
    (so adapters below this layer train) and none for the integer kernel.
    """
    mode = layer.quantization_mode
    check_mode(mode, layer.path, "run an adapter on a layer quantized with")
    keras_call = keras_private.quantized_call(type(layer).base_class, mode)
    return keras_call(_WithoutBiasAndActivation(layer), inputs)


# --- dequantizing -----------------------------------------------------------------


def dequantized_kernel(layer):
    """The float32 kernel an int8/int4 layer stands for, in the float
    kernel's shape. A kernel-sized tensor: used to merge, to measure errors
    and by DoRA's norm, never in the LoRA forward pass.

    Example:

    >>> from keras_lowrank import LowRankDense
    >>> dense = keras.layers.Dense(4)
    >>> dense.build((None, 8))
    >>> dense.quantize("int8")
    >>> layer = LowRankDense.from_layer(dense, rank=2)
    >>> layer.quantization_mode, str(layer.lowrank_A_default.dtype)
    ('int8', 'float32')
    >>> tuple(dequantized_kernel(layer).shape)
    (8, 4)
    """
    mode = layer.quantization_mode
    check_mode(mode, layer.path, "dequantize a layer quantized with")
    if isinstance(layer, keras.layers.Embedding):
        return _dequantize_embedding(layer, mode)
    if isinstance(layer, keras.layers.EinsumDense):
        return _dequantize_einsum(layer, mode)
    return _dequantize_dense(layer, mode)


def _grouped(q, scale, zero, g_idx, axis):
    """`(q − zero[g])·scale[g]`: sub-channel (asymmetric) int4."""
    groups = ops.cast(g_idx, "int32")
    scale = ops.take(ops.cast(scale, "float32"), groups, axis=axis)
    zero = ops.take(ops.cast(zero, "float32"), groups, axis=axis)
    return ops.multiply(ops.subtract(ops.cast(q, "float32"), zero), scale)


def _per_channel(layer):
    block = keras_private.quantization_attr(layer, "_int4_block_size")
    return block in (None, -1)


def _orig_output_dim(layer):
    return keras_private.quantization_attr(layer, "_orig_output_dim")


def _dequantize_dense(layer, mode):
    q = keras_private.kernel_of(layer)
    if mode == "int4":
        q = keras.quantizers.unpack_int4(q, _orig_output_dim(layer), axis=-1)
        if not _per_channel(layer):
            return _grouped(
                q, layer.kernel_scale, layer.kernel_zero, layer.g_idx, 0
            )
    return ops.divide(ops.cast(q, "float32"), layer.kernel_scale)


def _dequantize_einsum(layer, mode):
    if mode == "int8":
        scale = keras_private.einsum_dequant_scale(layer, layer.kernel_scale)
        kernel = keras_private.kernel_of(layer)
        return ops.divide(ops.cast(kernel, "float32"), scale)
    q = keras.quantizers.unpack_int4(
        keras_private.kernel_of(layer),
        keras_private.quantization_attr(layer, "_int4_unpacked_column_size"),
        axis=-1,
    )
    if _per_channel(layer):
        flat = ops.divide(ops.cast(q, "float32"), layer.kernel_scale)
    else:
        flat = _grouped(q, layer.kernel_scale, layer.kernel_zero, layer.g_idx, 0)
    return ops.reshape(flat, tuple(layer.original_kernel_shape))


def _dequantize_embedding(layer, mode):
    q = keras_private.kernel_of(layer)
    if mode == "int4":
        q = keras.quantizers.unpack_int4(q, _orig_output_dim(layer), axis=-1)
        if not _per_channel(layer):
            return _grouped(
                q,
                layer.embeddings_scale,
                layer.embeddings_zero,
                layer.g_idx,
                -1,
            )
    scale = ops.expand_dims(layer.embeddings_scale, -1)
    return ops.divide(ops.cast(q, "float32"), scale)


_QUANTIZED_ATTRS = (
    "kernel_scale",
    "kernel_zero",
    "embeddings_scale",
    "embeddings_zero",
    "g_idx",
)


def _integer_variable_attrs(layer):
    """The attributes holding a quantized layer's integer kernel and its
    scales (and zero points, group indices): what `dequantize` replaces."""
    attrs = (keras_private.kernel_attr(layer)[0],) + _QUANTIZED_ATTRS
    return [a for a in attrs if isinstance(getattr(layer, a, None), keras.Variable)]


def dequantize(layer):
    """Replaces a quantized layer's integer kernel by the float kernel it
    stands for, in place: afterwards the layer is a float layer (its dtype
    policy is the one it was quantized from) and merging is exact.

    Returns:
        The `(mode, config)` needed to quantize the layer the same way again.
    """
    mode = layer.quantization_mode
    if mode is None:
        return None, None
    requantize_as = (mode, _config_for_requantize(layer, mode))
    value = dequantized_kernel(layer)
    _, name = keras_private.kernel_attr(layer)
    source = effective_policy(layer).get_config().get("source_name")
    float_policy = keras.dtype_policies.get(source or "float32")
    with layer._lowrank.unlocked():
        for attr in _integer_variable_attrs(layer):
            delattr(layer, attr)
        kernel = layer.add_weight(
            name=name,
            shape=tuple(value.shape),
            initializer="zeros",
            dtype=float_policy.variable_dtype,
            trainable=False,
        )
        keras_private.set_kernel(layer, kernel)
    kernel.assign(ops.cast(value, kernel.dtype))
    keras_private.mark_unquantized(layer)
    layer.quantization_config = None
    layer.dtype_policy = float_policy
    _retrack(layer)
    return requantize_as


def backup(layer):
    """What `restore_backup` needs to give a quantized layer back its exact
    integer kernel after `dequantize` (a verb that failed half-way); `None`
    for a float layer. Holds one copy of the integer kernel and scales."""
    mode = layer.quantization_mode
    if mode is None:
        return None
    values = {
        attr: np.array(ops.convert_to_numpy(getattr(layer, attr)))
        for attr in _integer_variable_attrs(layer)
    }
    return mode, _config_for_requantize(layer, mode), values


def restore_backup(layer, saved):
    """Makes `layer` quantized again exactly as `backup` found it: Keras's
    own `quantize` recreates the variables, which then get the saved values
    bit for bit."""
    mode, config, values = saved
    if layer.quantization_mode is None:
        keras_quantize = keras_private.instance_quantize(layer)
        keras_quantize = getattr(keras_quantize, "_keras_lowrank", keras_quantize)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Keras's "already built" notes
            keras_quantize(mode=mode, config=config, type_check=False)
        _retrack(layer)
    for attr, value in values.items():
        getattr(layer, attr).assign(value)


def _config_for_requantize(layer, mode):
    config = getattr(layer, "quantization_config", None)
    if config is not None:
        return config
    policy = effective_policy(layer)
    if mode == "int4" and hasattr(policy, "block_size"):
        return keras.quantizers.Int4QuantizationConfig(
            block_size=policy.block_size
        )
    return None


def requantize(layer, mode, config):
    """Quantizes a plain (no longer adapted) float layer with Keras's own
    `quantize`, as it was quantized before `dequantize`."""
    layer.quantize(mode, config=config)
    _retrack(layer)


def _retrack(layer):
    # On the torch backend Keras keeps a parameter list per layer; it is
    # rebuilt after variables are swapped (Keras does the same after
    # `model.quantize`).
    keras_private.retrack_variables(layer)


def requantization_error(float_kernel, layer):
    """Largest absolute and relative (to max |W|) difference between the
    float kernel and what the re-quantized layer stands for."""
    requantized = dequantized_kernel(layer)
    diff = ops.max(ops.abs(ops.subtract(requantized, float_kernel)))
    top = ops.max(ops.abs(float_kernel))
    diff = float(ops.convert_to_numpy(diff))
    top = float(ops.convert_to_numpy(top))
    return diff, diff / top if top else 0.0


# --- merging adapters on quantized bases (model level) ------------------------------


def prepare_merge(layers, policy, allowed, action):
    """Deals with the quantized layers among `layers` before a merge.

    Args:
        layers: adapter layers about to merge their active adapters.
        policy: `"error"` (raise if any quantized layer has something to
            merge), `"dequantize"` or `"requantize"` (give those layers a
            float kernel first).
        allowed: the policies `action` accepts.
        action: `"merge"` or `"unload"`, for messages.

    Returns:
        `[(layer, mode, config), ...]` for every layer dequantized here.
    """
    if policy not in allowed:
        raise ValueError(
            f"keras_lowrank: {action}(quantized={policy!r}) is not a valid "
            f"choice; use one of {', '.join(repr(p) for p in allowed)}."
            + (
                " Re-quantizing is offered by unload() only: a re-quantized "
                "merge cannot be undone."
                if policy == "requantize"
                else ""
            )
        )
    pending = [
        layer
        for layer in layers
        if layer.quantization_mode is not None
        and any(n not in layer.merged_adapters for n in layer.active_adapters)
    ]
    if policy == "error":
        for layer in pending:
            layer.check_mergeable()
        return []
    for layer in pending:
        check_mode(layer.quantization_mode, layer.path, "dequantize")
    return [(layer,) + layer.dequantize() for layer in pending]


def requantize_merged(dequantized):
    """Quantizes merged float kernels again, as they were; measures and
    reports (as a warning) the error this adds to each kernel.

    Args:
        dequantized: what `prepare_merge` returned, after merging and turning
            the layers back into plain Keras layers.

    Returns:
        `{path: (mode, max_abs_error, relative_error)}`.
    """
    errors = {}
    for layer, mode, config in dequantized:
        merged = ops.convert_to_tensor(keras_private.kernel_of(layer))
        path = layer.path
        requantize(layer, mode, config)
        errors[path] = (mode,) + requantization_error(merged, layer)
    if errors:
        worst = max(errors, key=lambda p: errors[p][2])
        mode, absolute, relative = errors[worst]
        warnings.warn(
            f"keras_lowrank: re-quantized {len(errors)} merged kernel(s); "
            f"the largest change is {absolute:.3g} ({relative:.2%} of the "
            f"largest |W|) in layer '{worst}' ({mode}). Outputs change "
            "accordingly; use quantized='dequantize' to keep exact float "
            "kernels.",
            stacklevel=3,
        )
    return errors
