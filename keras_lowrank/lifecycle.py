"""Managing the adapters of an adapted model: merge, unmerge, switch, disable,
delete.

Every function acts on the whole model and is all-or-nothing: it checks every
layer before changing any.
"""

import contextlib

from keras_lowrank import freezing
from keras_lowrank.layers import quantized as quantization
from keras_lowrank.model_state import adapted_layers
from keras_lowrank.model_state import state_of
from keras_lowrank.model_state import unmark_adapted


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
    layers = adapted_layers(model)
    quantization.prepare_merge(
        layers, quantized, quantization.MERGE_POLICIES, "merge"
    )
    for layer in layers:
        layer.merge()
    freezing.apply(model)
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
    for layer in adapted_layers(model):
        layer.unmerge()
    freezing.apply(model)
    return model


def set_adapter(model, names):
    """Makes the adapter(s) `names` the active ones; their outputs add up.

    Only active adapters train (the others are frozen). Works between `fit`
    and `predict` calls without rebuilding the model. Merged adapters must be
    unmerged before they can be switched off.

    Args:
        model: an adapted model.
        names: an adapter name or a list of names.

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
    names = [names] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in state.options]
    if unknown:
        raise ValueError(
            f"keras_lowrank: model '{model.name}' has no adapter named "
            f"{unknown[0]!r}; it has {sorted(state.options)}."
        )
    layers = adapted_layers(model)
    for layer in layers:
        stuck = [n for n in layer.merged_adapters if n not in names]
        if stuck:
            raise ValueError(
                f"keras_lowrank: adapter {stuck[0]!r} is merged into layer "
                f"'{layer.path}'; call keras_lowrank.unmerge(model) before "
                "switching it off."
            )
    for layer in layers:
        layer.set_active_adapters([n for n in names if n in layer.adapter_names])
    state.active = names
    freezing.apply(model)
    return model


@contextlib.contextmanager
def disable_adapters(model):
    """A context in which `model` runs as its base model.

    Merged adapters are taken out of the kernels on entry and put back on
    exit; the active set is restored on exit, even after an error.

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
        freezing.apply(model)
        yield model
    finally:
        for layer, active, merged in saved:
            layer.set_active_adapters(active)
            if merged:
                layer.merge(merged)
        state.active = saved_active
        state.disabled = False
        freezing.apply(model)


def delete_adapter(model, name):
    """Removes adapter `name` (variables and state) from every layer.

    A merged adapter is unmerged first. Layers left without adapters become
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
    for layer in adapted_layers(model):
        if name in layer.adapter_names:
            layer.delete_adapter(name)
        if not layer.adapter_names:
            type(layer).revert(layer)
    del state.options[name]
    state.active = [n for n in state.active if n != name]
    if not state.options:
        from keras_lowrank.surgery import restore_plain_trainability

        unmark_adapted(model)
        del model._keras_lowrank
        restore_plain_trainability(model, state)
        return model
    freezing.apply(model)
    return model
