"""The adapter-file format: its JSON config, checksums and how it is checked.

A file is one safetensors file (see `keras_lowrank.io.adapter_files`). Its
header's `__metadata__` holds two entries:

- `"keras_lowrank_adapter"`: the config, a JSON document (below);
- `"keras_lowrank_adapter_sha256"`: the SHA-256 of exactly that JSON text.
  The config holds `tensors_sha256`, a SHA-256 over every tensor, so the two
  cover the whole file: an edited option (an alpha changed by hand) or a
  corrupt tensor is refused, not loaded.

The config (format version 2):

- `format` (`"keras_lowrank.adapter"`), `format_version`,
  `keras_lowrank_version`, `keras_version`, `backend` (the saving one);
- `name` and `adapter`: the adapter's name and its `adapt()` options;
- `dtype` of the factors (float32), `layers`: per layer path its adapter
  class, base kernel shape and dtype, the per-layer options (`spec`) and
  each tensor's name and shape; `kept` (layers trained fully) and `owned`
  (each owned weight's tensor name, shape and dtype);
- `siblings`: for every layer that contains a recorded path (and the model
  itself, `""`), its direct sublayers as `[name, class]`: what lets a load
  recognise names Keras numbered differently in another session, and only
  those (see `keras_lowrank.io.layer_match`);
- `fingerprint`: a SHA-256 over the adapted layers' paths and kernel shapes;
- `tensors_sha256`.

Version 1 (keras_lowrank 0.1) had no checksum over its config; such files
are refused with a message saying so.
"""

import hashlib
import json

import numpy as np

from keras_lowrank.version import __version__

FORMAT = "keras_lowrank.adapter"
FORMAT_VERSION = 2
METADATA_KEY = "keras_lowrank_adapter"
CHECKSUM_KEY = "keras_lowrank_adapter_sha256"
OPTION_KEYS = (
    "rank", "alpha", "scaling", "method", "init", "dropout", "bias", "targets",
    "exclude", "trainable", "rank_pattern", "alpha_pattern", "combined",
    "trainable_tokens",
)


def fingerprint(kernel_shapes):
    """`"sha256:<hex>"` over `{layer path: kernel shape}`: which base
    architecture an adapter fits (the paths and shapes it adapts).

    Args:
        kernel_shapes: `{layer path: kernel shape}`.

    Returns:
        A string.

    Example:

    >>> from keras_lowrank.io.adapter_format import fingerprint
    >>> fingerprint({"d1": (8, 16)})[:7]
    'sha256:'
    """
    items = sorted((path, [int(n) for n in shape]) for path, shape in kernel_shapes.items())
    text = json.dumps(items, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def digest(tensors):
    """SHA-256 hex over every tensor's name, dtype, shape and bytes."""
    sha = hashlib.sha256()
    for key in sorted(tensors):
        value = np.ascontiguousarray(tensors[key])
        sha.update(key.encode())
        sha.update(str(value.dtype).encode())
        sha.update(str(tuple(value.shape)).encode())
        sha.update(value.tobytes())
    return sha.hexdigest()


def encode_config(config):
    """The header metadata for `config`: its JSON text and that text's
    checksum."""
    text = json.dumps(config)
    return {METADATA_KEY: text, CHECKSUM_KEY: _sha256(text)}


def decode_config(metadata, tensors, file):
    """The checked config of an adapter file, from its header `metadata`
    and `tensors`; every problem is a `ValueError` naming `file`."""

    def unreadable(why):
        return ValueError(
            f"keras_lowrank: adapter file '{file}' cannot be read: {why}. It "
            "is truncated, corrupt, edited by hand or not an adapter file; "
            "write it again with keras_lowrank.save_adapter()."
        )

    if METADATA_KEY not in metadata:
        raise ValueError(
            f"keras_lowrank: '{file}' is a safetensors file without a "
            "keras_lowrank adapter config (it was not written by "
            "save_adapter). For a Hugging Face PEFT adapter use "
            "keras_lowrank.load_peft_adapter()."
        )
    text = metadata[METADATA_KEY]
    try:
        config = json.loads(text)
    except ValueError:
        raise unreadable("its adapter config is not valid JSON") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise unreadable("its config does not describe a keras_lowrank adapter")
    version = config.get("format_version")
    if version == 1:
        raise ValueError(
            f"keras_lowrank: adapter file '{file}' has format version 1 "
            "(keras_lowrank 0.1), whose config carries no checksum, so an "
            f"edited file cannot be told from a good one; this keras_lowrank "
            f"({__version__}) reads version {FORMAT_VERSION}. Load it with "
            "keras_lowrank 0.1 and save it again with this version."
        )
    if version != FORMAT_VERSION:
        raise ValueError(
            f"keras_lowrank: adapter file '{file}' has format version "
            f"{version!r}; this keras_lowrank ({__version__}) reads version "
            f"{FORMAT_VERSION}. Upgrade keras_lowrank to load it, or save the "
            "adapter again with this version."
        )
    if metadata.get(CHECKSUM_KEY) != _sha256(text):
        raise unreadable("its config does not match the config checksum in its header")
    if digest(tensors) != config.get("tensors_sha256"):
        raise unreadable("its tensors do not match the checksum in its config")
    problem = _schema_problem(config)
    if problem:
        raise unreadable(f"its config is malformed: {problem}")
    recorded = {path: entry["kernel_shape"] for path, entry in config["layers"].items()}
    if fingerprint(recorded) != config["fingerprint"]:
        raise ValueError(
            f"keras_lowrank: adapter file '{file}' is inconsistent: its layers "
            "do not match its own fingerprint. Write it again with "
            "keras_lowrank.save_adapter()."
        )
    return config


def _sha256(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --- the schema ---------------------------------------------------------------
# Checked after the checksums, so that a file written by a buggy or foreign
# writer with valid checksums still fails with a message, not a KeyError.


def _schema_problem(config):
    """A description of the first thing wrong with `config`'s structure, or
    `None`."""
    for key, kind in (
        ("name", str), ("adapter", dict), ("layers", dict), ("kept", list),
        ("owned", dict), ("fingerprint", str), ("siblings", dict),
    ):
        if key not in config:
            return f"it has no {key!r} entry"
        if not isinstance(config[key], kind):
            return f"{key!r} is a {type(config[key]).__name__}, not a {kind.__name__}"
    for path, entry in config["layers"].items():
        where = f"layers[{path!r}]"
        problem = _entry_problem(entry, where, {
            "class_name": str, "kernel_shape": list, "spec": dict, "tensors": dict,
        })
        if problem:
            return problem
        if not _is_shape(entry["kernel_shape"]):
            return f"{where}['kernel_shape'] is not a list of sizes"
        for key, tensor in entry["tensors"].items():
            problem = _tensor_problem(tensor, f"{where}['tensors'][{key!r}]")
            if problem:
                return problem
    if not all(isinstance(path, str) for path in config["kept"]):
        return "'kept' is not a list of layer paths"
    for key, tensor in config["owned"].items():
        problem = _tensor_problem(tensor, f"owned[{key!r}]")
        if problem:
            return problem
        if "/" not in key:
            return f"owned weight {key!r} is not '<layer path>/<weight>'"
    for parent, children in config["siblings"].items():
        if not isinstance(children, list) or not all(
            isinstance(c, list) and len(c) == 2 and all(isinstance(s, str) for s in c)
            for c in children
        ):
            return f"siblings[{parent!r}] is not a list of [name, class] pairs"
    return None


def _entry_problem(entry, where, fields):
    if not isinstance(entry, dict):
        return f"{where} is a {type(entry).__name__}, not an object"
    for key, kind in fields.items():
        if not isinstance(entry.get(key), kind):
            return f"{where} has no {kind.__name__} {key!r}"
    return None


def _tensor_problem(tensor, where):
    problem = _entry_problem(tensor, where, {"name": str, "shape": list})
    if problem is None and not _is_shape(tensor["shape"]):
        problem = f"{where}['shape'] is not a list of sizes"
    return problem


def _is_shape(shape):
    return all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
