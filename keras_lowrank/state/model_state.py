"""What a model remembers about its adapters, and how `.keras` files keep it.

`adapt()` turns the adapted layers into `LowRank*` layers in place and gives
the model a `ModelState`. It also changes the model's class to a subclass of
its own class, `AdaptedModel` first in the MRO, registered with Keras as
`"keras_lowrank>AdaptedModel"`. That changes exactly one thing: `get_config`
wraps the original model's own serialised form together with the adapter
manifest, and `AdaptedModel.from_config` rebuilds the original model from its
own config and re-applies the recorded adapters before Keras loads the
weights. So:

- `keras.saving.load_model("m.keras")` (with keras_lowrank imported) and
  `keras_lowrank.load_model("m.keras")` return the adapted model, for
  Sequential, Functional, subclassed and KerasHub models alike;
- without keras_lowrank, Keras fails loudly on the unknown class instead of
  silently dropping the adapters.

Only public Keras APIs are used: `register_keras_serializable`,
`get_custom_objects`, `get_registered_name`, `deserialize_keras_object`.
"""

import urllib.parse

import keras
import numpy as np

from keras_lowrank.state import owned
from keras_lowrank.layers import LowRankLayer
from keras_lowrank.layers import adapter_class_for
from keras_lowrank.layers import quantized
from keras_lowrank.spec import AdapterSpec
from keras_lowrank.version import __version__
from keras_lowrank.surgery.walk import find_layer
from keras_lowrank.surgery.walk import walk

MANIFEST_FORMAT = 1
REGISTERED_NAME = "keras_lowrank>AdaptedModel"
_STASH_PREFIX = "lowrank_stash:"


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
    """

    def __init__(self):
        self.options = {}
        self.active = []
        self.frozen_before = []
        self.disabled = False
        self.stash = {}
        self.holders = {}

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


def state_of(model, required=True):
    """The `ModelState` of an adapted model (or `None` if `required=False`)."""
    state = getattr(model, "_keras_lowrank", None)
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


# --- the model class change ---------------------------------------------------


class AdaptedModel:
    """Mixin put first in an adapted model's class; see the module docstring.

    Not instantiated directly: `adapt()` creates `type(model)`'s adapted
    subclass on demand.
    """

    def get_config(self):
        original = type(self)._keras_lowrank_original
        inner = {
            "module": original.__module__,
            "class_name": original.__name__,
            "config": super().get_config(),
            "registered_name": keras.saving.get_registered_name(original),
        }
        build_config = self.get_build_config()
        if build_config is not None:
            inner["build_config"] = build_config
        return {"model": inner, "adapters": manifest(self)}

    # The values adapters own but do not hold right now (their copies of a
    # task head, say) live outside any Keras variable. They are written next
    # to the model's own variables, each under a name that says whose copy of
    # which weight it is ("lowrank_stash:<owner>:<quoted key>"); no Keras
    # layer uses such names.

    def save_own_variables(self, store):
        super().save_own_variables(store)
        for owner, key, value in owned.stash_entries(state_of(self)):
            store[_stash_name(owner, key)] = value

    def load_own_variables(self, store):
        keys = list(store.keys())
        own = {k: store[k] for k in keys if not k.startswith(_STASH_PREFIX)}
        super().load_own_variables(own)
        stored = {
            _stash_entry(k): np.asarray(store[k])
            for k in keys
            if k.startswith(_STASH_PREFIX)
        }
        state = state_of(self)
        stash, holders = owned.stash_from_entries(self, state, stored)
        state.stash, state.holders = stash, holders

    def load_weights(self, filepath, skip_mismatch=False, **kwargs):
        # The file's variables hold the values of the adapters that were
        # active when it was saved; swap in those of the adapters active now.
        result = super().load_weights(filepath, skip_mismatch=skip_mismatch, **kwargs)
        owned.sync(self, state_of(self))
        return result

    @classmethod
    def from_config(cls, config, custom_objects=None):
        if "model" not in config or "adapters" not in config:
            raise ValueError(
                "keras_lowrank: this AdaptedModel config has no 'model' or "
                "'adapters' entry; the file is not a keras_lowrank save."
            )
        model = keras.saving.deserialize_keras_object(
            config["model"], custom_objects=custom_objects
        )
        restore(model, config["adapters"])
        return model


keras.saving.register_keras_serializable(
    package="keras_lowrank", name="AdaptedModel"
)(AdaptedModel)

_ADAPTED_CLASSES = {}


def mark_adapted(model):
    """Changes `model`'s class to its adapted subclass (idempotent)."""
    if isinstance(model, AdaptedModel):
        return
    quantized.install_model_hook(model, adapted_layers)
    original = type(model)
    cls = _ADAPTED_CLASSES.get(original)
    if cls is None:
        # The class name is what Keras writes as `class_name` and quotes when
        # it cannot find the class: on a machine without keras_lowrank the
        # error then says which package is missing.
        cls = type(
            f"keras_lowrank.AdaptedModel[{original.__name__}]",
            (AdaptedModel, original),
            {
                "__module__": original.__module__,
                "__doc__": original.__doc__,
                "_keras_lowrank_original": original,
            },
        )
        # Register the subclass under the one public name, so Keras writes
        # "keras_lowrank>AdaptedModel" for it; then point the name back at the
        # mixin, whose `from_config` is the same either way.
        keras.saving.register_keras_serializable(
            package="keras_lowrank", name="AdaptedModel"
        )(cls)
        keras.saving.get_custom_objects()[REGISTERED_NAME] = AdaptedModel
        _ADAPTED_CLASSES[original] = cls
    model.__class__ = cls


def unmark_adapted(model):
    """Gives `model` back its original class."""
    if isinstance(model, AdaptedModel):
        quantized.remove_model_hook(model)
        model.__class__ = type(model)._keras_lowrank_original


# --- manifest ---------------------------------------------------------------


def _stash_name(owner, key):
    return f"{_STASH_PREFIX}{owner}:{urllib.parse.quote(key, safe='')}"


def _stash_entry(name):
    owner, _, key = name[len(_STASH_PREFIX):].partition(":")
    return owner, urllib.parse.unquote(key)


def manifest(model):
    """A JSON-ready description of every adapter in `model`."""
    state = state_of(model)
    layers = {}
    for visit in adapted_visits(model):
        layer = visit.layer
        layers[visit.path] = {
            "class_name": type(layer).__name__,
            "adapters": {
                name: layer.adapter_spec(name).get_config()
                for name in layer.adapter_names
            },
            "active": layer.active_adapters,
            "merged": layer.merged_adapters,
        }
    return {
        "format": MANIFEST_FORMAT,
        "keras_lowrank_version": __version__,
        "options": state.options,
        "active": list(state.active),
        "kept": list(state.kept),
        "frozen_before": list(state.frozen_before),
        "layers": layers,
        "holders": dict(state.holders),
        "stash": [
            [owner, key, list(value.shape), str(value.dtype)]
            for owner, key, value in owned.stash_entries(state)
        ],
    }


def restore(model, manifest_):
    """Re-applies a manifest to a freshly rebuilt (unadapted) model, before
    its weights are loaded. Layers rebuilt from their own config (in
    Functional and Sequential models) already hold their adapters; they are
    checked rather than adapted twice."""
    from keras_lowrank.surgery import freezing

    version = manifest_.get("format")
    if version != MANIFEST_FORMAT:
        raise ValueError(
            f"keras_lowrank: adapter manifest format {version!r} is not "
            f"supported (this keras_lowrank reads format {MANIFEST_FORMAT}). "
            "Upgrade keras_lowrank."
        )
    for path, entry in manifest_["layers"].items():
        layer = find_layer(model, path)
        if layer is None:
            raise ValueError(
                f"keras_lowrank: the saved model has adapters on layer "
                f"'{path}', but the rebuilt model has no layer with that "
                "path. Load the file into the same architecture, built the "
                "same way."
            )
        cls = adapter_class_for(layer)
        if cls is None:
            raise TypeError(
                f"keras_lowrank: layer '{path}' was saved as "
                f"{entry['class_name']} but rebuilt as "
                f"{type(layer).__name__}, which cannot hold adapters."
            )
        cls.become(layer)
        for name, spec_config in entry["adapters"].items():
            spec = AdapterSpec.from_config(spec_config)
            if name in layer.adapter_names:
                if layer.adapter_spec(name) != spec:
                    raise ValueError(
                        f"keras_lowrank: layer '{path}' adapter {name!r} "
                        "differs between the layer config and the model "
                        "manifest; the file is inconsistent."
                    )
                continue
            layer.add_adapter(name, spec, restore=True)
        layer.restore_state(entry["active"], entry["merged"])
    state = ModelState()
    state.options = {
        name: dict(options) for name, options in manifest_["options"].items()
    }
    for options in state.options.values():
        options.setdefault("kept", list(manifest_.get("kept", [])))
        options.setdefault("owned", [])
    state.active = list(manifest_["active"])
    state.frozen_before = list(manifest_.get("frozen_before", []))
    state.holders = dict(manifest_.get("holders", {}))
    # Placeholders of the right shapes; `AdaptedModel.load_own_variables`
    # replaces them with the weights file's values right after this.
    for owner, key, shape, _ in manifest_.get("stash", []):
        state.stash.setdefault(owner, {})[key] = np.zeros(shape, "float32")
    model._keras_lowrank = state
    mark_adapted(model)
    freezing.apply(model)


def load_model(filepath, custom_objects=None, compile=True, safe_mode=True):
    """Loads a `.keras` file saved from an adapted (or plain) model.

    Adapted models come back with their adapters as separate, trainable
    factors, on any backend, whatever backend saved them. This is
    `keras.saving.load_model` with keras_lowrank's classes registered;
    `safe_mode` stays on by default, so loading executes no code from the
    file.

    Args:
        filepath: path to a `.keras` file.
        custom_objects: as for `keras.saving.load_model` (needed for your own
            unregistered classes).
        compile: whether to compile the model as it was saved.
        safe_mode: as for `keras.saving.load_model`.

    Returns:
        The model.

    Example:

    >>> import keras, keras_lowrank, numpy as np, tempfile, os
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8),
    ...                           keras.layers.Dense(2)])
    >>> _ = keras_lowrank.adapt(model, rank=2)
    >>> path = os.path.join(tempfile.mkdtemp(), "m.keras")
    >>> model.save(path)
    >>> loaded = keras_lowrank.load_model(path)
    >>> type(loaded.layers[0]).__name__
    'LowRankDense'
    """
    return keras.saving.load_model(
        filepath,
        custom_objects=custom_objects,
        compile=compile,
        safe_mode=safe_mode,
    )
