"""Managing the adapters of an adapted model: merge, unmerge, switch, disable,
delete.

Every function acts on the whole model and is all-or-nothing: it checks every
layer before changing any. Each one leaves the model ready for the next
`fit`/`predict`: the compiled functions are dropped (Keras re-traces them),
values adapters own (heads, biases) are swapped (see `keras_lowrank.state.owned`),
and when the set of trainable variables changed, a compiled model gets a
fresh optimizer of the same configuration (see
`keras_lowrank.surgery.freezing.refresh_optimizer`).
"""

import contextlib
import gc

from keras_lowrank.surgery import freezing
from keras_lowrank.state import owned
from keras_lowrank.layers import quantized as quantization
from keras_lowrank.state.model_state import adapted_layers
from keras_lowrank.state.model_state import state_of
from keras_lowrank.io.keras_file import unmark_adapted


def merge(model, quantized="error"):
    """Folds the active adapters into their kernels, exactly; returns `model`.

    Outputs are unchanged (up to float rounding); inference then costs what
    the base model costs. Merged factors stop training until `unmerge`.
    Merging twice does nothing the second time.

    Args:
        model: an adapted model.
        quantized: what to do with int8/int4 kernels (`model.quantize`):
            `"error"` (default) raises, since merging into an integer kernel
            is lossy and cannot be undone; `"dequantize"` first turns those
            kernels into the float kernels they stand for (the layers stop
            being quantized), then merges exactly. To merge and quantize
            again, use `unload(model, quantized="requantize")`.

    Example:

    >>> import keras, keras_lowrank
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8),
    ...                           keras.layers.Dense(2)])
    >>> _ = keras_lowrank.adapt(model, rank=2)
    >>> model.layers[0].merged_adapters
    []
    >>> _ = keras_lowrank.merge(model)
    >>> model.layers[0].merged_adapters
    ['default']
    """
    state_of(model)
    before = freezing.trainable_ids(model)
    layers = adapted_layers(model)
    quantization.prepare_merge(
        layers, quantized, quantization.MERGE_POLICIES, "merge"
    )
    for layer in layers:
        layer.merge()
    freezing.apply(model)
    freezing.refresh_optimizer(model, before)
    return model


def unmerge(model):
    """Takes every merged adapter back out of its kernel; returns `model`.

    Example:

    >>> import keras, keras_lowrank
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8),
    ...                           keras.layers.Dense(2)])
    >>> _ = keras_lowrank.merge(keras_lowrank.adapt(model, rank=2))
    >>> keras_lowrank.unmerge(model).layers[0].merged_adapters
    []
    """
    state_of(model)
    before = freezing.trainable_ids(model)
    for layer in adapted_layers(model):
        layer.unmerge()
    freezing.apply(model)
    freezing.refresh_optimizer(model, before)
    return model


def set_adapter(model, names):
    """Makes the adapter(s) `names` the active ones; their outputs add up.

    Only active adapters train (the others are frozen), with the layers and
    biases they own (`trainable=[...]`, a KerasHub task head,
    `bias="lora_only"`/`"all"`): each adapter has its own copy of those, and
    switching swaps them in. Two adapters that own the same weight cannot be
    active together. Works between `fit` and `predict` calls without
    rebuilding the model; if the trainable variables change, a compiled
    model's optimizer is replaced by a fresh one of the same configuration.
    Merged adapters must be unmerged before they can be switched off.

    Args:
        model: an adapted model.
        names: an adapter name or a non-empty list of distinct names.

    Returns:
        `model`.

    Example:

    >>> import keras, keras_lowrank
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8),
    ...                           keras.layers.Dense(2)])
    >>> _ = keras_lowrank.adapt(model, rank=2, name="a")
    >>> _ = keras_lowrank.adapt(model, rank=2, name="b")
    >>> keras_lowrank.set_adapter(model, ["a", "b"]).layers[0].active_adapters
    ['a', 'b']
    """
    state = state_of(model)
    names = _check_names(model, state, names)
    from keras_lowrank.surgery.adapt import _check_activatable

    _check_activatable(model, names)
    conflict = owned.conflicts(state, names)
    if conflict:
        raise ValueError(owned.conflict_message(*conflict))
    before = freezing.trainable_ids(model)
    for layer in adapted_layers(model):
        layer.set_active_adapters([n for n in names if n in layer.adapter_names])
    state.active = names
    owned.sync(model, state)
    freezing.apply(model)
    freezing.refresh_optimizer(model, before)
    return model


def _check_names(model, state, names):
    if isinstance(names, str):
        names = [names]
    names = list(names)
    if not names:
        raise ValueError(
            "keras_lowrank: set_adapter() needs at least one adapter name. "
            "To run the base model, use `with keras_lowrank."
            "disable_adapters(model):`."
        )
    for name in names:
        if not isinstance(name, str) or name not in state.options:
            raise ValueError(
                f"keras_lowrank: model '{model.name}' has no adapter named "
                f"{name!r}; it has {sorted(state.options)}."
            )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(
            f"keras_lowrank: adapter {repeated[0]!r} is listed twice; each "
            "active adapter counts once. Pass distinct names."
        )
    return names


@contextlib.contextmanager
def disable_adapters(model):
    """A context in which `model` runs as its base model.

    No adapter applies: merged adapters are taken out of the kernels on entry
    and put back on exit, and layers and biases adapters own hold the base
    model's values. Everything is restored on exit, even after an error.
    Meant for inference and evaluation; the optimizer is left as it is, so
    do not train inside the context.

    Example:

    >>> import keras, keras_lowrank, numpy as np
    >>> base = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    >>> x = np.ones((1, 4), "float32")
    >>> _ = keras_lowrank.adapt(base, rank=2, targets=[keras.layers.Dense])
    >>> with keras_lowrank.disable_adapters(base):
    ...     base.layers[0].active_adapters
    []
    """
    state = state_of(model)
    if state.disabled:
        yield model  # already inside a disable_adapters context
        return
    layers = adapted_layers(model)
    saved = [(layer, layer.active_adapters, layer.merged_adapters) for layer in layers]
    saved_active = list(state.active)
    try:
        for layer, _, merged in saved:
            if merged:
                layer.unmerge()
            layer.set_active_adapters([])
        state.active = []
        state.disabled = True
        owned.sync(model, state)
        freezing.apply(model)
        yield model
    finally:
        for layer, active, merged in saved:
            layer.set_active_adapters(active)
            if merged:
                layer.merge(merged)
        state.active = saved_active
        state.disabled = False
        owned.sync(model, state)
        freezing.apply(model)


def delete_adapter(model, name):
    """Removes adapter `name` (variables, owned copies and state) from every
    layer.

    A merged adapter is unmerged first. The other adapters stay as they are:
    if `name` was the only active one, none is active afterwards (the model
    runs as its base until `set_adapter`). Layers left without adapters become
    plain Keras layers again; a model left without adapters becomes a plain
    model (nothing merged). Returns `model`.

    Example:

    >>> import keras, keras_lowrank
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8),
    ...                           keras.layers.Dense(2)])
    >>> _ = keras_lowrank.adapt(model, rank=2, name="a")
    >>> _ = keras_lowrank.adapt(model, rank=2, name="b")
    >>> keras_lowrank.delete_adapter(model, "a").layers[0].adapter_names
    ['b']
    """
    state = state_of(model)
    if name not in state.options:
        raise ValueError(
            f"keras_lowrank: model '{model.name}' has no adapter named "
            f"{name!r}; it has {sorted(state.options)}."
        )
    before = freezing.trainable_ids(model)
    state.active = [n for n in state.active if n != name]
    owned.sync(model, state)  # the base values go back where `name` held
    for layer in adapted_layers(model):
        if name in layer.adapter_names:
            layer.delete_adapter(name)
        if not layer.adapter_names:
            type(layer).revert(layer)
    del state.options[name]
    owned.remove_owner(state, name)
    if not state.options:
        from keras_lowrank.surgery.adapt import restore_plain_trainability

        unmark_adapted(model)
        del model._keras_lowrank
        restore_plain_trainability(model, state)
    else:
        freezing.apply(model)
    freezing.refresh_optimizer(model, before)
    gc.collect()  # free the factors' buffers now (see layers.base._delete_variable)
    return model
