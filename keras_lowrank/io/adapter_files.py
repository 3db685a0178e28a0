"""Adapter-only files: one adapter in one small file.

Layout: a single [safetensors](https://github.com/huggingface/safetensors)
file. Its tensors are the adapter's factors, keyed by layer path
(`"<path>/A"`, `"<path>/B"`, and `"<path>/magnitude"` for DoRA), and the
values the adapter owns (`"owned/<path>/<weight>"`: a task head's kernel,
biases it trains). Its header's `__metadata__` holds one entry,
`"keras_lowrank_adapter"`, a JSON document:

- `format` (`"keras_lowrank.adapter"`), `format_version` (1),
  `keras_lowrank_version`, `keras_version`, `backend` (the saving one);
- `name` and `adapter`: the adapter's name and its `adapt()` options (rank,
  alpha, scaling, method, init, dropout, bias, targets, exclude, trainable,
  rank/alpha patterns);
- `dtype` of the factors (float32), `layers`: per layer path its adapter
  class, base kernel shape and dtype, the per-layer options and each tensor's
  name and shape; `kept` (layers trained fully) and `owned` (each owned
  weight's tensor name, shape and dtype);
- `fingerprint`: a SHA-256 over the adapted layers' paths and kernel shapes,
  the identity of the base architecture the adapter fits;
- `tensors_sha256`: a SHA-256 over every tensor (name, dtype, shape, bytes),
  so a corrupt file is refused rather than loaded.

Why one file rather than PEFT's folder (`adapter_config.json` +
`adapter_model.safetensors`): the config cannot be separated from its
tensors, one `os.replace` makes the write atomic, and any safetensors reader
still opens it. Loading parses JSON and raw tensors only: no pickle, no code
from the file runs. (PEFT folders: see `load_peft_adapter`.)
"""

import hashlib
import json
import os
import re
import tempfile

import keras
import numpy as np

from keras_lowrank.state import owned
from keras_lowrank.layers import adapter_class_for
from keras_lowrank.state.model_state import adapted_visits
from keras_lowrank.state.model_state import state_of
from keras_lowrank.spec import AdapterSpec
from keras_lowrank.spec import check_adapter_name
from keras_lowrank.version import __version__
from keras_lowrank.surgery.walk import walk

FORMAT = "keras_lowrank.adapter"
FORMAT_VERSION = 1
METADATA_KEY = "keras_lowrank_adapter"
_OPTION_KEYS = (
    "rank", "alpha", "scaling", "method", "init", "dropout", "bias", "targets",
    "exclude", "trainable", "rank_pattern", "alpha_pattern", "combined",
)


def save_adapter(model, path, name=None):
    """Writes adapter `name` of `model` to the file `path`, atomically.

    The file holds the adapter's factors and the values it owns (biases it
    trains, layers it keeps trainable such as a KerasHub task head), keyed by
    layer path, and a JSON config (see the module docstring). It is a few
    hundred kilobytes for a rank-8 adapter on a small BERT, against ~90 MB
    for the base weights. The file appears complete under `path` or not at
    all: it is written to a temporary file in the same folder, flushed to
    disk, then renamed over `path`.

    Args:
        model: an adapted model.
        path: the file to write (any name; `.safetensors` lets other tools
            recognise it).
        name: the adapter to save; default: the model's only adapter, or its
            only active one.

    Returns:
        `path`.

    Example:

    >>> import keras, keras_lowrank, os, tempfile
    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(8),
    ...                           keras.layers.Dense(2)])
    >>> _ = keras_lowrank.adapt(model, rank=2, name="task")
    >>> path = os.path.join(tempfile.mkdtemp(), "task.safetensors")
    >>> _ = keras_lowrank.save_adapter(model, path)
    >>> keras_lowrank.read_adapter_config(path)["name"]
    'task'
    """
    safetensors_numpy = _safetensors_numpy()
    state = state_of(model)
    name = _pick_name(model, state, name)
    options = state.options[name]
    layers, tensors = {}, {}
    for visit in adapted_visits(model):
        layer = visit.layer
        if name not in layer.adapter_names:
            continue
        # PiSSA/OLoRA factors are relative to the residual kernel they left
        # behind; the file holds their exact equivalent on the original
        # kernel (a plain rank-2r adapter), so it applies to the base model.
        spec, values = layer.adapter_for_original_kernel(name)
        layout = layer.lowrank_layout
        entry = {
            "class_name": type(layer).__name__,
            "kernel_shape": list(layout.kernel_shape),
            "kernel_dtype": keras.backend.standardize_dtype(
                layer._kernel_variable().dtype
            ),
            "spec": spec.get_config(),
            "tensors": {},
        }
        original_init = layer.adapter_spec(name).init
        if original_init != spec.init:
            entry["converted_from"] = {
                "init": original_init,
                "rank": layer.adapter_spec(name).rank,
            }
        for key, value in values.items():
            tensor = f"{visit.path}/{key}"
            tensors[tensor] = np.ascontiguousarray(
                keras.ops.convert_to_numpy(value), dtype="float32"
            )
            entry["tensors"][key] = {"name": tensor, "shape": list(value.shape)}
        layers[visit.path] = entry
    owned_entries = {}
    for key in options.get("owned", []):
        value = owned.value_of(model, state, name, key)
        dtype = keras.backend.standardize_dtype(value.dtype)
        if dtype == "bfloat16":  # NumPy safetensors has no bfloat16
            value = value.astype("float32")
        tensor = f"owned/{key}"
        tensors[tensor] = np.ascontiguousarray(value)
        owned_entries[key] = {"name": tensor, "shape": list(value.shape), "dtype": dtype}
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "keras_lowrank_version": __version__,
        "keras_version": keras.__version__,
        "backend": keras.backend.backend(),
        "name": name,
        "adapter": {k: options[k] for k in _OPTION_KEYS if k in options},
        "dtype": "float32",
        "fingerprint": fingerprint(
            {p: e["kernel_shape"] for p, e in layers.items()}
        ),
        "layers": layers,
        "kept": list(options.get("kept", [])),
        "owned": owned_entries,
        "tensors_sha256": _digest(tensors),
    }
    data = safetensors_numpy.save(
        tensors, metadata={METADATA_KEY: json.dumps(config)}
    )
    _atomic_write(os.fspath(path), data)
    return path


def load_adapter(model, path, name=None):
    """Loads an adapter file written by `save_adapter` into `model`.

    - Into a model without that adapter (a fresh base model, or one with
      other adapters): re-creates exactly the recorded adapter on the
      recorded layer paths (not `adapt()`'s defaults), with the recorded
      options, values and owned layers; it becomes the only active adapter,
      as after `adapt()`.
    - Into a model that already has an adapter of that name with the same
      layers and options: replaces its values (a merged adapter is re-merged
      with its new values); which adapters are active does not change.

    Layers are found by path, the chain of layer names. A name Keras
    numbered automatically may differ in this session (`bert_backbone_1`
    for a preset loaded a second time): a missing path component matches
    the one sibling that differs from it only by such a number.

    All-or-nothing: the whole file is read and checked against the model
    before anything changes. A missing, truncated or corrupt file, an unknown
    format version, a file for another architecture (a layer path the model
    lacks, another kernel shape, another layer type), or inconsistent shapes
    raise an error naming the file and the layer, and leave the model
    exactly as it was.

    Args:
        model: a built model, adapted or not.
        path: the adapter file.
        name: the adapter's name in `model`; default: the name it was saved
            under.

    Returns:
        `model`.

    Example:

    >>> import keras, keras_lowrank, numpy as np, os, tempfile
    >>> def build():  # explicit names: the same paths in every model
    ...     keras.utils.set_random_seed(0)
    ...     return keras.Sequential([keras.Input((8,)),
    ...                              keras.layers.Dense(8, name="hidden"),
    ...                              keras.layers.Dense(2, name="out")])
    >>> model = keras_lowrank.adapt(build(), rank=2, name="task")
    >>> path = os.path.join(tempfile.mkdtemp(), "task.safetensors")
    >>> _ = keras_lowrank.save_adapter(model, path)
    >>> fresh = keras_lowrank.load_adapter(build(), path)
    >>> fresh.get_layer("hidden").adapter_names
    ['task']
    >>> x = np.ones((1, 8), "float32")
    >>> same = keras.ops.convert_to_numpy(fresh(x) - model(x))
    >>> bool(np.abs(same).max() <= 1e-6)
    True
    """
    config, tensors = _read(path)
    file = os.fspath(path)
    name = config["name"] if name is None else name
    check_adapter_name(name)
    paths = _PathMap(model, config, file)
    plan, factors = _match_layers(model, config, tensors, file, paths)
    values = _match_owned(model, config, tensors, file, paths)
    kept = [paths.require(path) for path in config["kept"]]
    state = state_of(model, required=False)
    if state is not None and name in state.options:
        _replace_values(model, state, name, plan, factors, values, config, file)
        return model
    from keras_lowrank.surgery.adapt import _check_kept_paths
    from keras_lowrank.surgery.adapt import _check_plan
    from keras_lowrank.surgery.adapt import install

    _check_plan(model, plan, name)
    _check_kept_paths(model, kept, plan)
    record = dict(config["adapter"])
    record["layers"] = [visit.path for visit, _ in plan]
    record["kept"] = kept
    record["owned"] = list(values)
    install(model, name, plan, record, factors=factors, owned_values=values)
    return model


def read_adapter_config(path):
    """The JSON config of an adapter file (see the module docstring), after
    checking the whole file; loads nothing into any model.

    Args:
        path: an adapter file written by `save_adapter`.

    Returns:
        A dict.
    """
    return _read(path)[0]


def fingerprint(kernel_shapes):
    """`"sha256:<hex>"` over `{layer path: kernel shape}`: which base
    architecture an adapter fits (the paths and shapes it adapts)."""
    items = sorted((path, [int(n) for n in shape]) for path, shape in kernel_shapes.items())
    text = json.dumps(items, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


# --- saving -------------------------------------------------------------------


def _pick_name(model, state, name):
    if name is not None:
        if name not in state.options:
            raise ValueError(
                f"keras_lowrank: model '{model.name}' has no adapter named "
                f"{name!r}; it has {sorted(state.options)}."
            )
        return name
    if len(state.options) == 1:
        return next(iter(state.options))
    if len(state.active) == 1:
        return state.active[0]
    raise ValueError(
        f"keras_lowrank: model '{model.name}' has adapters "
        f"{sorted(state.options)} ({len(state.active)} active); say which "
        "one to save: save_adapter(model, path, name='...')."
    )


def _digest(tensors):
    sha = hashlib.sha256()
    for key in sorted(tensors):
        value = np.ascontiguousarray(tensors[key])
        sha.update(key.encode())
        sha.update(str(value.dtype).encode())
        sha.update(str(tuple(value.shape)).encode())
        sha.update(value.tobytes())
    return sha.hexdigest()


def _atomic_write(path, data):
    """Writes `data` to `path` so that `path` is either the old file or the
    complete new one, never a partial file: temporary file in the same
    folder, flush and fsync, then `os.replace`."""
    if os.path.isdir(path):
        raise ValueError(
            f"keras_lowrank: '{path}' is a folder; save_adapter writes a "
            "single file. Pass a file name such as 'task.safetensors'."
        )
    folder = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(
        dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp"
    )
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        mode = os.stat(path).st_mode & 0o777 if os.path.exists(path) else 0o644
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    try:  # make the rename itself durable (POSIX); harmless where unsupported
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


# --- loading -----------------------------------------------------------------


def _read(path):
    """`(config, tensors)` of an adapter file, after checking it whole."""
    file = os.fspath(path)
    if not os.path.exists(file):
        raise FileNotFoundError(
            f"keras_lowrank: adapter file '{file}' does not exist."
        )
    if os.path.isdir(file):
        raise ValueError(
            f"keras_lowrank: '{file}' is a folder, not an adapter file. "
            "keras_lowrank adapter files are single files written by "
            "save_adapter(); for a Hugging Face PEFT adapter folder use "
            "keras_lowrank.load_peft_adapter()."
        )
    with open(file, "rb") as handle:
        data = handle.read()

    def unreadable(why):
        return ValueError(
            f"keras_lowrank: adapter file '{file}' cannot be read: {why}. It "
            "is truncated, corrupt or not an adapter file; write it again "
            "with keras_lowrank.save_adapter()."
        )

    if len(data) < 8:
        raise unreadable(f"it holds {len(data)} bytes, fewer than a header")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise unreadable(
            f"its header announces {size} bytes but only {len(data) - 8} follow"
        )
    try:
        header = json.loads(data[8 : 8 + size])
        metadata = header.get("__metadata__") or {}
    except (ValueError, AttributeError):
        raise unreadable("its header is not valid safetensors JSON") from None
    if METADATA_KEY not in metadata:
        raise ValueError(
            f"keras_lowrank: '{file}' is a safetensors file without a "
            "keras_lowrank adapter config (it was not written by "
            "save_adapter). For a Hugging Face PEFT adapter use "
            "keras_lowrank.load_peft_adapter()."
        )
    try:
        config = json.loads(metadata[METADATA_KEY])
    except ValueError:
        raise unreadable("its adapter config is not valid JSON") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise unreadable("its config does not describe a keras_lowrank adapter")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"keras_lowrank: adapter file '{file}' has format version "
            f"{version!r}; this keras_lowrank ({__version__}) reads version "
            f"{FORMAT_VERSION}. Upgrade keras_lowrank to load it, or save the "
            "adapter again with this version."
        )
    try:
        tensors = _safetensors_numpy().load(data)
    except Exception as error:  # safetensors raises its own error types
        raise unreadable(f"its tensors cannot be decoded ({error})") from None
    if _digest(tensors) != config.get("tensors_sha256"):
        raise unreadable("its tensors do not match the checksum in its config")
    for key in ("name", "adapter", "layers", "kept", "owned", "fingerprint"):
        if key not in config:
            raise unreadable(f"its config has no {key!r} entry")
    return config, tensors


def _match_layers(model, config, tensors, file, paths):
    """Checks the file's layers against `model`; returns the install plan
    `[(visit, spec)]` and the factors `{model path: {key: array}}`."""
    recorded = {path: entry["kernel_shape"] for path, entry in config["layers"].items()}
    if fingerprint(recorded) != config["fingerprint"]:
        raise ValueError(
            f"keras_lowrank: adapter file '{file}' is inconsistent: its layers "
            "do not match its own fingerprint. Write it again with "
            "keras_lowrank.save_adapter()."
        )
    actual = {}
    for path, entry in config["layers"].items():
        visit = paths.visit(path)
        cls = adapter_class_for(visit.layer) if visit is not None else None
        if visit is None or cls is None or not visit.layer.built:
            why = (
                f"model '{model.name}' has no layer '{path}'{paths.hint(path)}"
                if visit is None
                else f"layer '{path}' is a {type(visit.layer).__name__}, which "
                "cannot hold adapters"
                if cls is None
                else f"layer '{path}' is not built"
            )
            raise _architecture_error(file, model, why, config, actual)
        if cls.__name__ != entry["class_name"]:
            why = (
                f"layer '{path}' would be a {cls.__name__} here but was a "
                f"{entry['class_name']} when saved"
            )
            raise _architecture_error(file, model, why, config, actual)
        shape = list(cls.kernel_layout(visit.layer).kernel_shape)
        actual[path] = shape
        if shape != entry["kernel_shape"]:
            why = (
                f"layer '{path}' has a kernel of shape {tuple(shape)} here but "
                f"{tuple(entry['kernel_shape'])} in the file"
            )
            raise _architecture_error(file, model, why, config, actual)
    plan, factors = [], {}
    for path, entry in config["layers"].items():
        visit = paths.visit(path)
        cls = adapter_class_for(visit.layer)
        try:
            spec = AdapterSpec.from_config(entry["spec"])
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"keras_lowrank: adapter file '{file}': layer '{path}': {error}"
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


def _architecture_error(file, model, why, config, actual):
    return ValueError(
        f"keras_lowrank: adapter file '{file}' does not fit model "
        f"'{model.name}': {why}. The adapter was saved from another "
        f"architecture (file fingerprint {config['fingerprint'][:19]}...); "
        "load it into the base model it was trained on."
    )


def _match_owned(model, config, tensors, file, paths):
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
        tensor = entry.get("name")
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


class _PathMap:
    """Finds the model's layer for each layer path recorded in a file.

    Paths are chains of layer names. Keras numbers the names it makes up per
    session: a KerasHub preset loaded twice in one process has a
    `bert_backbone` and then a `bert_backbone_1`. So a path component that
    is missing matches the one sibling whose name differs from it only by
    such a number (`_<digits>` at the end, or none); several candidates match
    none (give your layers explicit names then). Two file paths may not end
    on the same layer.
    """

    def __init__(self, model, config, file):
        self.file = file
        self.model = model
        self.visits = {visit.path: visit for visit in walk(model)}
        self.children = {}
        for path in self.visits:
            parent, _, name = path.rpartition("/")
            self.children.setdefault(parent, []).append(name)
        self.cache = {"": ""}
        self.ambiguous = {}
        seen = {}
        for path in list(config["layers"]) + list(config["kept"]) + [
            key.rpartition("/")[0] for key in config["owned"]
        ]:
            found = self.find(path)
            if found is not None and seen.setdefault(found, path) != path:
                raise ValueError(
                    f"keras_lowrank: adapter file '{file}' does not fit model "
                    f"'{model.name}': its layers '{seen[found]}' and '{path}' "
                    f"would both be layer '{found}'. Give the layers explicit "
                    "names, identical to the ones the adapter was saved with."
                )

    def find(self, path):
        """The model path for the file's `path`, or `None`."""
        if path in self.cache:
            return self.cache[path]
        parent, _, name = path.rpartition("/")
        found = self.find(parent)
        if found is not None:
            siblings = self.children.get(found, [])
            if name not in siblings:
                stem = _stem(name)
                matches = [s for s in siblings if _stem(s) == stem]
                if len(matches) > 1:
                    self.ambiguous[path] = matches
                name = matches[0] if len(matches) == 1 else None
            if name is not None:
                found = f"{found}/{name}" if found else name
            else:
                found = None
        self.cache[path] = found
        return found

    def visit(self, path):
        found = self.find(path)
        return None if found is None else self.visits[found]

    def require(self, path):
        found = self.find(path)
        if found is None:
            raise ValueError(
                f"keras_lowrank: adapter file '{self.file}' does not fit "
                f"model '{self.model.name}': model '{self.model.name}' has no "
                f"layer '{path}'{self.hint(path)}."
            )
        return found

    def hint(self, path):
        for missing, matches in self.ambiguous.items():
            if path == missing or path.startswith(missing + "/"):
                return (
                    f" ('{missing.rpartition('/')[2]}' could be any of "
                    f"{sorted(matches)}: Keras numbered these automatically; "
                    "give the layers explicit names)"
                )
        return ""


def _stem(name):
    return re.sub(r"_\d+$", "", name)


def _replace_values(model, state, name, plan, factors, values, config, file):
    """Puts the file's values into `model`'s existing adapter `name`."""
    mine = {
        visit.path: visit.layer
        for visit in adapted_visits(model)
        if name in visit.layer.adapter_names
    }
    if set(mine) != set(factors):
        extra = sorted(set(mine) ^ set(factors))[0]
        raise ValueError(
            f"keras_lowrank: model '{model.name}' already has an adapter "
            f"{name!r}, but on other layers than the one in '{file}' (layer "
            f"'{extra}' differs). Load it under another name "
            f"(load_adapter(model, path, name='...')) or delete_adapter "
            "first."
        )
    for visit, spec in plan:
        current = mine[visit.path].adapter_spec(name)
        if current.replace(init=spec.init) != spec:
            raise ValueError(
                f"keras_lowrank: layer '{visit.path}': adapter {name!r} has "
                f"options {current.get_config()} in the model but "
                f"{spec.get_config()} in '{file}'. Load it under another "
                "name, or delete_adapter first."
            )
    if set(state.options[name].get("owned", [])) != set(values):
        raise ValueError(
            f"keras_lowrank: adapter {name!r} owns other weights in the model "
            f"({sorted(state.options[name].get('owned', []))}) than in "
            f"'{file}' ({sorted(values)}). Load it under another name, or "
            "delete_adapter first."
        )
    import copy

    saved_state = copy.deepcopy(state)
    saved = []
    for path, layer in mine.items():
        variables = list(layer.adapter_variables(name).values())
        if name in layer.merged_adapters:
            variables.append(layer._kernel_variable())
        saved += [(v, keras.ops.convert_to_numpy(v)) for v in variables]
    live = [k for k in values if state.holders.get(k, owned.BASE) == name]
    saved += [
        (v, keras.ops.convert_to_numpy(v))
        for v in owned.resolve(model, live).values()
    ]
    merged = {path: list(layer.merged_adapters) for path, layer in mine.items()}
    try:
        for path, layer in mine.items():
            was_merged = name in layer.merged_adapters
            if was_merged:
                layer.unmerge([name])
            variables = layer.adapter_variables(name)
            for key, value in factors[path].items():
                variables[key].assign(value)
            if was_merged:
                layer.merge([name])
        for key, value in values.items():
            owned.set_value(model, state, name, key, value)
    except BaseException:
        for variable, value in saved:
            variable.assign(value)
        for path, layer in mine.items():
            layer.restore_state(layer.active_adapters, merged[path])
        model._keras_lowrank = saved_state
        raise


def _safetensors_numpy():
    try:
        import safetensors.numpy
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError(
            "keras_lowrank: adapter files need the `safetensors` package: "
            "pip install safetensors (or keras-lowrank[io])."
        ) from None
    return safetensors.numpy
