"""Adapter-only files: one adapter in one small file.

Layout: a single [safetensors](https://github.com/huggingface/safetensors)
file. Its tensors are the adapter's factors, keyed by layer path
(`"<path>/A"`, `"<path>/B"`, and `"<path>/magnitude"` for DoRA), and the
values the adapter owns (`"owned/<path>/<weight>"`: a task head's kernel,
biases it trains). Its header holds a JSON config with the adapter's name,
its `adapt()` options, per layer its kernel shape and options, and
checksums over the config and the tensors: see
`keras_lowrank.io.adapter_format`. How file entries find their layers:
`keras_lowrank.io.layer_match`.

Why one file rather than PEFT's folder (`adapter_config.json` +
`adapter_model.safetensors`): the config cannot be separated from its
tensors, one `os.replace` makes the write atomic, and any safetensors reader
still opens it. Loading parses JSON and raw tensors only: no pickle, no code
from the file runs. (PEFT folders: see `load_peft_adapter`.)
"""

import keras
import numpy as np

from keras_lowrank.errors import check_known_adapter
from keras_lowrank.io import adapter_format
from keras_lowrank.io import keras_file
from keras_lowrank.integrations import moe
from keras_lowrank.io import layer_match
from keras_lowrank.io import safetensors_io
from keras_lowrank.io.adapter_format import fingerprint  # noqa: F401 (public)
from keras_lowrank.spec import check_adapter_name
from keras_lowrank.state import owned
from keras_lowrank.state import stacks
from keras_lowrank.state.model_state import adapted_visits
from keras_lowrank.state.model_state import state_of
from keras_lowrank.state.transaction import transaction
from keras_lowrank.version import __version__

_FIX = "write it again with keras_lowrank.save_adapter()"
_FOLDER_FIX = (
    "keras_lowrank adapter files are single files written by "
    "save_adapter(); for a Hugging Face PEFT adapter folder use "
    "keras_lowrank.load_peft_adapter()."
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
    file = safetensors_io.check_path(path, "path", "save_adapter(model, path)")
    with transaction(model, "save_adapter", read_only=True):
        state = keras_file.adopt(model) or state_of(model)
        name = _pick_name(model, state, name)
        config, tensors = _contents(model, state, name)
    safetensors_io.save_tensors(
        file, tensors, adapter_format.encode_config(config), what="adapter file",
        fix="Create the folder first, or save the adapter elsewhere.",
    )
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

    Layers are found by path, the chain of layer names. Names Keras
    numbered automatically may differ in this session (`bert_backbone_1`
    for a preset loaded a second time): they match when the layers around
    them are the same in number, class and order; a file for other layers
    (`transformer_layer_3` of a deeper model, `dense_2` of a bigger one) is
    refused, naming every layer path that matches nothing here (see
    `keras_lowrank.io.layer_match`).

    All-or-nothing: the whole file is read and checked against the model
    before anything changes. A missing, truncated or corrupt file, an unknown
    format version, a file for another architecture (a layer path the model
    lacks, another kernel shape, another layer type), or inconsistent shapes
    raise an error naming the file and the layer, and leave the model
    exactly as it was. So does an edited file: its config and tensors are
    covered by checksums.

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
    file = safetensors_io.check_path(path, "path", "load_adapter(model, path)")
    config, tensors = _read(file)
    name = config["name"] if name is None else name
    check_adapter_name(name)
    # MoE expert kernels are layers of their own while a verb runs.
    with moe.prepared(model):
        return _load(model, file, config, tensors, name)


def _load(model, file, config, tensors, name):
    paths = layer_match.PathMap(model, config, file)
    plan, factors = layer_match.match_layers(model, config, tensors, file, paths)
    values = layer_match.match_owned(model, config, tensors, file, paths)
    kept = [paths.require(path) for path in config["kept"]]
    state = keras_file.adopt(model)  # a clone_model copy has no state yet
    if state is not None and name in state.options:
        _replace_values(model, state, name, plan, factors, values, config, file)
        return model
    from keras_lowrank.surgery.adapt_checks import check_kept_paths
    from keras_lowrank.surgery.adapt_checks import check_plan
    from keras_lowrank.surgery.adapt import install

    check_plan(model, plan, name)
    check_kept_paths(model, kept, plan)
    record = dict(config["adapter"])
    record["layers"] = [visit.path for visit, _ in plan]
    record["kept"] = kept
    record["owned"] = list(values)
    install(
        model, name, plan, record, factors=factors, owned_values=values,
        verb="load_adapter",
    )
    return model


def read_adapter_config(path):
    """The JSON config of an adapter file (see
    `keras_lowrank.io.adapter_format`), after checking the whole file; loads
    nothing into any model.

    Args:
        path: an adapter file written by `save_adapter`.

    Returns:
        A dict.

    Example:

    >>> import keras, keras_lowrank, os, tempfile
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4),
    ...                           keras.layers.Dense(2)])
    >>> _ = keras_lowrank.adapt(model, rank=2, alpha=4)
    >>> path = os.path.join(tempfile.mkdtemp(), "a.safetensors")
    >>> _ = keras_lowrank.save_adapter(model, path)
    >>> keras_lowrank.read_adapter_config(path)["adapter"]["alpha"]
    4.0
    """
    file = safetensors_io.check_path(path, "path", "read_adapter_config(path)")
    return _read(file)[0]


# --- saving -------------------------------------------------------------------


def _contents(model, state, name):
    """`(config, tensors)` of adapter `name`'s file."""
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
    kept = list(options.get("kept", []))
    recorded = list(layers) + kept + [key.rpartition("/")[0] for key in owned_entries]
    config = {
        "format": adapter_format.FORMAT,
        "format_version": adapter_format.FORMAT_VERSION,
        "keras_lowrank_version": __version__,
        "keras_version": keras.__version__,
        "backend": keras.backend.backend(),
        "name": name,
        "adapter": {k: options[k] for k in adapter_format.OPTION_KEYS if k in options},
        "dtype": "float32",
        "fingerprint": fingerprint(
            {p: e["kernel_shape"] for p, e in layers.items()}
        ),
        "layers": layers,
        "kept": kept,
        "owned": owned_entries,
        "siblings": layer_match.siblings(model, recorded),
        "tensors_sha256": adapter_format.digest(tensors),
    }
    return config, tensors


# --- loading -----------------------------------------------------------------


def _read(file):
    """`(config, tensors)` of an adapter file, after checking it whole."""
    metadata, tensors = safetensors_io.load_tensors(
        file, what="adapter file", fix=_FIX, data=safetensors_io.read_bytes(
            file, what="adapter file", fix=_FOLDER_FIX
        ),
    )
    return adapter_format.decode_config(metadata, tensors, file), tensors



def _pick_name(model, state, name):
    if name is not None:
        return check_known_adapter(
            model, name, state.options, "save_adapter", "name"
        )
    if len(state.options) == 1:
        return next(iter(state.options))
    if len(state.active) == 1:
        return state.active[0]
    raise ValueError(
        f"keras_lowrank: model '{model.name}' has adapters "
        f"{sorted(state.options)} ({len(state.active)} active); say which "
        "one to save: save_adapter(model, path, name='...')."
    )


def _fit_to_slot(layer, name, spec, factors, path, file):
    """The file's factors for the existing adapter `name` of `layer`: as they
    are when the options agree, else (a hot-swap into a larger slot) `A` and
    `B` padded with zeros to the slot's rank and the file's scale folded into
    `B`, so `s_slot·A'·B' = s_file·A·B` exactly and the traced graph, which
    depends on the slot's rank and scale only, stays valid."""
    current = layer.adapter_spec(name)
    if current.replace(init=spec.init) == spec:
        return factors
    same_kind = current.replace(
        init=spec.init, rank=spec.rank, alpha=spec.alpha, scaling=spec.scaling
    ) == spec
    if not same_kind or spec.rank > current.rank or set(factors) != {"A", "B"}:
        raise ValueError(
            f"keras_lowrank: layer '{path}': adapter {name!r} has options "
            f"{current.get_config()} in the model but {spec.get_config()} in "
            f"'{file}'. A file loads into an existing adapter when every "
            "option but rank, alpha and scaling agrees and its rank is at "
            "most the adapter's (it is padded with zeros); otherwise load it "
            "under another name, or delete_adapter first."
        )
    layout = layer.lowrank_layout
    pad = current.rank - spec.rank
    a = np.asarray(factors["A"])
    b = np.asarray(factors["B"]).astype(np.float64) * (spec.scale / current.scale)
    a = np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, pad)])
    widths = [(0, 0)] * b.ndim
    widths[len(layout.batch_shape)] = (0, pad)
    return {"A": a, "B": np.pad(b, widths).astype(np.asarray(factors["B"]).dtype)}


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
    factors = {
        visit.path: _fit_to_slot(
            mine[visit.path], name, spec, factors[visit.path], visit.path, file
        )
        for visit, spec in plan
    }
    if set(state.options[name].get("owned", [])) != set(values):
        raise ValueError(
            f"keras_lowrank: adapter {name!r} owns other weights in the model "
            f"({sorted(state.options[name].get('owned', []))}) than in "
            f"'{file}' ({sorted(values)}). Load it under another name, or "
            "delete_adapter first."
        )
    merging = [layer for layer in mine.values() if name in layer.merged_adapters]
    live = [k for k in values if state.holders.get(k, owned.BASE) == name]
    with transaction(
        model, "load_adapter", kernels=merging,
        variables=owned.resolve(model, live).values(), while_stacked=True,
    ):
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
        stacks.refill(model, name)  # a stacked model serves the new values
