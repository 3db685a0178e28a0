"""Every use keras_lowrank makes of Keras's private surface, in one module.

Keras 3 has no public API for a few things adapters need (adding variables to
a built layer, turning a `Dense` into a `LowRankDense` in place, rebuilding a
torch parameter list, splitting an optimizer's update step). Each function
below wraps one private name, says what public behaviour it buys and since
which Keras version it exists; `tests/test_keras_private.py` pins every name,
so a Keras upgrade that removes or changes one fails there, in one place,
with a message naming the attribute. Nothing else in the package touches a
Keras attribute that starts with `_`.

"since" gives the oldest Keras release we know to have the name; every name
is checked on the declared minimum (3.14) and on the newest tested release.

| Keras private name | function here | what it buys |
| --- | --- | --- |
| `Layer._tracker` (`lock`, `unlock`, `locked`) | `unlocked_state` | variables added to / removed from a built layer |
| `Layer._untrack_variable`, `Layer.__delattr__` bypass | `delete_variable` | deleting an adapter without one `gc.collect()` per variable |
| `Layer._call_signature`, `call_signature_parameters`, `_call_has_training_arg`, `_call_has_mask_arg`, `_call_has_context_arg`, `_call_context_args` | `refresh_call_signature` | Keras passes `training` to a layer whose class changed |
| `object.__class__` assignment on a Keras object | `swap_class` | in-place adaptation of subclassed/KerasHub models |
| `SeedGenerator._initial_seed` | `FixedSeed` | a replayed dropout seed under rematerialisation (torch) |
| `Dense/EinsumDense/Conv._kernel`, `Embedding._embeddings` | `KERNEL_ATTRS`, `kernel_attr`, `kernel_of`, `set_kernel` | the kernel variable itself, not the property Keras wraps it in |
| `Conv1D._compute_causal_padding` | `causal_padding` | the "causal" padding Conv1D uses |
| `Layer._flatten_layers` | `direct_sublayers`, `all_sublayers` | a walk over sublayers (no public one) |
| `Layer._tracker.untrack` | `delete_sublayer` | removing a sublayer added after build (MoE expert kernels) |
| `Layer._path`, `Layer._parent_path` | `place_under` | a sublayer added after build gets the path (and variable paths) Keras would give it |
| `Layer._track_variables` (torch) | `retrack_variables` | `model.parameters()` sees added/removed variables |
| `Dense/EinsumDense/Embedding._int8_call`, `_int4_call` | `quantized_call` | Keras's own quantized matmul as the base path |
| `_orig_input_dim`, `_orig_output_dim`, `_int4_unpacked_column_size`, `_int4_block_size`, `EinsumDense._adjust_scale_for_dequant` | `quantization_attr`, `einsum_dequant_scale` | dequantizing int8/int4 kernels exactly as Keras does |
| `Layer.__dict__["quantize"]` (per-instance wrapper), `type_check=` | `instance_quantize` | `layer.quantize(...)` / `model.quantize(...)` on adapter layers |
| `Layer._is_quantized` | `mark_unquantized` | a dequantized layer reports `quantization_mode is None` |
| `keras.src.backend.common.global_state` `"use_legacy_config"` | `legacy_h5_saving_in_progress` | refusing a legacy `.h5` save of an adapted model (it could never load) |
| `keras.src.backend.common.global_state` `"current_call_ctx"`, `stateless_scope.get_stateless_scope` | `current_call_context`, `current_call_scope` | telling one outer Keras call from the next (the fused `x·[A₁|A₂]` product of sibling layers is reused only within one) |
| `Optimizer._backend_update_step`, `_apply_weight_decay`, `_use_weight_decay` | `optimizer_update_hooks`, `set_optimizer_update_hooks`, `uses_weight_decay` | LoRA+: a second learning rate for the `B` factors |

Example:

>>> import keras
>>> dense = keras.layers.Dense(2)
>>> dense.build((None, 3))
>>> kernel_of(dense) is dense.kernel
True
"""

import contextlib
import inspect

import keras

# --- layer state ----------------------------------------------------------------


@contextlib.contextmanager
def unlocked_state(layer):
    """Lets a built layer gain or lose variables inside the block.

    Keras locks a layer's tracker when `build` ends (attribute assignments of
    variables then raise); its own `enable_lora` and `quantize` unlock it the
    same way. Private: `Layer._tracker` with `locked`/`lock()`/`unlock()`,
    since Keras 3.0.
    """
    tracker = layer._tracker
    was_locked = tracker.locked
    tracker.unlock()
    try:
        yield
    finally:
        if was_locked:
            tracker.lock()


def delete_variable(layer, attr):
    """`delattr(layer, attr)` for a variable attribute, minus the
    `gc.collect()` that `Layer.__delattr__` runs for every variable (up to a
    second each in a process holding a large model: deleting a 12-layer
    adapter took ~20 s). Callers collect once at the end.

    Call inside `unlocked_state(layer)`. Private: `Layer._untrack_variable`
    (since Keras 3.0) and skipping `Layer.__delattr__` for the plain
    `object.__delattr__` below it.
    """
    variable = getattr(layer, attr)
    layer._untrack_variable(variable)
    super(keras.layers.Layer, layer).__delattr__(attr)


# The attributes `Layer.__init__` derives from `call`'s signature.
CALL_SIGNATURE_ATTRS = (
    "_call_signature",
    "call_signature_parameters",
    "_call_has_training_arg",
    "_call_has_mask_arg",
    "_call_has_context_arg",
    "_call_context_args",
)


def refresh_call_signature(layer):
    """Re-reads `call`'s signature after a class change (the Keras names).

    Keras inspects `call` once, in `Layer.__init__`, to learn whether it takes
    `training` (and `mask`, and the context arguments). An Embedding or Conv
    that became an adapter layer now takes `training` (adapter dropout), so
    the cached answer is refreshed, or Keras would never pass it. Private:
    the attributes in `CALL_SIGNATURE_ATTRS` (`_call_context_args` and
    `_call_has_context_arg` since Keras 3.9; the others since 3.0).
    """
    signature = inspect.signature(layer.call)
    names = [p.name for p in signature.parameters.values()]
    layer._call_signature = signature
    layer.call_signature_parameters = names
    layer._call_has_training_arg = "training" in names
    layer._call_has_mask_arg = "mask" in names
    layer._call_has_context_arg = {
        arg: (arg in names) for arg in layer._call_context_args
    }


def swap_class(obj, cls):
    """Changes the class of a live Keras layer or model to `cls`, in place.

    Subclassed and KerasHub models cannot have sublayers replaced after build
    (and `clone_model` refuses them), so adapting keeps the objects and
    changes their class. Relies on Keras objects having no `__slots__` and
    on `cls` sharing the original's instance layout (a subclass, or the
    original class back); pinned since Keras 3.0. After a swap of a layer,
    call `refresh_call_signature`.
    """
    obj.__class__ = cls


class FixedSeed(keras.random.SeedGenerator):
    """A Keras `SeedGenerator` that always returns one drawn seed.

    Used to replay a dropout seed drawn before a rematerialised call (and
    again when the backward pass recomputes it). No state variable is
    created: this seed never advances. Private: `SeedGenerator._initial_seed`
    (since Keras 3.0); with it set, the torch backend draws from this seed,
    not from its global generator.
    """

    def __init__(self, value):
        self._value = value
        self._initial_seed = 0

    def next(self, ordered=True):
        return self._value


# --- kernels ---------------------------------------------------------------------

# Where each Keras kernel layer keeps its kernel variable. The public
# `kernel`/`embeddings` properties return the same variable for a float
# layer, but Keras's built-in LoRA makes them return `W + A·B`, and for int4
# they return the packed kernel too; adapters need the variable itself.
# Private since Keras 3.0.
KERNEL_ATTRS = (
    (keras.layers.Embedding, "_embeddings", "embeddings"),
    (keras.layers.Dense, "_kernel", "kernel"),
    (keras.layers.EinsumDense, "_kernel", "kernel"),
    (keras.layers.Conv1D, "_kernel", "kernel"),
    (keras.layers.Conv2D, "_kernel", "kernel"),
    (keras.layers.Conv3D, "_kernel", "kernel"),
)


def kernel_attr(layer):
    """`(private attribute, variable name)` of `layer`'s kernel (see
    `KERNEL_ATTRS`: Keras's `_kernel`/`_embeddings`)."""
    for cls, attr, name in KERNEL_ATTRS:
        if isinstance(layer, cls):
            return attr, name
    raise TypeError(
        f"keras_lowrank: {type(layer).__name__} has no kernel keras_lowrank "
        "knows; adapt Dense, EinsumDense, Embedding or Conv1D/2D/3D layers."
    )


def kernel_of(layer):
    """The variable holding `layer`'s kernel (Keras's `_kernel` /
    `_embeddings`)."""
    return getattr(layer, kernel_attr(layer)[0])


def set_kernel(layer, variable):
    """Makes `variable` the layer's kernel (Keras's `_kernel` /
    `_embeddings`), inside `unlocked_state`."""
    setattr(layer, kernel_attr(layer)[0], variable)


def causal_padding(layer):
    """`Conv1D`'s own left padding for `padding="causal"`, as `ops.pad`
    widths. Private: `Conv1D._compute_causal_padding`, since Keras 3.0."""
    return layer._compute_causal_padding()


# --- sublayers and torch parameters -------------------------------------------------


def direct_sublayers(layer):
    """Direct sublayers of `layer`, in tracking order. Keras has no public
    walk over sublayers (`Model.layers` is direct only and models only).
    Private: `Layer._flatten_layers`, since Keras 3.0."""
    return list(layer._flatten_layers(include_self=False, recursive=False))


def all_sublayers(layer):
    """Every sublayer of `layer`, depth first (Keras's `_flatten_layers`,
    as `direct_sublayers`)."""
    return list(layer._flatten_layers(include_self=False))


def place_under(layer, parent):
    """Gives `layer`, made after `parent` was built, the Keras path it would
    have had if `parent` had made it in `build` (`<parent.path>/<name>`), so
    its variables are `<parent.path>/<name>/<variable>` like every other
    sublayer's, unique in the model. Private: `Layer._path` and
    `Layer._parent_path` (which `name_scope` reads for the layer's scope),
    since Keras 3.0."""
    layer._parent_path = parent.path
    layer._path = f"{parent.path}/{layer.name}"


def delete_sublayer(layer, attr):
    """`delattr(layer, attr)` for a sublayer attribute, also dropping it
    from the layer's tracked sublayers (`Layer.__delattr__` untracks
    variables only, so `_flatten_layers` would still list it). Call inside
    `unlocked_state(layer)`. Private: `Layer._tracker.untrack`, since
    Keras 3.0."""
    layer._tracker.untrack(getattr(layer, attr))
    delattr(layer, attr)


def retrack_variables(layer):
    """Rebuilds `layer`'s torch parameter list (torch backend only), so that
    `layer.parameters()` sees variables added or removed after build; Keras
    does the same after `quantize`. Private: `TorchLayer._track_variables`,
    since Keras 3.0. A no-op on the other backends."""
    if keras.backend.backend() == "torch":
        layer._track_variables()


# --- quantization ------------------------------------------------------------------


def quantized_call(keras_class, mode):
    """Keras's own quantized forward pass of `keras_class` for `mode`
    (`Dense._int8_call`, `_int4_call`, likewise EinsumDense and Embedding,
    since Keras 3.0 for int8, 3.8 for int4): its input quantizer and its
    custom gradient, so adapters on a quantized base train exactly as Keras
    quantizes."""
    return getattr(keras_class, f"_{mode}_call")


# Private attributes Keras's quantized layers keep and that dequantizing
# needs: the float kernel's size before int4 packing (Dense, Embedding;
# EinsumDense's packed column count) and the int4 block size (sub-channel
# int4, since Keras 3.12; absent means per-channel).
QUANTIZATION_ATTRS = (
    "_orig_input_dim",
    "_orig_output_dim",
    "_int4_unpacked_column_size",
    "_int4_block_size",
)


def quantization_attr(layer, name, default=None):
    """`layer.<name>` for a name in `QUANTIZATION_ATTRS` (Keras's private
    quantization state), or `default`."""
    if name not in QUANTIZATION_ATTRS:
        raise KeyError(f"{name!r} is not a pinned quantization attribute")
    return getattr(layer, name, default)


def einsum_dequant_scale(layer, scale):
    """EinsumDense's int8 scale reshaped to broadcast against its kernel,
    as Keras dequantizes it. Private: `EinsumDense._adjust_scale_for_dequant`
    (since Keras 3.0)."""
    return layer._adjust_scale_for_dequant(scale)


def instance_quantize(obj):
    """The per-instance `quantize` wrapper Keras sets on every layer and
    model when it is created (its argument checks, config resolution and
    state unlocking, around the class's `quantize`), or `None`. Adapter
    layers wrap it to call the class's `quantize` with `type_check=False`.
    Private: the instance attribute and the `type_check` keyword, both in
    Keras >= 3.10 (the declared minimum)."""
    return obj.__dict__.get("quantize")


def mark_unquantized(layer):
    """Tells Keras the layer holds a float kernel again (after our own
    dequantizing): `quantization_mode` and `quantize` read `_is_quantized`.
    Private: `Layer._is_quantized`, since Keras 3.0."""
    layer._is_quantized = False


# --- optimizers ----------------------------------------------------------------------


def optimizer_update_hooks(optimizer):
    """`(update_step, apply_weight_decay)`: the per-instance functions every
    backend's `apply` calls with the gradients and the learning rate (the
    one point where one group of variables can get another learning rate
    without re-implementing each backend's update). Private:
    `BaseOptimizer._backend_update_step` and `_apply_weight_decay`, since
    Keras 3.0."""
    return optimizer._backend_update_step, optimizer._apply_weight_decay


def set_optimizer_update_hooks(optimizer, update_step, apply_weight_decay):
    """Replaces the two Keras hooks of `optimizer_update_hooks` on this
    optimizer instance."""
    optimizer._backend_update_step = update_step
    optimizer._apply_weight_decay = apply_weight_decay


def uses_weight_decay(optimizer, variable):
    """Whether `optimizer` decays `variable` (its `exclude_from_weight_decay`
    rules). Private: `BaseOptimizer._use_weight_decay`, since Keras 3.0."""
    return optimizer._use_weight_decay(variable)


# --- saving ---------------------------------------------------------------------


def current_call_context():
    """The `CallContext` of the outermost Keras layer call running now, or
    `None` outside any call.

    Keras (3.0+) keeps it in the global attribute `"current_call_ctx"` from
    the entry of the outermost `Layer.__call__` to its exit, so two calls of
    a model have two contexts: `layers.shared_input` reuses a product of
    sibling layers only inside one, where no variable can change in between.
    There is no public way to ask.
    """
    from keras.src.backend.common import global_state

    return global_state.get_global_attribute("current_call_ctx")


def current_call_scope():
    """What one forward pass shares: the `StatelessScope` while one is
    active (JAX's `fit`/`predict` run the model in one, and there a
    Functional model's layers each open their own call context), else the
    outermost call context (`current_call_context`). Variables keep their
    values within either. Keras 3.0+; no public way to ask.
    """
    from keras.src.backend.common import stateless_scope

    return stateless_scope.get_stateless_scope() or current_call_context()


def legacy_h5_saving_in_progress():
    """Whether Keras is writing a legacy `.h5` file now.

    `keras.saving.save_model(model, "x.h5")` writes one without calling
    `model.save`, so `get_config` is the only place to refuse it; Keras marks
    the write with the global attribute `"use_legacy_config"` (Keras 3.0+),
    and there is no public way to ask.
    """
    try:
        from keras.src.backend.common import global_state
    except ImportError:  # pragma: no cover - a Keras without that module
        return False
    return bool(global_state.get_global_attribute("use_legacy_config", False))
