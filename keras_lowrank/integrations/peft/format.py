"""The PEFT adapter folder format: its files and its `LoraConfig` rules.

Everything here is about PEFT itself, independent of Keras models: reading
and writing `adapter_config.json` and `adapter_model.safetensors` (without
PyTorch; `safetensors` is imported when used), which `LoraConfig` fields
keras_lowrank can honour, and PEFT's own rules for matching module names
(`target_modules`, `rank_pattern`). `load` and `export` map the result onto
KerasHub layers.
"""

import json
import numbers
import os
import re
import shutil
import tempfile

import numpy as np

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
KEY_PREFIX = "base_model.model."

# LoraConfig fields that change what the adapter computes. Each must hold
# one of its neutral values; anything else is refused with its reason.
_MUST_BE_NEUTRAL = {
    "fan_in_fan_out": (
        (False, None),
        "fan_in_fan_out=True is for GPT-2-style Conv1D modules, whose "
        "weights are stored transposed; none of the supported "
        "architectures has them, so the factors cannot be placed exactly",
    ),
    "lora_bias": (
        (False, None),
        "lora_bias=True adds a trainable bias to lora_B, which keras_lowrank "
        "adapters do not have",
    ),
    "use_qalora": ((False, None), "QA-LoRA pools the input before lora_A"),
    "layer_replication": (
        (None, [], ()),
        "layer_replication duplicates transformer blocks, changing the "
        "model's structure",
    ),
    "alora_invocation_tokens": (
        (None, []),
        "activated LoRA (aLoRA) applies the adapter only after invocation "
        "tokens",
    ),
    "arrow_config": ((None, {}), "Arrow routes between several adapters"),
    "use_bdlora": ((None, {}, False), "BD-LoRA uses block-diagonal factors"),
    "kasa_config": (
        (None, {}),
        "KaSA adds a diagonal between the factors and truncates the base "
        "weight",
    ),
    "monteclora_config": (
        (None, {}),
        "MonteCLoRA samples the factors",
    ),
    "megatron_config": ((None, {}), "Megatron-parallel LoRA layers"),
}

# Fields read elsewhere, or that do not change the adapter's output once its
# weights are known (they choose targets or initial values, or only the
# training pass, as VeLoRA's backward does).
_UNDERSTOOD = {
    "peft_type", "r", "lora_alpha", "lora_dropout", "target_modules",
    "exclude_modules", "rank_pattern", "alpha_pattern", "use_rslora",
    "use_dora", "bias", "modules_to_save", "init_lora_weights",
    "base_model_name_or_path", "revision", "task_type", "inference_mode",
    "auto_mapping", "peft_version", "layers_to_transform", "layers_pattern",
    "qalora_group_size", "megatron_core", "ensure_weight_tying",
    "target_parameters", "trainable_token_indices",
    "runtime_config", "eva_config", "corda_config", "lora_ga_config",
    "loftq_config", "velora_config",
}

# Initialisations whose adapters apply to the base weights as they are.
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


def fail(message, error=ValueError):
    raise error(f"keras_lowrank: {message}")


def read_config(path, verb):
    if not os.path.isdir(path):
        fail(
            f"{verb}: '{path}' is not a folder. Pass the local folder that "
            f"holds {CONFIG_FILE} and {WEIGHTS_FILE} (download Hub adapters "
            "first, e.g. with huggingface_hub.snapshot_download).",
            FileNotFoundError,
        )
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_path):
        fail(
            f"{verb}: '{path}' has no {CONFIG_FILE}; it is not a PEFT "
            "adapter folder.",
            FileNotFoundError,
        )
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as error:
        fail(f"{verb}: cannot read {config_path}: {error}.")
    if not isinstance(config, dict):
        fail(f"{verb}: {config_path} does not hold a JSON object.")
    return config


def read_weights(path, verb):
    weights = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(weights):
        pickles = [
            p for p in PICKLE_FILES if os.path.isfile(os.path.join(path, p))
        ]
        if pickles:
            fail(
                f"{verb}: '{path}' holds its weights as {pickles[0]}, a "
                "pickle, which can run code when opened; keras_lowrank reads "
                f"only {WEIGHTS_FILE}. Convert it where you trust the file: "
                "load it with peft in PyTorch and save it again with "
                "`model.save_pretrained(path, safe_serialization=True)`.",
                ValueError,
            )
        fail(
            f"{verb}: '{path}' has no {WEIGHTS_FILE}.", FileNotFoundError
        )
    safetensors = safetensors_module(verb)
    with open(weights, "rb") as f:
        data = f.read()
    try:
        entries = safetensors.deserialize(data)
    except Exception as error:  # safetensors raises its own error types
        fail(f"{verb}: cannot read {weights}: {error}.")
    return {
        name: _to_numpy(name, entry, weights, verb) for name, entry in entries
    }


_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2"}


def _to_numpy(name, entry, filename, verb):
    dtype, shape, data = entry["dtype"], entry["shape"], entry["data"]
    if dtype == "BF16":
        # bfloat16 is the top half of a float32.
        bits = np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16
        array = bits.view(np.float32)
    elif dtype in _DTYPES:
        array = np.frombuffer(data, dtype=_DTYPES[dtype]).astype(np.float32)
    else:
        fail(
            f"{verb}: tensor '{name}' in {filename} has dtype {dtype}; "
            "adapter weights must be floating point (F16, BF16, F32, F64)."
        )
    return array.reshape(shape)


def safetensors_module(verb):
    try:
        import safetensors
        import safetensors.numpy  # noqa: F401
    except ImportError:
        fail(
            f"{verb} needs the `safetensors` package to read and write "
            "PEFT adapter files. Install it: `pip install safetensors` (or "
            "`pip install keras-lowrank[io]`).",
            ImportError,
        )
    return safetensors


def check_config(config, verb):
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        fail(
            f"{verb}: peft_type {config.get('peft_type')!r} is not supported; "
            "keras_lowrank reads LoRA adapters (peft_type 'LORA', with "
            "use_dora/use_rslora) only."
        )
    for field, (neutral, reason) in _MUST_BE_NEUTRAL.items():
        value = config.get(field)
        if not _is_one_of(value, neutral):
            fail(
                f"{verb}: the adapter sets {field}={value!r}, which is not "
                f"supported: {reason}."
            )
    init = config.get("init_lora_weights", True)
    if not _is_one_of(init, _PLAIN_INITS):
        fail(
            f"{verb}: the adapter was initialised with init_lora_weights="
            f"{init!r}, which rewrites the base weights (a residual after "
            "PiSSA/OLoRA/CorDA/LoRA-GA/MiCA, a quantised base after LoftQ); "
            "its factors do not apply to the original base model. Convert "
            "it to a plain LoRA adapter in PEFT first "
            "(`save_pretrained(..., path_initial_model_for_weight_conversion"
            "=...)`)."
        )
    unknown = sorted(
        key for key, value in config.items()
        if key not in _UNDERSTOOD and key not in _MUST_BE_NEUTRAL
        and not _is_one_of(value, (None, False, {}, [], ""))
    )
    if unknown:
        fail(
            f"{verb}: the adapter sets option(s) {unknown} that this "
            "keras_lowrank version does not know, so it cannot tell whether "
            "they change the adapter's output. Upgrade keras_lowrank, or "
            "remove the option(s) from adapter_config.json if they are "
            "known to be inert."
        )
    bias = config.get("bias", "none")
    if bias not in ("none", "lora_only", "all"):
        fail(
            f"{verb}: unknown bias policy {bias!r} in the adapter; PEFT's "
            "are 'none', 'lora_only' and 'all'."
        )
    for field in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(field) or {}, dict):
            fail(f"{verb}: {field} must be a JSON object (pattern -> value).")


def _is_one_of(value, choices):
    # `==` alone would take 0 for False and 1 for True.
    return any(type(value) is type(c) and value == c for c in choices)


def pattern_value(pattern, key, default):
    """PEFT's `get_pattern_key`: the first pattern `p` with
    `re.match(rf"(.*\\.)?({p})$", key)` gives the value."""
    for candidate, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({candidate})$", key):
            return value
    return default


def file_alpha(config, key, rank, verb, kind):
    """The `lora_alpha` of `key` (a `kind`: "module" or "parameter"), after
    checking that the config's `r`/`rank_pattern` agrees with the `rank` the
    file's factors have."""
    r = pattern_value(config.get("rank_pattern"), key, config.get("r"))
    if r != rank:
        fail(
            f"{verb}: {kind} '{key}' has rank {rank} in the file, but the "
            f"config gives it r={r!r} (r / rank_pattern); the file and its "
            "config disagree."
        )
    alpha = pattern_value(
        config.get("alpha_pattern"), key, config.get("lora_alpha", 8)
    )
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, numbers.Real)
        or not alpha > 0
    ):
        fail(
            f"{verb}: {kind} '{key}' has lora_alpha {alpha!r}; keras_lowrank "
            "needs a positive number."
        )
    return alpha


def selects(targets, key):
    """PEFT's target matching: a string is a full-match regular expression,
    a list matches a module name exactly or as a `.`-separated suffix."""
    if targets is None:
        return None
    if isinstance(targets, str):
        if targets == "all-linear":
            return True
        return re.fullmatch(targets, key) is not None
    return any(key == t or key.endswith("." + t) for t in targets)


def write_folder(path, config, tensors, verb):
    """Writes a PEFT folder (config and float32 weights), replacing `path`
    as a whole.

    Everything is written into a fresh sibling folder, which then takes the
    place of `path` (an existing one is renamed aside first and removed
    last). On any failure `path` is left exactly as it was and the new
    folder is removed. A link to a folder is followed: the folder it points
    to is replaced, the link stays.

    Args:
        path: the folder to write.
        config: the `adapter_config.json` object.
        tensors: name → NumPy array, for `adapter_model.safetensors`.
        verb: the public function, for messages.

    Example:

    >>> import tempfile, numpy as np
    >>> folder = os.path.join(tempfile.mkdtemp(), "adapter")
    >>> write_folder(folder, {"r": 1}, {"x": np.ones((1, 2))}, "example")
    >>> sorted(os.listdir(folder))
    ['adapter_config.json', 'adapter_model.safetensors']
    """
    safetensors = safetensors_module(verb)
    target = os.path.realpath(path)
    if os.path.exists(target) and not os.path.isdir(target):
        fail(
            f"{verb}: '{path}' exists and is not a folder; pass a folder "
            "path (it is created, or replaced as a whole).",
            FileExistsError,
        )
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    arrays = {
        key: np.ascontiguousarray(value, dtype=np.float32)
        for key, value in tensors.items()
    }
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    staging = tempfile.mkdtemp(
        prefix="." + os.path.basename(target) + ".", suffix=".tmp", dir=parent
    )
    try:
        # mkdtemp makes a private (0700) folder; give it the mode a plain
        # os.makedirs would, so the export is readable as any folder is.
        os.chmod(staging, 0o777 & ~_umask())
        config_file = os.path.join(staging, CONFIG_FILE)
        with open(config_file, "w", encoding="utf-8") as f:
            f.write(text)
        weights = os.path.join(staging, WEIGHTS_FILE)
        safetensors.numpy.save_file(arrays, weights, metadata={"format": "pt"})
        for filename in (config_file, weights):
            _fsync(filename)
        _swap_in(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _swap_in(staging, target):
    """Renames folder `staging` to `target`; an existing `target` is renamed
    aside first, put back if the swap fails, and removed once it worked."""
    if not os.path.exists(target):
        os.rename(staging, target)
        return
    aside = staging + ".old"
    os.rename(target, aside)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _fsync(filename):
    with open(filename, "rb") as f:
        os.fsync(f.fileno())


def _umask():
    # The only portable way to read the umask is to set it and set it back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
