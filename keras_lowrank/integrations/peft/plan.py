"""Checking a PEFT folder against a KerasHub model, before anything changes.

`plan_load` maps every tensor of the folder through the architecture's table
(`mapping.Target`) to a KerasHub layer and checks everything a load needs
(options, names, shapes, the file against its config), so that a refused
folder leaves the model untouched. The result, a `Plan`, holds the LoRA
modules to adapt (MoE expert kernels included, from `experts.plan_experts`)
and the plain tensors (biases, `modules_to_save`) to assign, already in the
Keras layouts.
"""

import dataclasses
import math

import keras

from keras_lowrank.integrations.peft import format as peft_format
from keras_lowrank.integrations.peft.experts import plan_experts
from keras_lowrank.integrations.peft.format import KEY_PREFIX
from keras_lowrank.integrations.peft.format import fail
from keras_lowrank.integrations.peft.mapping import first
from keras_lowrank.integrations.peft.mapping import kernel_from_linear
from keras_lowrank.integrations.peft.mapping import keras_factors
from keras_lowrank.integrations.peft.mapping import linear_adapter_class
from keras_lowrank.integrations.peft.token_rows import plan_token_rows
from keras_lowrank.surgery.walk import find_layer


@dataclasses.dataclass
class _LoraModule:
    """One LoRA-adapted module of the folder, checked against its layer.

    Args:
        key: the `transformers` module name.
        path: the Keras layer path.
        layer: the Keras layer.
        values: the adapter's variable values in the Keras layouts (`A`,
            `B`, and `magnitude` for DoRA).
        rank: its rank.
        alpha: its `lora_alpha`.
    """

    key: str
    path: str
    layer: object
    values: dict
    rank: int
    alpha: float


@dataclasses.dataclass
class _Plan:
    """What a load does, all checked.

    Args:
        loras: the `_LoraModule`s to adapt.
        assigns: `(variable, value, what)` for the plain tensors (biases,
            `modules_to_save` weights), each value in the variable's shape.
        kept: the Keras paths of the `modules_to_save` layers.
        tokens: `{keras path: (layer, ids, rows)}`, the token rows
            (`trainable_token_indices`) with their values.
    """

    loras: list
    assigns: list
    kept: list
    tokens: dict = dataclasses.field(default_factory=dict)


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


def plan_load(target, config, tensors, verb):
    """What applying a PEFT folder to `target`'s model does, all checked.

    Raises on the first problem (a `ValueError` naming the module, the Keras
    layer and the reason), before anything changes.

    Args:
        target: the model, as a `mapping.Target`.
        config: the folder's `adapter_config.json`, already checked by
            `format.check_config`.
        tensors: the folder's tensors (name → float32 NumPy array).
        verb: the public function, for messages.

    Returns:
        A plan: `loras` (each module's Keras path, layer, rank, alpha and
        factor values in the Keras layouts), `assigns` (`(variable, value,
        what)` for biases and `modules_to_save` weights) and `kept` (the
        `modules_to_save` layer paths).

    Example:

    >>> import keras_hub, numpy as np
    >>> from keras_lowrank.integrations.peft.mapping import Target
    >>> bert = keras_hub.models.BertBackbone(
    ...     vocabulary_size=8, num_layers=1, num_heads=1, hidden_dim=4,
    ...     intermediate_dim=8, max_sequence_length=4)
    >>> key = "base_model.model.encoder.layer.0.attention.self.query"
    >>> tensors = {key + ".lora_A.weight": np.ones((2, 4), "float32"),
    ...            key + ".lora_B.weight": np.ones((4, 2), "float32")}
    >>> config = {"r": 2, "lora_alpha": 4, "target_modules": ["query"]}
    >>> plan = plan_load(Target.of(bert, "example"), config, tensors, "ex")
    >>> [(m.path, m.rank, m.values["A"].shape) for m in plan.loras]
    [('transformer_layer_0/self_attention_layer/query', 2, (4, 2))]
    """
    # MoE expert parameters (target_parameters) first; the rest are modules.
    expert_loras, tensors = plan_experts(target, config, tensors, verb)
    tokens, tensors = plan_token_rows(target, config, tensors, verb)
    modules = {}
    strays = []
    # Sorted, so that the first problem reported does not depend on the
    # file's tensor order.
    for name, value in sorted(tensors.items()):
        if not name.startswith(KEY_PREFIX):
            fail(
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
        fail(
            f"{verb}: tensor(s) {first(strays)} are not LoRA factors, DoRA "
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
            fail(
                f"{verb}: module '{key}' maps to Keras layer '{path}', which "
                f"this {type(target.backbone).__name__} does not have. The "
                "adapter was made for a larger model of the architecture; "
                "load it into the model it was trained on."
            )
        is_lora = bool({"A", "B", "magnitude", "base_bias"} & set(parts))
        if is_lora:
            lora, bias = _plan_lora(config, key, path, layer, kind, parts, verb)
            loras.append(lora)
            assigns.extend(bias)
            continue
        saved = peft_format.selects(to_save, key) if to_save else False
        if "weight" in parts and not saved:
            fail(
                f"{verb}: the file holds the full weight of module '{key}', "
                "which is neither LoRA-adapted nor listed in modules_to_save "
                f"{to_save}; the file and its config disagree."
            )
        if not saved and bias_policy != "all":
            fail(
                f"{verb}: the file holds the bias of module '{key}', but the "
                f"adapter's bias policy is {bias_policy!r} and the module is "
                "neither LoRA-adapted nor in modules_to_save; the file and "
                "its config disagree."
            )
        assigns.extend(_plan_plain(key, path, layer, kind, parts, verb))
        if saved:
            kept.append(path)
    loras.extend(expert_loras)
    if not loras and not tokens:
        fail(f"{verb}: the file holds no LoRA factors (lora_A/lora_B).")
    return _Plan(loras, assigns, kept, tokens)


def _refuse_unknown(target, config, unknown, verb):
    fused = [
        k for k in unknown
        if any(k.split(".")[-1].startswith(f) for f in target.arch.fused)
    ]
    if fused:
        fail(
            f"{verb}: module(s) {first(fused)} are fused projections (one "
            "nn.Linear for several KerasHub layers); the supported "
            f"{target.arch.name} models keep them separate, so the factors "
            "cannot be split exactly. This adapter belongs to another "
            "architecture."
        )
    to_save = config.get("modules_to_save") or []
    saved = [k for k in unknown if to_save and peft_format.selects(to_save, k)]
    if saved:
        where = (
            type(target.model).__name__ if target.task is None
            else f"the head of {type(target.model).__name__}"
        )
        heads = sorted(
            f"{name} ({', '.join(m.hf for m in task.heads)})"
            for name, task in target.arch.tasks.items() if task.heads
        )
        fail(
            f"{verb}: modules_to_save module(s) {first(saved)} have no "
            f"counterpart in {where}, so they cannot be loaded. Mapped "
            f"task heads: {', '.join(heads) or 'none'}; load the adapter "
            "into that task model."
        )
    examples = [
        m.hf.format(i=0) for m in target.arch.linear[:4]
    ]
    fail(
        f"{verb}: module(s) {first(unknown)} have no KerasHub counterpart "
        f"in the {target.arch.name} table (known modules look like "
        f"{examples}, after an optional prefix {target.arch.prefixes[:-1]}). "
        "Is the adapter for another architecture? Embeddings and LM heads "
        "are not mapped."
    )


def _plan_lora(config, key, path, layer, kind, parts, verb):
    """The `_LoraModule` of `key`, and the assignment of its base bias (for
    `bias="lora_only"`/`"all"`)."""
    if kind != "linear":
        fail(
            f"{verb}: module '{key}' ({kind}) carries LoRA factors, but only "
            "linear projections can be adapted from PEFT files."
        )
    missing = [p for p in ("A", "B") if p not in parts]
    if missing:
        fail(
            f"{verb}: module '{key}' has no lora_{missing[0]}.weight; the "
            "file is incomplete."
        )
    if parts.keys() & {"weight", "bias"}:
        fail(
            f"{verb}: module '{key}' has LoRA factors and plain weights at "
            "once; PEFT cannot produce that."
        )
    targets = config.get("target_modules")
    if peft_format.selects(targets, key) is False:
        fail(
            f"{verb}: the file has LoRA factors for '{key}', which "
            f"target_modules={targets!r} does not select (PEFT itself would "
            "ignore them); the file and its config disagree."
        )
    excluded = config.get("exclude_modules")
    if excluded and peft_format.selects(excluded, key):
        fail(
            f"{verb}: the file has LoRA factors for '{key}', which "
            f"exclude_modules={excluded!r} excludes; the file and its config "
            "disagree."
        )
    use_dora = bool(config.get("use_dora"))
    if use_dora != ("magnitude" in parts):
        fail(
            f"{verb}: module '{key}' "
            + (
                "has no lora_magnitude_vector, but use_dora=true"
                if use_dora
                else "has a lora_magnitude_vector, but use_dora=false"
            )
            + "; the file and its config disagree."
        )
    cls = linear_adapter_class(layer, key, path, verb)
    cls.check_convertible(layer, path)
    layout = cls.kernel_layout(layer)
    if layout.batch_shape:
        fail(
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
            fail(
                f"{verb}: {key}.{what} has shape {tuple(value.shape)}, but "
                f"Keras layer '{path}' (kernel {layout.kernel_shape}: "
                f"{layout.d} inputs, {layout.k} outputs) needs {shape}. The "
                "adapter was made for a model of another size."
            )
    alpha = peft_format.file_alpha(config, key, rank, verb, "module")
    layout.check_rank(
        rank, path, f" (module '{key}' of the PEFT file has rank {rank})"
    )
    bias = []
    if "base_bias" in parts:
        if getattr(layer, "bias", None) is None:
            fail(
                f"{verb}: the file holds a bias for '{key}', but Keras layer "
                f"'{path}' has no bias."
            )
        value = parts["base_bias"].reshape(tuple(layer.bias.shape))
        bias.append((layer.bias, value, f"{key}.base_layer.bias"))
    values = keras_factors(layout, parts)
    return _LoraModule(key, path, layer, values, int(rank), alpha), bias


def _plan_plain(key, path, layer, kind, parts, verb):
    """Assignments of plain (bias="all" or modules_to_save) tensors."""
    out = []
    if kind == "embedding":
        fail(
            f"{verb}: the file holds the whole token embedding '{key}' "
            "(modules_to_save); keras_lowrank reads its rows as "
            "trainable_token_indices only."
        )
    if kind == "norm":
        if not isinstance(layer, keras.layers.LayerNormalization):
            fail(
                f"{verb}: module '{key}' maps to '{path}', which is not a "
                "LayerNormalization."
            )
        names = {"weight": "gamma", "bias": "beta"}
        for what, value in parts.items():
            variable = getattr(layer, names[what], None)
            if variable is None:
                fail(
                    f"{verb}: Keras layer '{path}' has no {names[what]} for "
                    f"{key}.{what}."
                )
            out.append(_assign(variable, value, f"{key}.{what}", path, verb))
        return out
    cls = linear_adapter_class(layer, key, path, verb)
    layout = cls.kernel_layout(layer)
    for what in sorted(parts, key=("weight", "bias").index):
        value = parts[what]
        if what == "weight":
            if tuple(value.shape) != (layout.k, layout.d):
                fail(
                    f"{verb}: {key}.weight has shape {tuple(value.shape)}, "
                    f"but Keras layer '{path}' needs ({layout.k}, "
                    f"{layout.d}). The adapter was made for another model "
                    "size (or another number of labels)."
                )
            kernel = kernel_from_linear(layout, value)
            out.append(
                (cls.kernel_variable(layer), kernel, f"{key}.weight")
            )
        else:
            if getattr(layer, "bias", None) is None:
                fail(
                    f"{verb}: the file holds {key}.bias, but Keras layer "
                    f"'{path}' has no bias."
                )
            out.append(_assign(layer.bias, value, f"{key}.bias", path, verb))
    return out


def _assign(variable, value, what, path, verb):
    size = math.prod(variable.shape)
    if value.size != size:
        fail(
            f"{verb}: {what} has {value.size} values, but '{path}' needs "
            f"{tuple(variable.shape)}. The adapter was made for another "
            "model size."
        )
    return (variable, value.reshape(variable.shape), what)


