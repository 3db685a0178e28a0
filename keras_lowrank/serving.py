"""Serving many adapters from one base: stacked adapters, free switching and
mixed-adapter batches.

`stack_adapters(model)` copies every adapter of the model into per-layer
stacks (`keras_lowrank.layers.adapter_stack`): slot 0 the base model, one
slot per adapter, padded to a common rank with the scale folded in. From
then on which adapter applies is a variable's value, not a traced graph:

- `set_adapter(model, name)` and `disable_adapters(model)` assign it:
  nothing is traced or compiled again, in `predict`, `predict_on_batch`,
  `model(x)` or KerasHub's `generate`;
- `load_adapter(model, path, name=existing)` refills the slot: free too;
- `with per_example_adapters(model, names):` gives row `i` of the next calls
  adapter `names[i]` (`None`: the base model), gathering each row's factors
  in one batched product. Changing the names for another batch of the same
  size assigns values again; the first call at a new batch size traces once.

Stacked serving is inference only (training raises; `unstack_adapters`
first) and covers plain low-rank adapters (LoRA, rsLoRA and the inits that
leave the kernel alone), not DoRA, PiSSA/OLoRA or merged adapters. Verbs
that add, delete, merge or unmerge adapters are refused while stacked.
"""

import contextlib
import gc

from keras_lowrank import errors
from keras_lowrank.state.model_state import state_of
from keras_lowrank.state.transaction import check_not_disabled
from keras_lowrank.state.transaction import transaction


def stack_adapters(model):
    """Stacks `model`'s adapters for serving; returns `model`.

    After this, switching among them (`set_adapter`, `disable_adapters`),
    hot-swapping a file into one (`load_adapter(..., name=existing)`) and
    mixed-adapter batches (`per_example_adapters`) recompile nothing. The
    first call after stacking traces once. Stacking twice does nothing.

    Args:
        model: an adapted model whose adapters are plain low-rank ones,
            none merged.

    Example:

    >>> import keras, keras_lowrank, numpy as np
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    >>> _ = keras_lowrank.adapt(model, rank=2, name="a", init="gaussian",
    ...                        targets=[keras.layers.Dense])
    >>> _ = keras_lowrank.adapt(model, rank=3, name="b", init="gaussian",
    ...                        targets=[keras.layers.Dense])
    >>> rng = np.random.default_rng(0)
    >>> for v in model.layers[0].weights:  # stand-ins for trained adapters
    ...     if "lowrank_B" in v.path:
    ...         _ = v.assign(rng.normal(size=v.shape))
    >>> x = np.ones((2, 4), "float32")
    >>> b_alone = model.predict(x, verbose=0)
    >>> _ = keras_lowrank.stack_adapters(model)
    >>> np.allclose(model.predict(x, verbose=0), b_alone, atol=1e-6)
    True
    >>> function = model.predict_function
    >>> _ = keras_lowrank.set_adapter(model, "a")
    >>> np.allclose(model.predict(x, verbose=0), b_alone, atol=1e-6)
    False
    >>> model.predict_function is function  # switching traced nothing
    True
    """
    state = state_of(model)
    if state.stacked is not None:
        return model
    with transaction(model, "stack_adapters"):
        state.stacked = list(state.options)
    return model


def unstack_adapters(model):
    """Removes the stacks `stack_adapters` made; returns `model`.

    The adapters themselves are unchanged (the stacks were copies); the
    model trains again as before. Unstacking an unstacked model does
    nothing.

    Example:

    >>> import keras, keras_lowrank
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    >>> _ = keras_lowrank.stack_adapters(
    ...     keras_lowrank.adapt(model, rank=2, targets=[keras.layers.Dense]))
    >>> keras_lowrank.unstack_adapters(model).layers[0].adapter_names
    ['default']
    """
    state = state_of(model)
    if state.stacked is None:
        return model
    check_not_disabled(model, "unstack_adapters")
    with transaction(model, "unstack_adapters", while_stacked=True):
        state.stacked = None
    gc.collect()  # free the stacks' buffers now
    return model


@contextlib.contextmanager
def per_example_adapters(model, names):
    """A context in which row `i` of every call uses adapter `names[i]`.

    Works for `model(x)`, `predict_on_batch`, `predict` with one batch of
    exactly `len(names)` rows, and KerasHub's `generate` on one batch. Rows
    named `None` run the base model. The model is stacked on entry if it is
    not (and unstacked on exit); stack it once with `stack_adapters` to make
    repeated contexts free: at the same batch size nothing recompiles.

    Inside the context adapters cannot change (`set_adapter`, `load_adapter`,
    ... raise) and training raises. Adapters that own weights of their own
    (a kept task head, biases) are refused: the rows of a batch share those
    weights. Each row's result equals running its adapter alone.

    Args:
        model: an adapted model.
        names: one adapter name (or `None`) per row of the batch.

    Example:

    >>> import keras, keras_lowrank, numpy as np
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    >>> _ = keras_lowrank.adapt(model, rank=2, name="a", init="gaussian",
    ...                        targets=[keras.layers.Dense])
    >>> _ = keras_lowrank.adapt(model, rank=2, name="b", init="gaussian",
    ...                        targets=[keras.layers.Dense])
    >>> rng = np.random.default_rng(0)
    >>> for v in model.layers[0].weights:  # stand-ins for trained adapters
    ...     if "lowrank_B" in v.path:
    ...         _ = v.assign(rng.normal(size=v.shape))
    >>> x = np.ones((3, 4), "float32")
    >>> _ = keras_lowrank.set_adapter(model, "b")
    >>> b_alone = model.predict_on_batch(x)
    >>> with keras_lowrank.per_example_adapters(model, ["a", None, "b"]):
    ...     mixed = model.predict_on_batch(x)
    >>> with keras_lowrank.disable_adapters(model):
    ...     base = model.predict_on_batch(x)
    >>> [bool(np.allclose(mixed[i], ref[i], atol=1e-5))
    ...  for i, ref in enumerate([base, base, b_alone])]
    [False, True, True]
    """
    state = state_of(model)
    check_not_disabled(model, "per_example_adapters")
    rows = _check_rows(model, state, names)
    stacked_here = state.stacked is None
    if stacked_here:
        stack_adapters(model)
    try:
        with transaction(model, "per_example_adapters", while_stacked=True):
            state.rows = rows
        try:
            yield model
        finally:
            with transaction(
                model, "per_example_adapters", while_stacked=True,
                while_disabled=True,
            ):
                state.rows = None
    finally:
        if stacked_here:
            unstack_adapters(model)


def _check_rows(model, state, names):
    """`names` as a list of adapter names and `None`s, or the error."""
    if isinstance(names, str) or not hasattr(names, "__len__"):
        raise TypeError(
            "keras_lowrank: per_example_adapters() takes `names` as a list "
            "with one adapter name (or None, the base model) per row of the "
            f"batch, got {type(names).__name__} ({names!r})."
        )
    rows = [None if n is None else n for n in list(names)]
    if not rows:
        raise ValueError(
            "keras_lowrank: per_example_adapters() needs one name per row of "
            "the batch; `names` is empty."
        )
    for name in rows:
        if name is not None:
            errors.check_known_adapter(
                model, name, state.options, "per_example_adapters"
            )
    for name in dict.fromkeys(n for n in rows if n is not None):
        owned = state.options[name].get("owned", [])
        if owned:
            raise ValueError(
                f"keras_lowrank: adapter {name!r} of model '{model.name}' "
                f"owns weights of its own ({owned[:3]}"
                f"{' ...' if len(owned) > 3 else ''}: a kept layer or "
                "biases). The rows of one batch share those weights, so a "
                "mixed batch cannot give each row its adapter's. Serve it "
                "with set_adapter (free once stack_adapters ran), or adapt "
                "without kept layers (trainable=[], bias='none')."
            )
    return rows
