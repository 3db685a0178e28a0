"""What a model remembers about its adapters: its `ModelState`.

`adapt()` turns the adapted layers into `LowRank*` layers in place and gives
the model a `ModelState` (below). How that state travels through `.keras`
files, pickling and cloning: `keras_lowrank.io.keras_file` and
`keras_lowrank.io.manifest`.
"""

from keras_lowrank.layers import LowRankLayer
from keras_lowrank.surgery.walk import walk


class ModelState:
    """Model-level adapter state (plain Python, not tracked by Keras).

    Attributes:
        options: adapter name -> the JSON-ready options `adapt()` was called
            with (rank, alpha, targets as given, bias policy, ...), plus the
            resolved `"layers"` it adapts, the `"kept"` layer paths it keeps
            fully trainable and the `"owned"` weight keys it has its own copy
            of (see `keras_lowrank.state.owned`).
        active: names of the active adapters, in order: the one record of
            the active set. Each layer's own active list is derived from it
            by `keras_lowrank.state.refresh.refresh`, which every verb runs
            after a change.
        frozen_before: paths of layers that were already frozen before the
            first `adapt()`; `unload` restores them.
        disabled: while True (inside `disable_adapters`), no adapter applies;
            `active` keeps the set that applies again on exit.
        stash: owner (adapter name or `owned.BASE`) -> `{key: np.ndarray}`,
            the owned values not currently in the model's variables.
        holders: key -> the adapter whose value the variable holds now
            (absent: the base model's).
        stacked: while the adapters are stacked for serving
            (`keras_lowrank.serving.stack_adapters`), the adapter names in
            slot order; else `None`. Runtime only: never saved.
        rows: inside `per_example_adapters`, the adapter name (or `None`,
            the base model) of each row of the batch; else `None`.
    """

    def __init__(self):
        self.options = {}
        self.active = []
        self.frozen_before = []
        self.disabled = False
        self.stash = {}
        self.holders = {}
        self.stacked = None
        self.rows = None

    @property
    def applying(self):
        """The adapters whose values apply now: `active`, or none while
        disabled or while each row of a batch has its own
        (`per_example_adapters`, where the base model's owned values
        apply)."""
        if self.disabled or self.rows is not None:
            return []
        return list(self.active)

    @property
    def kept(self):
        """Paths of the layers that train fully now: those kept by the
        active adapters (a task head, or the user's `trainable=[...]`)."""
        out = []
        if self.disabled:
            return out
        for name in self.active:
            for path in self.options[name].get("kept", []):
                if path not in out:
                    out.append(path)
        return out


# `keras_lowrank.io.keras_file` registers its `adopt` here when it is
# imported (it imports this module; the reverse would be a cycle). A copy
# made by `keras.models.clone_model` holds adapter layers but no state: with
# the adopter every verb works on it as on the original, with no extra call.
_ADOPTERS = []


def register_adopter(adopter):
    """Makes `state_of` call `adopter(model)` for a model without a state;
    it returns the model's new `ModelState`, or `None`."""
    if adopter not in _ADOPTERS:
        _ADOPTERS.append(adopter)


def own_state(model):
    """The `ModelState` `model` holds itself, or `None`; never adopts (a
    sub-model's layers hold the outer model's adapters)."""
    return getattr(model, "_keras_lowrank", None)


def state_of(model, required=True):
    """The `ModelState` of an adapted model (or `None` if `required=False`).

    A model whose layers hold adapters but which has no state (a
    `keras.models.clone_model` copy) gets one first, rebuilt from its layers
    (`keras_lowrank.io.keras_file.adopt`)."""
    state = own_state(model)
    for adopter in _ADOPTERS if state is None else ():
        state = adopter(model)
        if state is not None:
            break
    if state is None and required:
        raise ValueError(
            f"keras_lowrank: model '{model.name}' has no adapters. Call "
            "keras_lowrank.adapt(model, ...) first."
        )
    return state


def adapted_layers(model):
    """Every adapter-holding layer of `model`, in model order."""
    return [v.layer for v in adapted_visits(model)]


def adapted_visits(model):
    """`walk.Visit`s (layer, parents, path) of the adapter-holding layers."""
    return [v for v in walk(model) if isinstance(v.layer, LowRankLayer)]
