"""Hugging Face PEFT LoRA folders in and out of KerasHub models.

A PEFT LoRA folder holds `adapter_config.json` (a `LoraConfig`) and
`adapter_model.safetensors`, whose tensors are named after the PyTorch
modules: `base_model.model.<module>.lora_A.weight` `(r, in_features)`,
`...lora_B.weight` `(out_features, r)`, for DoRA
`...lora_magnitude_vector` `(out_features,)`, and, with `bias` or
`modules_to_save`, plain `...bias` / `...weight` tensors.

`load_peft_adapter` maps every tensor through the architecture's table
(`peft_tables`) to a KerasHub layer path, checks everything (options, names,
shapes) before changing anything, then adds the adapter with `adapt()` and
assigns the factors. `export_peft_adapter` does the reverse. Neither needs
PyTorch, `transformers` or `peft`; only `safetensors` (imported when used).

The factor layouts: a Keras `A` is `(*in_axes, r)` and `B` `(r, *out_axes)`
(`KernelLayout`), so `A = lora_A.weightᵀ` and `B = lora_B.weightᵀ`, each
reshaped from its matrix form; DoRA's magnitude is reshaped to the layer's
`unit_shape`. Both libraries compute DoRA's norm per output unit over the
input features, excluding the bias, and detach it: the same function.
"""

import dataclasses
import json
import math
import numbers
import os
import re
import tempfile

import keras
import numpy as np

from keras_lowrank.integrations import keras_hub as hub_integration
from keras_lowrank.integrations import peft_tables
from keras_lowrank.layers import LowRankLayer
from keras_lowrank.layers import adapter_class_for
from keras_lowrank.spec import check_adapter_name
from keras_lowrank.walk import find_layer
from keras_lowrank.walk import walk

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
    "target_parameters": (
        (None, []),
        "target_parameters adapts raw nn.Parameters (MoE experts), not "
        "modules",
    ),
    "trainable_token_indices": (
        (None, [], {}),
        "trainable_token_indices trains single embedding rows",
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
    "runtime_config", "eva_config", "corda_config", "lora_ga_config",
    "loftq_config", "velora_config",
}

# Initialisations whose adapters apply to the base weights as they are.
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


def _fail(message, error=ValueError):
    raise error(f"keras_lowrank: {message}")


# --- which model --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Target:
    """A supported KerasHub model: its table, backbone and task."""

    model: object
    arch: peft_tables.Architecture
    backbone: object
    backbone_path: str  # "" for a backbone, "bert_backbone/" in a task
    task: peft_tables.Task  # None for a backbone or an unknown task

    @classmethod
    def of(cls, model, verb):
        backbone = hub_integration.backbone_of(model)
        if backbone is None:
            _fail(
                f"{verb} works on KerasHub backbones and task models "
                f"(keras_hub.models.*), got {type(model).__name__} "
                f"'{getattr(model, 'name', '?')}'. Load the base model with "
                "keras_hub.models.<Architecture>Backbone.from_preset(...) or "
                "a task's from_preset.",
                TypeError,
            )
        names = _class_names(backbone)
        arch = next(
            (a for a in peft_tables.ARCHITECTURES if names & set(a.backbones)),
            None,
        )
        if arch is None:
            supported = ", ".join(
                b for a in peft_tables.ARCHITECTURES for b in a.backbones
            )
            _fail(
                f"{verb}: no PEFT name table for {type(backbone).__name__}. "
                f"Supported backbones: {supported}. Adding an architecture "
                "is adding a table to keras_lowrank/integrations/"
                "peft_tables.py.",
                TypeError,
            )
        if backbone is model:
            return cls(model, arch, backbone, "", None)
        prefix = next(v.path for v in walk(model) if v.layer is backbone)
        task_names = _class_names(model)
        task = next(
            (t for key, t in arch.tasks.items() if key in task_names), None
        )
        return cls(model, arch, backbone, prefix + "/", task)

    def resolve(self, key):
        """`(kind, Module, keras path)` for a `transformers` module name
        (without `base_model.model.`), or `None`."""
        for prefix in self.arch.prefixes:
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix):]
            for kind, modules in (
                ("linear", self.arch.linear),
                ("norm", self.arch.norms),
            ):
                for module in modules:
                    match = _template(module.hf).fullmatch(rest)
                    if match:
                        path = self.backbone_path + module.keras.format(
                            **match.groupdict()
                        )
                        return kind, module, path
        for module in self.task.heads if self.task else ():
            if key == module.hf:
                return "head", module, module.keras
        return None

    def hf_name(self, path, prefix):
        """`(kind, transformers module name)` for a Keras layer path, or
        `None`."""
        if path.startswith(self.backbone_path):
            inner = path[len(self.backbone_path):]
            for kind, modules in (
                ("linear", self.arch.linear),
                ("norm", self.arch.norms),
            ):
                for module in modules:
                    match = _template(module.keras).fullmatch(inner)
                    if match:
                        return kind, prefix + module.hf.format(
                            **match.groupdict()
                        )
        for module in self.task.heads if self.task else ():
            if path == module.keras:
                return "head", module.hf
        return None


def _class_names(obj):
    return {cls.__name__ for cls in type(obj).__mro__}


_TEMPLATES = {}


def _template(text):
    pattern = _TEMPLATES.get(text)
    if pattern is None:
        pattern = re.compile(
            re.escape(text).replace(r"\{i\}", r"(?P<i>\d+)")
        )
        _TEMPLATES[text] = pattern
    return pattern


# --- reading a folder -----------------------------------------------------------


def _read_config(path, verb):
    if not os.path.isdir(path):
        _fail(
            f"{verb}: '{path}' is not a folder. Pass the local folder that "
            f"holds {CONFIG_FILE} and {WEIGHTS_FILE} (download Hub adapters "
            "first, e.g. with huggingface_hub.snapshot_download).",
            FileNotFoundError,
        )
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_path):
        _fail(
            f"{verb}: '{path}' has no {CONFIG_FILE}; it is not a PEFT "
            "adapter folder.",
            FileNotFoundError,
        )
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as error:
        _fail(f"{verb}: cannot read {config_path}: {error}.")
    if not isinstance(config, dict):
        _fail(f"{verb}: {config_path} does not hold a JSON object.")
    return config


def _read_weights(path, verb):
    weights = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(weights):
        pickles = [p for p in PICKLE_FILES if os.path.isfile(os.path.join(path, p))]
        if pickles:
            _fail(
                f"{verb}: '{path}' holds its weights as {pickles[0]}, a "
                "pickle, which can run code when opened; keras_lowrank reads "
                f"only {WEIGHTS_FILE}. Convert it where you trust the file: "
                "load it with peft in PyTorch and save it again with "
                "`model.save_pretrained(path, safe_serialization=True)`.",
                ValueError,
            )
        _fail(
            f"{verb}: '{path}' has no {WEIGHTS_FILE}.", FileNotFoundError
        )
    safetensors = _safetensors(verb)
    with open(weights, "rb") as f:
        data = f.read()
    try:
        entries = safetensors.deserialize(data)
    except Exception as error:  # safetensors raises its own error types
        _fail(f"{verb}: cannot read {weights}: {error}.")
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
        _fail(
            f"{verb}: tensor '{name}' in {filename} has dtype {dtype}; "
            "adapter weights must be floating point (F16, BF16, F32, F64)."
        )
    return array.reshape(shape)


def _safetensors(verb):
    try:
        import safetensors
        import safetensors.numpy  # noqa: F401
    except ImportError:
        _fail(
            f"{verb} needs the `safetensors` package to read and write "
            "PEFT adapter files. Install it: `pip install safetensors` (or "
            "`pip install keras-lowrank[io]`).",
            ImportError,
        )
    return safetensors


# --- checking a LoraConfig ---------------------------------------------------------


def _check_config(config, verb):
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        _fail(
            f"{verb}: peft_type {config.get('peft_type')!r} is not supported; "
            "keras_lowrank reads LoRA adapters (peft_type 'LORA', with "
            "use_dora/use_rslora) only."
        )
    for field, (neutral, reason) in _MUST_BE_NEUTRAL.items():
        value = config.get(field)
        if not _is_one_of(value, neutral):
            _fail(
                f"{verb}: the adapter sets {field}={value!r}, which is not "
                f"supported: {reason}."
            )
    init = config.get("init_lora_weights", True)
    if not _is_one_of(init, _PLAIN_INITS):
        _fail(
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
        _fail(
            f"{verb}: the adapter sets option(s) {unknown} that this "
            "keras_lowrank version does not know, so it cannot tell whether "
            "they change the adapter's output. Upgrade keras_lowrank, or "
            "remove the option(s) from adapter_config.json if they are "
            "known to be inert."
        )
    bias = config.get("bias", "none")
    if bias not in ("none", "lora_only", "all"):
        _fail(
            f"{verb}: unknown bias policy {bias!r} in the adapter; PEFT's "
            "are 'none', 'lora_only' and 'all'."
        )
    for field in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(field) or {}, dict):
            _fail(f"{verb}: {field} must be a JSON object (pattern -> value).")


def _is_one_of(value, choices):
    # `==` alone would take 0 for False and 1 for True.
    return any(type(value) is type(c) and value == c for c in choices)


def _pattern_value(pattern, key, default):
    """PEFT's `get_pattern_key`: the first pattern `p` with
    `re.match(rf"(.*\\.)?({p})$", key)` gives the value."""
    for candidate, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({candidate})$", key):
            return value
    return default


def _selects(targets, key):
    """PEFT's target matching: a string is a full-match regular expression,
    a list matches a module name exactly or as a `.`-separated suffix."""
    if targets is None:
        return None
    if isinstance(targets, str):
        if targets == "all-linear":
            return True
        return re.fullmatch(targets, key) is not None
    return any(key == t or key.endswith("." + t) for t in targets)


# --- planning a load ---------------------------------------------------------------


@dataclasses.dataclass
class _Lora:
    key: str  # transformers module name
    path: str  # Keras layer path
    layer: object
    layout: object
    tensors: dict = dataclasses.field(default_factory=dict)
    rank: int = None
    alpha: float = None


@dataclasses.dataclass
class _Plan:
    loras: list
    assigns: list  # (variable, value with the variable's shape, what)
    kept: list  # Keras paths of modules_to_save


_SUFFIXES = (
    (".lora_A.weight", "A"),
    (".lora_B.weight", "B"),
    (".lora_magnitude_vector.weight", "magnitude"),
    (".lora_magnitude_vector", "magnitude"),
    (".base_layer.bias", "base_bias"),
    (".weight", "weight"),
    (".bias", "bias"),
)


def _split_key(name):
    for suffix, what in _SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)], what
    return name, None


def _plan_load(target, config, tensors, verb):
    modules = {}
    strays = []
    # Sorted, so that the first problem reported does not depend on the
    # file's tensor order.
    for name, value in sorted(tensors.items()):
        if not name.startswith(KEY_PREFIX):
            _fail(
                f"{verb}: tensor '{name}' does not start with "
                f"'{KEY_PREFIX}'; this is not a PEFT LoRA file for a "
                "transformers model."
            )
        key, what = _split_key(name[len(KEY_PREFIX):])
        if what is None or ".lora_" in key or key.endswith(".base_layer"):
            strays.append(name)
            continue
        modules.setdefault(key, {})[what] = value
    if strays:
        _fail(
            f"{verb}: tensor(s) {_first(strays)} are not LoRA factors, DoRA "
            "magnitudes, biases or modules_to_save weights (embedding LoRA "
            "`lora_embedding_A/B`, `lora_B.bias` and other variants are not "
            "supported)."
        )
    resolved = {}
    unknown = []
    for key in modules:
        hit = target.resolve(key)
        if hit is None:
            unknown.append(key)
        else:
            resolved[key] = hit
    if unknown:
        _refuse_unknown(target, config, unknown, verb)

    bias_policy = config.get("bias", "none")
    to_save = config.get("modules_to_save") or []
    loras, assigns, kept = [], [], []
    for key, parts in modules.items():
        kind, _, path = resolved[key]
        layer = find_layer(target.model, path)
        if layer is None:
            _fail(
                f"{verb}: module '{key}' maps to Keras layer '{path}', which "
                f"this {type(target.backbone).__name__} does not have. The "
                "adapter was made for a larger model of the architecture; "
                "load it into the model it was trained on."
            )
        is_lora = bool({"A", "B", "magnitude", "base_bias"} & set(parts))
        if is_lora:
            loras.append(
                _plan_lora(target, config, key, path, layer, kind, parts, verb)
            )
            continue
        saved = _selects(to_save, key) if to_save else False
        if "weight" in parts and not saved:
            _fail(
                f"{verb}: the file holds the full weight of module '{key}', "
                "which is neither LoRA-adapted nor listed in modules_to_save "
                f"{to_save}; the file and its config disagree."
            )
        if not saved and bias_policy != "all":
            _fail(
                f"{verb}: the file holds the bias of module '{key}', but the "
                f"adapter's bias policy is {bias_policy!r} and the module is "
                "neither LoRA-adapted nor in modules_to_save; the file and "
                "its config disagree."
            )
        assigns.extend(_plan_plain(key, path, layer, kind, parts, verb))
        if saved:
            kept.append(path)
    if not loras:
        _fail(f"{verb}: the file holds no LoRA factors (lora_A/lora_B).")
    return _Plan(loras, assigns, kept)


def _refuse_unknown(target, config, unknown, verb):
    fused = [
        k for k in unknown
        if any(k.split(".")[-1].startswith(f) for f in target.arch.fused)
    ]
    if fused:
        _fail(
            f"{verb}: module(s) {_first(fused)} are fused projections (one "
            "nn.Linear for several KerasHub layers); the supported "
            f"{target.arch.name} models keep them separate, so the factors "
            "cannot be split exactly. This adapter belongs to another "
            "architecture."
        )
    to_save = config.get("modules_to_save") or []
    saved = [k for k in unknown if to_save and _selects(to_save, k)]
    if saved:
        where = (
            type(target.model).__name__ if target.task is None
            else f"the head of {type(target.model).__name__}"
        )
        heads = sorted(
            f"{name} ({', '.join(m.hf for m in task.heads)})"
            for name, task in target.arch.tasks.items() if task.heads
        )
        _fail(
            f"{verb}: modules_to_save module(s) {_first(saved)} have no "
            f"counterpart in {where}, so they cannot be loaded. Mapped "
            f"task heads: {', '.join(heads) or 'none'}; load the adapter "
            "into that task model."
        )
    examples = [
        m.hf.format(i=0) for m in target.arch.linear[:4]
    ]
    _fail(
        f"{verb}: module(s) {_first(unknown)} have no KerasHub counterpart "
        f"in the {target.arch.name} table (known modules look like "
        f"{examples}, after an optional prefix {target.arch.prefixes[:-1]}). "
        "Is the adapter for another architecture? Embeddings and LM heads "
        "are not mapped."
    )


def _plan_lora(target, config, key, path, layer, kind, parts, verb):
    if kind != "linear":
        _fail(
            f"{verb}: module '{key}' ({kind}) carries LoRA factors, but only "
            "linear projections can be adapted from PEFT files."
        )
    missing = [p for p in ("A", "B") if p not in parts]
    if missing:
        _fail(
            f"{verb}: module '{key}' has no lora_{missing[0]}.weight; the "
            "file is incomplete."
        )
    if parts.keys() & {"weight", "bias"}:
        _fail(
            f"{verb}: module '{key}' has LoRA factors and plain weights at "
            "once; PEFT cannot produce that."
        )
    targets = config.get("target_modules")
    if _selects(targets, key) is False:
        _fail(
            f"{verb}: the file has LoRA factors for '{key}', which "
            f"target_modules={targets!r} does not select (PEFT itself would "
            "ignore them); the file and its config disagree."
        )
    excluded = config.get("exclude_modules")
    if excluded and _selects(excluded, key):
        _fail(
            f"{verb}: the file has LoRA factors for '{key}', which "
            f"exclude_modules={excluded!r} excludes; the file and its config "
            "disagree."
        )
    use_dora = bool(config.get("use_dora"))
    if use_dora != ("magnitude" in parts):
        _fail(
            f"{verb}: module '{key}' "
            + (
                "has no lora_magnitude_vector, but use_dora=true"
                if use_dora
                else "has a lora_magnitude_vector, but use_dora=false"
            )
            + "; the file and its config disagree."
        )
    cls = adapter_class_for(layer)
    if cls is None or not issubclass(
        cls, (keras.layers.Dense, keras.layers.EinsumDense)
    ):
        _fail(
            f"{verb}: module '{key}' maps to Keras layer '{path}' "
            f"({type(layer).__name__}), which is not a Dense or EinsumDense "
            "layer."
        )
    cls.check_convertible(layer, path)
    layout = cls.kernel_layout(layer)
    if layout.batch_shape:
        _fail(
            f"{verb}: Keras layer '{path}' has batch axes in its kernel "
            f"{layout.kernel_shape}; a single nn.Linear cannot map to it."
        )
    a, b = parts["A"], parts["B"]
    rank = a.shape[0]
    expected = {
        "lora_A.weight": (a, (rank, layout.d)),
        "lora_B.weight": (b, (layout.k, rank)),
    }
    if "magnitude" in parts:
        expected["lora_magnitude_vector"] = (parts["magnitude"], (layout.k,))
    if "base_bias" in parts:
        expected["base_layer.bias"] = (parts["base_bias"], (layout.k,))
    for what, (value, shape) in expected.items():
        if tuple(value.shape) != shape:
            _fail(
                f"{verb}: {key}.{what} has shape {tuple(value.shape)}, but "
                f"Keras layer '{path}' (kernel {layout.kernel_shape}: "
                f"{layout.d} inputs, {layout.k} outputs) needs {shape}. The "
                "adapter was made for a model of another size."
            )
    r = _pattern_value(config.get("rank_pattern"), key, config.get("r"))
    if r != rank:
        _fail(
            f"{verb}: module '{key}' has rank {rank} in the file, but the "
            f"config gives it r={r!r} (r / rank_pattern); the file and its "
            "config disagree."
        )
    alpha = _pattern_value(
        config.get("alpha_pattern"), key, config.get("lora_alpha", 8)
    )
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not alpha > 0:
        _fail(
            f"{verb}: module '{key}' has lora_alpha {alpha!r}; keras_lowrank "
            "needs a positive number."
        )
    if rank > layout.max_rank:
        _fail(
            f"{verb}: module '{key}' has rank {rank}, larger than "
            f"min(in, out) = {layout.max_rank} of Keras layer '{path}'; "
            "keras_lowrank adapters must be low-rank."
        )
    if "base_bias" in parts and getattr(layer, "bias", None) is None:
        _fail(
            f"{verb}: the file holds a bias for '{key}', but Keras layer "
            f"'{path}' has no bias."
        )
    return _Lora(key, path, layer, layout, dict(parts), int(rank), alpha)


def _plan_plain(key, path, layer, kind, parts, verb):
    """Assignments of plain (bias="all" or modules_to_save) tensors."""
    out = []
    if kind == "norm":
        if not isinstance(layer, keras.layers.LayerNormalization):
            _fail(
                f"{verb}: module '{key}' maps to '{path}', which is not a "
                "LayerNormalization."
            )
        names = {"weight": "gamma", "bias": "beta"}
        for what, value in parts.items():
            variable = getattr(layer, names[what], None)
            if variable is None:
                _fail(
                    f"{verb}: Keras layer '{path}' has no {names[what]} for "
                    f"{key}.{what}."
                )
            out.append(_assign(variable, value, f"{key}.{what}", path, verb))
        return out
    cls = adapter_class_for(layer)
    if cls is None or not issubclass(
        cls, (keras.layers.Dense, keras.layers.EinsumDense)
    ):
        _fail(
            f"{verb}: module '{key}' maps to Keras layer '{path}' "
            f"({type(layer).__name__}), which is not a Dense or EinsumDense "
            "layer."
        )
    layout = cls.kernel_layout(layer)
    for what in sorted(parts, key=("weight", "bias").index):
        value = parts[what]
        if what == "weight":
            if tuple(value.shape) != (layout.k, layout.d):
                _fail(
                    f"{verb}: {key}.weight has shape {tuple(value.shape)}, "
                    f"but Keras layer '{path}' needs ({layout.k}, "
                    f"{layout.d}). The adapter was made for another model "
                    "size (or another number of labels)."
                )
            kernel = _from_matrix(layout, value.T)
            out.append(
                (cls.kernel_variable(layer), kernel, f"{key}.weight")
            )
        else:
            if getattr(layer, "bias", None) is None:
                _fail(
                    f"{verb}: the file holds {key}.bias, but Keras layer "
                    f"'{path}' has no bias."
                )
            out.append(_assign(layer.bias, value, f"{key}.bias", path, verb))
    return out


def _assign(variable, value, what, path, verb):
    size = math.prod(variable.shape)
    if value.size != size:
        _fail(
            f"{verb}: {what} has {value.size} values, but '{path}' needs "
            f"{tuple(variable.shape)}. The adapter was made for another "
            "model size."
        )
    return (variable, value.reshape(variable.shape), what)


def _from_matrix(layout, matrix):
    """NumPy `KernelLayout.from_matrix` for a kernel without batch axes."""
    x = np.reshape(matrix, layout.in_shape + layout.out_shape)
    inverse = np.argsort(layout.perm)
    return np.transpose(x, inverse)


def _to_matrix(layout, kernel):
    x = np.transpose(np.asarray(kernel), layout.perm)
    return np.reshape(x, (layout.d, layout.k))


def _first(items, limit=5):
    items = list(items)
    shown = ", ".join(repr(i) for i in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


# --- load ------------------------------------------------------------------------


def load_peft_adapter(model, path, name=None):
    """Applies a Hugging Face PEFT LoRA adapter folder to a KerasHub model.

    The folder is what `peft`'s `save_pretrained` writes: `adapter_config.json`
    and `adapter_model.safetensors`. Every tensor is mapped to a KerasHub
    layer through the architecture's name table (BERT, Llama, Mistral, Qwen2,
    Qwen3, Gemma); `r`, `lora_alpha`, `use_rslora`, `use_dora`,
    `rank_pattern`, `alpha_pattern`, `lora_dropout`, `bias` and
    `modules_to_save` (mapped task heads) are honoured. Everything is checked
    before the model changes: a folder that cannot be applied exactly is
    refused with a message naming the module and the reason, and the model
    is left as it was.

    The adapter becomes the model's only active adapter, as after `adapt()`;
    its factors train, the rest is frozen (except `modules_to_save` and a
    task's head). Bias tensors (`bias="lora_only"`/`"all"`) and
    `modules_to_save` weights overwrite the model's own, as in PEFT.

    Args:
        model: a KerasHub backbone or task model of a supported architecture,
            loaded from the same base checkpoint as the adapter's
            (`keras_hub.models.Llama3CausalLM.from_preset("hf://...")`).
        path: the local adapter folder.
        name: the adapter's name in the model (default `"default"`).

    Returns:
        `model`.

    Example:

    ```python
    model = keras_hub.models.Llama3CausalLM.from_preset(base_folder)
    keras_lowrank.load_peft_adapter(model, "my-llama-lora")
    model.generate("The capital of France is")
    ```
    """
    verb = "load_peft_adapter"
    name = "default" if name is None else name
    check_adapter_name(name)
    target = _Target.of(model, verb)
    config = _read_config(os.fspath(path), verb)
    _check_config(config, verb)
    tensors = _read_weights(os.fspath(path), verb)
    plan = _plan_load(target, config, tensors, verb)
    existing = [
        p.path for p in plan.loras
        if isinstance(p.layer, LowRankLayer) and name in p.layer.adapter_names
    ]
    if existing:
        _fail(
            f"{verb}: layer '{existing[0]}' already has an adapter named "
            f"{name!r}. Pass another name (name='task_b') or "
            "keras_lowrank.delete_adapter(model, name) first."
        )
    _apply(model, target, config, plan, name)
    return model


def _apply(model, target, config, plan, name):
    from keras_lowrank import lifecycle
    from keras_lowrank.surgery import adapt

    ranks = [p.rank for p in plan.loras]
    alphas = [p.alpha for p in plan.loras]
    rank = max(set(ranks), key=ranks.count)
    alpha = max(set(alphas), key=alphas.count)
    # Explicit per-layer values only where they differ from the default
    # (always both, so that adapt() never re-derives alpha from rank).
    odd = [p for p in plan.loras if (p.rank, p.alpha) != (rank, alpha)]
    trainable = None
    if plan.kept:
        heads = [
            v.path for v in walk(model)
            if any(v.layer is h for h in hub_integration.head_layers(model))
        ]
        trainable = heads + [p for p in plan.kept if p not in heads]
    saved = [
        (variable, keras.ops.convert_to_numpy(variable))
        for variable, _, _ in plan.assigns
    ]
    adapt(
        model,
        rank=rank,
        alpha=alpha,
        targets=[p.path for p in plan.loras],
        dropout=float(config.get("lora_dropout") or 0.0),
        scaling="rslora" if config.get("use_rslora") else "standard",
        method="dora" if config.get("use_dora") else "lora",
        bias=config.get("bias", "none"),
        trainable=trainable,
        name=name,
        rank_pattern={p.path: p.rank for p in odd} or None,
        alpha_pattern={p.path: p.alpha for p in odd} or None,
    )
    try:
        for p in plan.loras:
            variables = p.layer.adapter_variables(name)
            layout = p.layout
            variables["A"].assign(
                np.reshape(p.tensors["A"].T, layout.a_shape(p.rank))
            )
            variables["B"].assign(
                np.reshape(p.tensors["B"].T, layout.b_shape(p.rank))
            )
            if "magnitude" in p.tensors:
                variables["magnitude"].assign(
                    np.reshape(p.tensors["magnitude"], layout.unit_shape)
                )
            if "base_bias" in p.tensors:
                _set(p.layer.bias, p.tensors["base_bias"])
        for variable, value, _ in plan.assigns:
            _set(variable, value)
    except BaseException:
        for variable, value in saved:
            variable.assign(value)
        lifecycle.delete_adapter(model, name)
        raise


def _set(variable, value):
    value = np.reshape(value, variable.shape)
    variable.assign(keras.ops.cast(value, variable.dtype))


# --- export ------------------------------------------------------------------------


def export_peft_adapter(
    model,
    path,
    name=None,
    *,
    base_model_name_or_path=None,
    module_prefix=None,
):
    """Writes one adapter of a KerasHub model as a Hugging Face PEFT folder.

    `peft.PeftModel.from_pretrained(<transformers model>, path)` loads the
    folder onto the `transformers` model of the same base checkpoint and
    gives the same outputs. Module names follow the KerasHub model kind: a
    backbone maps to the bare `transformers` model (`BertModel`,
    `LlamaModel`), a task to its task model (`BertForSequenceClassification`,
    `LlamaForCausalLM`: prefixes `bert.`, `model.`); `module_prefix`
    overrides it. A task head that trains (BertTextClassifier's `logits`) is
    written as `modules_to_save`.

    Both files are written atomically (a temporary file, then a rename), the
    weights before the config.

    Args:
        model: an adapted KerasHub model of a supported architecture.
        path: the folder to write (created if needed; the two files in it are
            replaced).
        name: the adapter to export; default: the model's only adapter, or
            its only active one.
        base_model_name_or_path: written to the config (PEFT's
            `from_pretrained` does not need it when given a model).
        module_prefix: the backbone's module prefix in the `transformers`
            model the folder is meant for (`""` for `LlamaModel`, `"model."`
            for `LlamaForCausalLM`).

    Returns:
        `path`.

    Example:

    ```python
    keras_lowrank.adapt(model, rank=8, targets=["query", "value"])
    model.fit(...)
    keras_lowrank.export_peft_adapter(model, "my-adapter",
                                      base_model_name_or_path="org/base")
    # PyTorch: PeftModel.from_pretrained(AutoModel..., "my-adapter")
    ```
    """
    from keras_lowrank.model_state import adapted_visits
    from keras_lowrank.model_state import state_of

    verb = "export_peft_adapter"
    target = _Target.of(model, verb)
    state = state_of(model)
    name = _pick_adapter(model, state, name, verb)
    prefix = _export_prefix(target, module_prefix, verb)
    safetensors = _safetensors(verb)

    visits = [v for v in adapted_visits(model) if name in v.layer.adapter_names]
    entries = []
    unmapped = []
    for visit in visits:
        hit = target.hf_name(visit.path, prefix)
        if hit is None or hit[0] != "linear":
            unmapped.append(visit.path)
        else:
            entries.append((visit, hit[1]))
    if unmapped:
        _fail(
            f"{verb}: adapter {name!r} is on layer(s) {_first(unmapped)}, "
            f"which have no nn.Linear counterpart in the {target.arch.name} "
            "table, so PEFT could not load them. Export an adapter that "
            "targets only attention and MLP projections (delete and re-adapt "
            "without those layers)."
        )
    specs = {v.path: v.layer.adapter_spec(name) for v, _ in entries}
    first = next(iter(specs.values()))
    for field in ("method", "scaling", "dropout", "init"):
        values = {getattr(s, field) for s in specs.values()}
        if len(values) > 1:
            _fail(
                f"{verb}: adapter {name!r} mixes {field} values "
                f"{sorted(map(str, values))} across layers; one LoraConfig "
                "has one."
            )
    if first.init in ("pissa", "olora"):
        _fail(
            f"{verb}: adapter {name!r} was initialised with init="
            f"{first.init!r}, which rewrote the Keras kernels into residuals; "
            "PEFT applies adapters to the original base weights, so the "
            "factors alone do not describe the change."
        )
    for visit, module in entries:
        others = [
            n for n in visit.layer.adapter_names
            if n != name and visit.layer.adapter_spec(n).init in ("pissa", "olora")
        ]
        merged = [n for n in visit.layer.merged_adapters if n != name]
        if others or (merged and first.method == "dora"):
            _fail(
                f"{verb}: layer '{visit.path}' has its kernel changed by "
                f"adapter {(others or merged)[0]!r} (PiSSA/OLoRA residual or "
                "merged), so a DoRA/PiSSA export would not match the original "
                "base model. keras_lowrank.unmerge(model) or delete that "
                "adapter first."
            )

    tensors = {}
    ranks, alphas = {}, {}
    bias_policy = (state.options.get(name) or {}).get("bias", "none")
    lora_modules = set()
    for visit, module in entries:
        layer = visit.layer
        spec = specs[visit.path]
        layout = layer.lowrank_layout
        variables = layer.adapter_variables(name)
        a = np.reshape(_np(variables["A"]), (layout.d, spec.rank))
        b = np.reshape(_np(variables["B"]), (spec.rank, layout.k))
        tensors[f"{KEY_PREFIX}{module}.lora_A.weight"] = a.T
        tensors[f"{KEY_PREFIX}{module}.lora_B.weight"] = b.T
        if spec.method == "dora":
            tensors[f"{KEY_PREFIX}{module}.lora_magnitude_vector"] = np.reshape(
                _np(variables["magnitude"]), (layout.k,)
            )
        if bias_policy != "none" and layer.bias is not None:
            tensors[f"{KEY_PREFIX}{module}.base_layer.bias"] = np.reshape(
                _np(layer.bias), (layout.k,)
            )
        ranks[module], alphas[module] = spec.rank, spec.alpha
        lora_modules.add(module)

    to_save = _export_kept(target, state, prefix, lora_modules, tensors, verb)
    if bias_policy == "all":
        _export_all_biases(target, prefix, lora_modules, to_save, tensors, verb)

    config = _export_config(
        target, entries, ranks, alphas, first, bias_policy, to_save,
        base_model_name_or_path, prefix,
    )
    os.makedirs(os.fspath(path), exist_ok=True)
    blob = safetensors.numpy.save(
        {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()},
        metadata={"format": "pt"},
    )
    _atomic_write(os.path.join(os.fspath(path), WEIGHTS_FILE), blob)
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    _atomic_write(os.path.join(os.fspath(path), CONFIG_FILE), text.encode("utf-8"))
    return path


def _pick_adapter(model, state, name, verb):
    names = list(state.options)
    if name is not None:
        if name not in names:
            _fail(
                f"{verb}: model '{model.name}' has no adapter named {name!r}; "
                f"it has {sorted(names)}."
            )
        return name
    if len(names) == 1:
        return names[0]
    if len(state.active) == 1:
        return state.active[0]
    _fail(
        f"{verb}: model '{model.name}' has adapters {sorted(names)}; pass "
        "name=... to choose the one to export."
    )


def _export_prefix(target, module_prefix, verb):
    if module_prefix is not None:
        if module_prefix and not module_prefix.endswith("."):
            _fail(
                f"{verb}: module_prefix {module_prefix!r} must be empty or "
                "end with '.' (like 'model.')."
            )
        return module_prefix
    if target.backbone is target.model:
        return ""
    if target.task is None:
        _fail(
            f"{verb}: no transformers counterpart is known for the task "
            f"{type(target.model).__name__}; pass module_prefix= (the "
            "backbone's module prefix in the transformers model, e.g. "
            f"{[t.prefix for t in target.arch.tasks.values()][:1]})."
        )
    return target.task.prefix


def _export_kept(target, state, prefix, lora_modules, tensors, verb):
    """modules_to_save: the layers that train fully (a task head, or the
    user's `trainable=[...]`); their weights go into the file."""
    to_save = []
    for kept in state.kept:
        layer = find_layer(target.model, kept)
        if layer is None or not layer.weights:
            continue
        hit = target.hf_name(kept, prefix)
        if hit is None or isinstance(layer, LowRankLayer):
            _fail(
                f"{verb}: layer '{kept}' trains fully (a task head or "
                "adapt(trainable=...)), so PEFT would need it in "
                "modules_to_save, but "
                + (
                    "it also holds adapters"
                    if hit is not None
                    else f"it has no counterpart in the {target.arch.name} table"
                )
                + ". Re-adapt with trainable=[] (or without this layer) "
                "before exporting."
            )
        kind, module = hit
        if module in lora_modules:
            _fail(f"{verb}: module '{module}' is both adapted and kept.")
        if kind == "norm":
            tensors[f"{KEY_PREFIX}{module}.weight"] = _np(layer.gamma)
            tensors[f"{KEY_PREFIX}{module}.bias"] = _np(layer.beta)
        else:
            layout = adapter_class_for(layer).kernel_layout(layer)
            tensors[f"{KEY_PREFIX}{module}.weight"] = _to_matrix(
                layout, _np(adapter_class_for(layer).kernel_variable(layer))
            ).T
            if layer.bias is not None:
                tensors[f"{KEY_PREFIX}{module}.bias"] = np.reshape(
                    _np(layer.bias), (layout.k,)
                )
        to_save.append(module)
    return to_save


def _export_all_biases(target, prefix, lora_modules, to_save, tensors, verb):
    """bias="all": every bias of the model, as PEFT saves them."""
    unmapped = []
    for visit in walk(target.model):
        layer = visit.layer
        bias = getattr(layer, "bias", None)
        if isinstance(layer, keras.layers.LayerNormalization):
            bias = layer.beta
        if not isinstance(bias, keras.Variable):
            continue
        hit = target.hf_name(visit.path, prefix)
        if hit is None:
            unmapped.append(visit.path)
            continue
        module = hit[1]
        if module in lora_modules or module in to_save:
            continue
        tensors[f"{KEY_PREFIX}{module}.bias"] = np.reshape(_np(bias), (-1,))
    if unmapped:
        _fail(
            f"{verb}: the adapter trains every bias (bias='all'), but "
            f"layer(s) {_first(unmapped)} have no counterpart in the "
            f"{target.arch.name} table, so their biases cannot be written."
        )


def _export_config(
    target, entries, ranks, alphas, spec, bias_policy, to_save,
    base_model_name_or_path, prefix,
):
    r = _most_common(ranks.values())
    alpha = _most_common(alphas.values())
    modules = list(ranks)
    return {
        "peft_type": "LORA",
        "task_type": target.task.task_type if target.task else None,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": int(r),
        "lora_alpha": _number(alpha),
        "lora_dropout": float(spec.dropout),
        "use_rslora": spec.scaling == "rslora",
        "use_dora": spec.method == "dora",
        "target_modules": _target_modules(target, prefix, modules),
        "rank_pattern": _patterns(ranks, r, modules, int),
        "alpha_pattern": _patterns(alphas, alpha, modules, _number),
        "bias": bias_policy,
        "modules_to_save": to_save or None,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def _target_modules(target, prefix, modules):
    """PEFT's `target_modules` for exactly `modules`.

    A short name (`"q_proj"`) where one table entry owns that name and the
    adapter covers all of its layers, as hand-written configs do; full
    module names otherwise. A shared short name such as BERT's `"dense"`
    would also select modules the table does not know (a masked-LM head's
    `cls.predictions.transform.dense`), so it is never used.
    """
    every = _all_linear_modules(target, prefix)
    chosen = set(modules)
    owners = {}
    for module in target.arch.linear:
        owners.setdefault(_short(module.hf), set()).add(module.hf)
    out = []
    for short in sorted({_short(m) for m in modules}):
        same = {m for m in every if _short(m) == short}
        if len(owners.get(short, ())) == 1 and same <= chosen:
            out.append(short)
        else:
            out.extend(sorted(m for m in modules if _short(m) == short))
    return out


def _short(module):
    return module.rsplit(".", 1)[-1]


def _all_linear_modules(target, prefix):
    out = set()
    for visit in walk(target.model):
        hit = target.hf_name(visit.path, prefix)
        if hit is not None and hit[0] == "linear":
            out.add(hit[1])
    return out


def _patterns(values, default, modules, cast):
    """PEFT rank/alpha patterns for the modules whose value differs, keyed
    by the full module name (escaped where a bare name could match another
    module under PEFT's `(.*\\.)?(<key>)$` rule)."""
    out = {}
    for module in modules:
        if values[module] == default:
            continue
        key = module
        if any(
            re.match(rf"(.*\.)?({key})$", other) for other in modules
            if other != module
        ):
            key = re.escape(module)
        out[key] = cast(values[module])
    return out


def _most_common(values):
    values = list(values)
    return max(sorted(set(values)), key=values.count)


def _number(value):
    value = float(value)
    return int(value) if value.is_integer() else value


def _np(variable):
    return np.asarray(keras.ops.convert_to_numpy(variable), dtype=np.float32)


def _atomic_write(filename, data):
    folder = os.path.dirname(filename) or "."
    handle, temporary = tempfile.mkstemp(
        prefix=os.path.basename(filename) + ".", suffix=".tmp", dir=folder
    )
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, filename)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
