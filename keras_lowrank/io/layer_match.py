"""Matching an adapter file's entries to a model's layers.

Layers are found by path, the chain of layer names. Keras numbers the names
it makes up per session (`dense`, `dense_1`, ...; a KerasHub preset loaded
twice in one process has a `bert_backbone` and then a `bert_backbone_1`), so
the same architecture built elsewhere can have other names. The file records,
for every layer on the way to a recorded path, its direct sublayers as
`[name, class]` (`siblings`). Names under one parent are matched by
position only when the model has exactly the same sublayers there (same
number, same classes, same order) and every name that differs is a name
Keras made up for that class (`dense_2` for a `Dense`). Anything else is
matched by exact name: an adapter for `transformer_layer_3` of a 4-layer
BERT never lands on `transformer_layer_0` of a 1-layer one, nor one for
`dense_2` on the `dense` of a smaller model.
"""

import re

import keras
import numpy as np

from keras_lowrank.layers import LowRankLayer
from keras_lowrank.layers import adapter_class_for
from keras_lowrank.spec import AdapterSpec
from keras_lowrank.state import owned
from keras_lowrank.surgery.walk import walk


def layer_class_name(layer):
    """The name of the class `layer` had before keras_lowrank changed it
    (the adapted layer and model classes are subclasses of the original)."""
    cls = type(layer)
    original = getattr(cls, "_keras_lowrank_original", None)  # adapted models
    if original is None and isinstance(layer, LowRankLayer):
        original = getattr(getattr(layer, "_lowrank", None), "original_class", None)
        if original is None:
            original = next(c for c in cls.__mro__ if not issubclass(c, LowRankLayer))
    return (original or cls).__name__


def siblings(model, paths):
    """`{parent path: [[name, class], ...]}` for `""` and every layer that
    contains one of `paths`: what `PathMap` needs to recognise renamed
    layers."""
    children = _children(model)
    out = {}
    for path in paths:
        parts = path.split("/")
        for depth in range(len(parts)):
            parent = "/".join(parts[:depth])
            if parent not in out:
                out[parent] = [list(pair) for pair in children.get(parent, [])]
    return out


def _children(model):
    children = {}
    for visit in walk(model):
        parent = visit.path.rpartition("/")[0]
        children.setdefault(parent, []).append((visit.layer.name, layer_class_name(visit.layer)))
    return children


def _snake(name):
    """Keras's `to_snake_case`: the stem of the names it makes up."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _made_up(name, class_name):
    stem = _snake(class_name)
    return name == stem or re.fullmatch(re.escape(stem) + r"_\d+", name) is not None


class PathMap:
    """Finds the model's layer for each layer path recorded in a file (see
    the module docstring). Raises, naming the file and every recorded path
    that matches no layer, when some do not."""

    def __init__(self, model, config, file, check=True):
        self.file, self.model, self.config = file, model, config
        self.visits = {visit.path: visit for visit in walk(model)}
        self.children = _children(model)
        self.saved = config["siblings"]
        self.cache = {"": ""}
        self.renames = {}
        if check:
            self._check()

    def _check(self):
        config, model, file = self.config, self.model, self.file
        recorded = list(config["layers"]) + list(config["kept"]) + [
            key.rpartition("/")[0] for key in config["owned"]
        ]
        missing = [path for path in dict.fromkeys(recorded) if self.find(path) is None]
        if missing:
            shown = ", ".join(f"'{p}'" for p in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            why = (
                f"model '{model.name}' has no layer{'s' if len(missing) > 1 else ''} "
                f"{shown}{more}{self._hint(missing)}"
            )
            raise architecture_error(file, model, why, config)

    def find(self, path):
        """The model path for the file's `path`, or `None`."""
        if path in self.cache:
            return self.cache[path]
        parent, _, name = path.rpartition("/")
        found = self.find(parent)
        result = None
        if found is not None:
            renames = self._renames(parent, found)
            if renames is not None:
                name = renames.get(name)
            elif name not in {n for n, _ in self.children.get(found, [])}:
                name = None
            if name is not None:
                result = f"{found}/{name}" if found else name
        self.cache[path] = result
        return result

    def _renames(self, parent, found):
        """`{saved name: name here}` for the sublayers of `parent` (a file
        path) when they differ only by names Keras made up; else `None`."""
        key = (parent, found)
        if key not in self.renames:
            saved = [tuple(pair) for pair in self.saved.get(parent, [])]
            here = self.children.get(found, [])
            renames = None
            if (
                saved != here
                and [c for _, c in saved] == [c for _, c in here]
                and all(
                    a == b or (_made_up(a, cls) and _made_up(b, cls))
                    for (a, cls), (b, _) in zip(saved, here)
                )
            ):
                renames = {a: b for (a, _), (b, _) in zip(saved, here)}
            self.renames[key] = renames
        return self.renames[key]

    def _hint(self, missing):
        for path in missing:
            parent, _, name = path.rpartition("/")
            found = self.find(parent)
            if found is None:
                continue
            stem = re.sub(r"_\d+$", "", name)
            near = [n for n, _ in self.children.get(found, []) if re.sub(r"_\d+$", "", n) == stem]
            if near:
                return (
                    f" (it has {sorted(near)} there: names that differ by a "
                    "number are matched only when the layers around them are "
                    "the same in number, class and order, so this file was "
                    "saved from a different architecture)"
                )
        return ""

    def visit(self, path):
        return self.visits[self.find(path)]

    def require(self, path):
        return self.find(path)


def architecture_error(file, model, why, config):
    return ValueError(
        f"keras_lowrank: adapter file '{file}' does not fit model "
        f"'{model.name}': {why}. The adapter was saved from another "
        f"architecture (file fingerprint {config['fingerprint'][:19]}...); "
        "load it into the base model it was trained on."
    )


def match_layers(model, config, tensors, file, paths):
    """Checks the file's layers against `model`; returns the install plan
    `[(visit, spec)]` and the factors `{model path: {key: array}}`."""
    for path, entry in config["layers"].items():
        visit = paths.visit(path)
        cls = adapter_class_for(visit.layer)
        if cls is None or not visit.layer.built:
            why = (
                f"layer '{path}' is a {type(visit.layer).__name__}, which "
                "cannot hold adapters"
                if cls is None
                else f"layer '{path}' is not built"
            )
            raise architecture_error(file, model, why, config)
        if cls.__name__ != entry["class_name"]:
            why = (
                f"layer '{path}' would be a {cls.__name__} here but was a "
                f"{entry['class_name']} when saved"
            )
            raise architecture_error(file, model, why, config)
        shape = list(cls.kernel_layout(visit.layer).kernel_shape)
        if shape != entry["kernel_shape"]:
            why = (
                f"layer '{path}' has a kernel of shape {tuple(shape)} here but "
                f"{tuple(entry['kernel_shape'])} in the file"
            )
            raise architecture_error(file, model, why, config)
    plan, factors = [], {}
    for path, entry in config["layers"].items():
        visit = paths.visit(path)
        cls = adapter_class_for(visit.layer)
        try:
            spec = AdapterSpec.from_config(entry["spec"])
        except (TypeError, ValueError, KeyError, AttributeError) as error:
            raise ValueError(
                f"keras_lowrank: adapter file '{file}': layer '{path}': its "
                f"options cannot be read ({error}); write the file again "
                "with keras_lowrank.save_adapter()."
            ) from None
        layout = cls.kernel_layout(visit.layer)
        expected = {"A": layout.a_shape(spec.rank), "B": layout.b_shape(spec.rank)}
        if spec.method == "dora":
            expected["magnitude"] = layout.unit_shape
        values = {}
        for key, shape in expected.items():
            tensor = entry["tensors"].get(key, {}).get("name")
            if tensor not in tensors:
                raise ValueError(
                    f"keras_lowrank: adapter file '{file}': layer '{path}' "
                    f"has no tensor for {key!r}; the file is incomplete."
                )
            value = tensors[tensor]
            if tuple(value.shape) != tuple(shape):
                raise ValueError(
                    f"keras_lowrank: adapter file '{file}': layer '{path}': "
                    f"shape mismatch for {key!r}: {tuple(value.shape)} in the "
                    f"file, {tuple(shape)} expected for rank {spec.rank} on a "
                    f"kernel of shape {layout.kernel_shape}."
                )
            values[key] = value.astype("float32")
        plan.append((visit, spec))
        factors[visit.path] = values
    return plan, factors


def match_owned(model, config, tensors, file, paths):
    """`{model key: array}` of the owned values, checked against `model`."""
    keys = {}
    for key in config["owned"]:
        layer_path, _, weight = key.rpartition("/")
        keys[key] = f"{paths.require(layer_path)}/{weight}"
    try:
        variables = owned.resolve(model, list(keys.values()))
    except ValueError as error:
        raise ValueError(
            f"keras_lowrank: adapter file '{file}' does not fit model "
            f"'{model.name}': {str(error).replace('keras_lowrank: ', '')}"
        ) from None
    values = {}
    for key, entry in config["owned"].items():
        tensor = entry["name"]
        if tensor not in tensors:
            raise ValueError(
                f"keras_lowrank: adapter file '{file}' has no tensor for the "
                f"owned weight '{key}'; the file is incomplete."
            )
        value = tensors[tensor]
        variable = variables[keys[key]]
        if tuple(value.shape) != tuple(variable.shape):
            raise ValueError(
                f"keras_lowrank: adapter file '{file}': shape mismatch for "
                f"'{key}': {tuple(value.shape)} in the file, "
                f"{tuple(variable.shape)} in the model."
            )
        dtype = keras.backend.standardize_dtype(variable.dtype)
        values[keys[key]] = np.asarray(
            keras.ops.convert_to_numpy(keras.ops.cast(value, dtype))
        )
    return values
