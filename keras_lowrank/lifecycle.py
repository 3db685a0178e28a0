"""Managing the adapters of an adapted model: merge, unmerge, switch, disable,
delete.

Every function acts on the whole model and is all-or-nothing: it runs as a
`keras_lowrank.state.transaction.transaction`, so a failure at any layer
(a refusal, an out-of-memory error) leaves the model exactly as it was.
Each one leaves the model ready for the next `fit`/`predict`
(`keras_lowrank.state.refresh.refresh`): the compiled functions are dropped
(Keras re-traces them), values adapters own (heads, biases) are swapped (see
`keras_lowrank.state.owned`), and when the set of trainable variables
changed, a compiled model gets a fresh optimizer of the same configuration.
"""

import contextlib
import gc

from keras_lowrank import errors
from keras_lowrank.layers import quantized as quantization
from keras_lowrank.state import owned
from keras_lowrank.state.model_state import adapted_layers
from keras_lowrank.state.model_state import adapted_visits
from keras_lowrank.state.model_state import state_of
from keras_lowrank.io.keras_file import unmark_adapted
from keras_lowrank.state.transaction import Snapshot
from keras_lowrank.state.transaction import check_not_disabled
from keras_lowrank.state.transaction import transaction


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
    with transaction(model, "merge", kernels=_merging(layers)):
        quantization.prepare_merge(
            layers, quantized, quantization.MERGE_POLICIES, "merge"
        )
        for layer in layers:
            layer.merge()
    return model


def _merging(layers):
    """The layers whose kernel a merge of their active adapters writes."""
    return [
        layer
        for layer in layers
        if any(n not in layer.merged_adapters for n in layer.active_adapters)
    ]


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
    layers = adapted_layers(model)
    with transaction(
        model, "unmerge", kernels=[l for l in layers if l.merged_adapters]
    ):
        for layer in layers:
            layer.unmerge()
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
    check_not_disabled(model, "set_adapter")
    names = _check_names(model, state, names)
    check_activatable(model, names)
    conflict = owned.conflicts(state, names)
    if conflict:
        raise ValueError(owned.conflict_message(*conflict))
    with transaction(model, "set_adapter", while_stacked=True, switch_only=True):
        state.active = names
    return model


def check_activatable(model, names):
    """Raises if making exactly `names` active would switch off an adapter
    that is merged into a kernel."""
    for visit in adapted_visits(model):
        stuck = [n for n in visit.layer.merged_adapters if n not in names]
        if stuck:
            raise ValueError(
                f"keras_lowrank: adapter {stuck[0]!r} is merged into layer "
                f"'{visit.path}'; call keras_lowrank.unmerge(model) before "
                "switching it off."
            )


def _check_names(model, state, names):
    if isinstance(names, str):
        names = [names]
    elif names is None or not isinstance(names, (list, tuple)):
        raise TypeError(
            "keras_lowrank: set_adapter() takes `names` as an adapter name or "
            f"a list of names, got {type(names).__name__} ({names!r}). Pass "
            f"one of {sorted(state.options)}; to run the base model, use "
            "`with keras_lowrank.disable_adapters(model):`."
        )
    names = list(names)
    if not names:
        raise ValueError(
            "keras_lowrank: set_adapter() needs at least one adapter name. "
            "To run the base model, use `with keras_lowrank."
            "disable_adapters(model):`."
        )
    for name in names:
        errors.check_known_adapter(model, name, state.options, "set_adapter")
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
    model's values. Everything is restored on exit, bit for bit, even after
    an error. Meant for inference and evaluation; the optimizer is left as
    it is, so do not train inside the context.

    Inside the context the adapters cannot change: `adapt`, `unload`,
    `merge`, `unmerge`, `set_adapter`, `delete_adapter`, `combine` and
    `load_adapter` raise `ValueError` (leave the context first), and so does
    `model.save()` (the file would reload as the base model). Reading
    adapters (`save_adapter`, `report`) works.

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
    merged = [layer for layer in layers if layer.merged_adapters]
    # What the exit puts back, bit for bit: the merged kernels, the active
    # and merged sets, the owned values. Verbs that change adapters are
    # refused inside the context, so this snapshot stays valid.
    entry = Snapshot(model, kernels=merged)
    with transaction(model, "disable_adapters", kernels=merged, while_stacked=True):
        for layer in merged:
            layer.unmerge()
        state.disabled = True
    # While disabled, `model.save()` is refused by the manifest
    # (`keras_lowrank.io.manifest.manifest`): the file would reload as the
    # base model.
    try:
        yield model
    finally:
        entry.restore()


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
    errors.check_known_adapter(model, name, state.options, "delete_adapter", "name")
    layers = [l for l in adapted_layers(model) if name in l.adapter_names]
    kernels = [
        layer
        for layer in layers
        if name in layer.merged_adapters
        or layer.adapter_spec(name).rewrites_kernel
    ]
    with transaction(model, "delete_adapter", kernels=kernels):
        state.active = [n for n in state.active if n != name]
        owned.sync(model, state)  # the base values go back where `name` held
        for layer in layers:
            layer.delete_adapter(name)
            if not layer.adapter_names:
                type(layer).revert(layer)
        del state.options[name]
        owned.remove_owner(state, name)
        if not state.options:
            unmark_adapted(model)
            del model._keras_lowrank
    gc.collect()  # free the factors' buffers now (see keras_private.delete_variable)
    return model
