"""The adapter manifest a `.keras` file carries, and re-applying it.

`AdaptedModel.get_config` (see `keras_lowrank.io.keras_file`) writes the
model's own config next to `manifest(model)`: every adapted layer's adapters
with their options, which are active and merged, and the model-level state
(`keras_lowrank.state.model_state.ModelState`). Loading rebuilds the original
model and calls `restore` before Keras loads the weights.

Format 2 carries `sha256`, a checksum over the rest of the manifest (its
canonical JSON), so a hand-edited or corrupt manifest is refused instead of
re-creating other adapters than the ones saved. Format 1 (keras_lowrank 0.1)
had none; its files still load (they hold whole trained models), after the
same structural checks.
"""

import hashlib
import json

import numpy as np

from keras_lowrank.integrations import moe
from keras_lowrank.io import layer_match
from keras_lowrank.layers import adapter_class_for
from keras_lowrank.spec import AdapterSpec
from keras_lowrank.state import owned
from keras_lowrank.state.model_state import ModelState
from keras_lowrank.state.model_state import adapted_visits
from keras_lowrank.state.model_state import state_of
from keras_lowrank.surgery.walk import find_layer
from keras_lowrank.version import __version__

MANIFEST_FORMAT = 2
READABLE_FORMATS = (1, 2)


class ManifestError(ValueError):
    """A `.keras` file's adapter manifest that cannot be applied.
    `keras_lowrank.load_model` adds the file's name to the message."""


def manifest(model):
    """A JSON-ready description of every adapter in `model`, with its
    checksum.

    Args:
        model: an adapted model.

    Returns:
        A dict of JSON types only.

    Example:

    >>> import keras, keras_lowrank
    >>> from keras_lowrank.io.manifest import check, manifest
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4),
    ...                           keras.layers.Dense(2)])
    >>> _ = keras_lowrank.adapt(model, rank=2, name="task")
    >>> m = manifest(model)
    >>> m["format"], m["active"]
    (2, ['task'])
    >>> check(m)  # what loading checks first
    >>> m["active"] = ["other"]
    >>> check(m)
    Traceback (most recent call last):
    ...
    keras_lowrank.io.manifest.ManifestError: keras_lowrank: the adapter manifest of this .keras file does not match its checksum: the file was edited or is corrupt. Save the model again from the original.
    """
    state = state_of(model)
    if state.disabled:
        # Every adapter is switched off for the context's duration: a file
        # written now would record that and reload as the base model.
        raise ValueError(
            f"keras_lowrank: model '{model.name}' is inside "
            "`keras_lowrank.disable_adapters(model)`, where its adapters are "
            "switched off; a file saved now would reload as the base model. "
            "Save it outside the context (the file keeps the adapters), or "
            "save the base model with keras_lowrank.unload(model) first."
        )
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
    out = {
        "format": MANIFEST_FORMAT,
        "keras_lowrank_version": __version__,
        "options": state.options,
        "active": list(state.active),
        "kept": list(state.kept),
        "frozen_before": list(state.frozen_before),
        "layers": layers,
        # Names Keras made up (an MoE block's) may differ in the process that
        # loads the file: `restore` matches them as adapter files do.
        "siblings": layer_match.siblings(model, list(layers)),
        "holders": dict(state.holders),
        "stash": [
            [owner, key, list(value.shape), str(value.dtype)]
            for owner, key, value in owned.stash_entries(state)
        ],
    }
    # Through JSON once: tuples become lists, exactly what a reload sees, so
    # the checksum is computed over what will be read back.
    out = json.loads(json.dumps(out))
    out["sha256"] = _checksum(out)
    return out


def restore(model, manifest_):
    """Re-applies a manifest to a freshly rebuilt (unadapted) model, before
    its weights are loaded, and gives it its `ModelState`. Layers rebuilt
    from their own config (in Functional and Sequential models) already hold
    their adapters; they are checked rather than adapted twice.

    Args:
        model: the rebuilt model.
        manifest_: what `manifest` wrote.

    Raises:
        ManifestError: a malformed, edited or inconsistent manifest.
    """
    check(manifest_)
    # Expert kernels (MoE) are sublayers only of prepared expert layers;
    # those that get no adapter are tidied at the end.
    moe.prepare(model)
    _restore_layers(model, manifest_)
    moe.tidy(model)
    _restore_state(model, manifest_)


def _restore_layers(model, manifest_):
    paths = None
    if "siblings" in manifest_:  # written since keras_lowrank 0.2
        config = {"layers": manifest_["layers"], "siblings": manifest_["siblings"]}
        paths = layer_match.PathMap(model, config, None, check=False)
    for path, entry in manifest_["layers"].items():
        here = path if paths is None else paths.find(path)
        layer = None if here is None else find_layer(model, here)
        if layer is None:
            raise ManifestError(
                f"keras_lowrank: the saved model has adapters on layer "
                f"'{path}', but the rebuilt model has no layer with that "
                "path. Load the file into the same architecture, built the "
                "same way."
            )
        cls = adapter_class_for(layer)
        if cls is None:
            raise ManifestError(
                f"keras_lowrank: layer '{path}' was saved as "
                f"{entry['class_name']} but rebuilt as "
                f"{type(layer).__name__}, which cannot hold adapters."
            )
        cls.become(layer)
        for name, spec_config in entry["adapters"].items():
            try:
                spec = AdapterSpec.from_config(spec_config)
            except (TypeError, ValueError, KeyError, AttributeError) as error:
                raise _malformed(f"layer '{path}' adapter {name!r}: {error}") from None
            if name in layer.adapter_names:
                if layer.adapter_spec(name) != spec:
                    raise ManifestError(
                        f"keras_lowrank: layer '{path}' adapter {name!r} "
                        "differs between the layer config and the model "
                        "manifest; the file is inconsistent."
                    )
                continue
            layer.add_adapter(name, spec, restore=True)
        layer.restore_state(entry["active"], entry["merged"])


def _restore_state(model, manifest_):
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


def check(manifest_):
    """Raises `ManifestError` unless `manifest_` is a readable manifest whose
    checksum (format 2) matches (example: see `manifest`).

    Args:
        manifest_: a manifest as read from a `.keras` file.
    """
    if not isinstance(manifest_, dict):
        raise _malformed(f"it is a {type(manifest_).__name__}, not an object")
    version = manifest_.get("format")
    if version not in READABLE_FORMATS:
        raise ManifestError(
            f"keras_lowrank: adapter manifest format {version!r} is not "
            f"supported (this keras_lowrank reads format {MANIFEST_FORMAT}). "
            "Upgrade keras_lowrank."
        )
    if version >= 2:
        body = {k: v for k, v in manifest_.items() if k != "sha256"}
        if manifest_.get("sha256") != _checksum(body):
            raise ManifestError(
                "keras_lowrank: the adapter manifest of this .keras file does "
                "not match its checksum: the file was edited or is corrupt. "
                "Save the model again from the original."
            )
    problem = _problem(manifest_)
    if problem:
        raise _malformed(problem)


def _checksum(body):
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _malformed(problem):
    return ManifestError(
        "keras_lowrank: the adapter manifest of this .keras file is "
        f"malformed: {problem}. Save the model again from the original."
    )


def _problem(m):
    """The first structural problem of manifest `m`, or `None`."""
    for key, kind in (("options", dict), ("active", list), ("layers", dict)):
        if not isinstance(m.get(key), kind):
            return f"it has no {kind.__name__} {key!r}"
    for key, kind in (("kept", list), ("frozen_before", list), ("holders", dict), ("stash", list)):
        if key in m and not isinstance(m[key], kind):
            return f"{key!r} is a {type(m[key]).__name__}, not a {kind.__name__}"
    if not all(isinstance(options, dict) for options in m["options"].values()):
        return "an entry of 'options' is not an object"
    if not all(isinstance(name, str) and name in m["options"] for name in m["active"]):
        return f"'active' names adapters it does not describe: {m['active']!r}"
    for path, entry in m["layers"].items():
        where = f"layers[{path!r}]"
        if not isinstance(entry, dict):
            return f"{where} is not an object"
        if not isinstance(entry.get("class_name"), str):
            return f"{where} has no 'class_name'"
        if not isinstance(entry.get("adapters"), dict) or not all(
            isinstance(spec, dict) for spec in entry["adapters"].values()
        ):
            return f"{where} has no 'adapters' object"
        for key in ("active", "merged"):
            names = entry.get(key)
            if not isinstance(names, list) or not all(n in entry["adapters"] for n in names):
                return f"{where}[{key!r}] does not list adapters of that layer"
    for item in m.get("stash", []):
        if not (
            isinstance(item, list) and len(item) == 4
            and isinstance(item[0], str) and isinstance(item[1], str)
            and isinstance(item[2], list) and all(isinstance(n, int) for n in item[2])
        ):
            return f"a 'stash' entry is not [owner, key, shape, dtype]: {item!r}"
    return None
