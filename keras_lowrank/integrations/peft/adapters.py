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
The files and PEFT's own `LoraConfig` rules live in `peft_format`.

The factor layouts: a Keras `A` is `(*in_axes, r)` and `B` `(r, *out_axes)`
(`KernelLayout`), so `A = lora_A.weightᵀ` and `B = lora_B.weightᵀ`, each
reshaped from its matrix form; DoRA's magnitude is reshaped to the layer's
`unit_shape`. Both libraries compute DoRA's norm per output unit over the
input features, excluding the bias, and detach it: the same function.
"""

import dataclasses
import math
import numbers
import os
import re

import keras
import numpy as np

from keras_lowrank.integrations import keras_hub as hub_integration
from keras_lowrank.integrations.peft import format as peft_format
from keras_lowrank.integrations.peft import names as peft_tables
from keras_lowrank.integrations.peft.format import KEY_PREFIX
from keras_lowrank.integrations.peft.format import fail
from keras_lowrank.layers import LowRankLayer
from keras_lowrank.layers import adapter_class_for
from keras_lowrank.spec import check_adapter_name
from keras_lowrank.surgery.walk import find_layer
from keras_lowrank.surgery.walk import walk

# --- which model -------------------------------------------------------------


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
            fail(
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
            fail(
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


# --- planning a load ---------------------------------------------------------


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
            fail(
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
    if not loras:
        fail(f"{verb}: the file holds no LoRA factors (lora_A/lora_B).")
    return _Plan(loras, assigns, kept)


def _refuse_unknown(target, config, unknown, verb):
    fused = [
        k for k in unknown
        if any(k.split(".")[-1].startswith(f) for f in target.arch.fused)
    ]
    if fused:
        fail(
            f"{verb}: module(s) {_first(fused)} are fused projections (one "
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
            f"{verb}: modules_to_save module(s) {_first(saved)} have no "
            f"counterpart in {where}, so they cannot be loaded. Mapped "
            f"task heads: {', '.join(heads) or 'none'}; load the adapter "
            "into that task model."
        )
    examples = [
        m.hf.format(i=0) for m in target.arch.linear[:4]
    ]
    fail(
        f"{verb}: module(s) {_first(unknown)} have no KerasHub counterpart "
        f"in the {target.arch.name} table (known modules look like "
        f"{examples}, after an optional prefix {target.arch.prefixes[:-1]}). "
        "Is the adapter for another architecture? Embeddings and LM heads "
        "are not mapped."
    )


def _linear_adapter_class(layer, key, path, verb):
    """The adapter class of `layer`; PEFT LoRA maps onto Dense and
    EinsumDense only, anything else is refused."""
    cls = adapter_class_for(layer)
    if cls is None or not issubclass(
        cls, (keras.layers.Dense, keras.layers.EinsumDense)
    ):
        fail(
            f"{verb}: module '{key}' maps to Keras layer '{path}' "
            f"({type(layer).__name__}), which is not a Dense or EinsumDense "
            "layer."
        )
    return cls


def _plan_lora(target, config, key, path, layer, kind, parts, verb):
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
    cls = _linear_adapter_class(layer, key, path, verb)
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
    r = peft_format.pattern_value(
        config.get("rank_pattern"), key, config.get("r")
    )
    if r != rank:
        fail(
            f"{verb}: module '{key}' has rank {rank} in the file, but the "
            f"config gives it r={r!r} (r / rank_pattern); the file and its "
            "config disagree."
        )
    alpha = peft_format.pattern_value(
        config.get("alpha_pattern"), key, config.get("lora_alpha", 8)
    )
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, numbers.Real)
        or not alpha > 0
    ):
        fail(
            f"{verb}: module '{key}' has lora_alpha {alpha!r}; keras_lowrank "
            "needs a positive number."
        )
    if rank > layout.max_rank:
        fail(
            f"{verb}: module '{key}' has rank {rank}, larger than "
            f"min(in, out) = {layout.max_rank} of Keras layer '{path}'; "
            "keras_lowrank adapters must be low-rank."
        )
    if "base_bias" in parts and getattr(layer, "bias", None) is None:
        fail(
            f"{verb}: the file holds a bias for '{key}', but Keras layer "
            f"'{path}' has no bias."
        )
    return _Lora(key, path, layer, layout, dict(parts), int(rank), alpha)


def _plan_plain(key, path, layer, kind, parts, verb):
    """Assignments of plain (bias="all" or modules_to_save) tensors."""
    out = []
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
    cls = _linear_adapter_class(layer, key, path, verb)
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
            kernel = _from_matrix(layout, value.T)
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
    if len(items) > limit:
        shown += f" and {len(items) - limit} more"
    return shown


# --- load --------------------------------------------------------------------


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
    config = peft_format.read_config(os.fspath(path), verb)
    peft_format.check_config(config, verb)
    tensors = peft_format.read_weights(os.fspath(path), verb)
    plan = _plan_load(target, config, tensors, verb)
    existing = [
        p.path for p in plan.loras
        if isinstance(p.layer, LowRankLayer) and name in p.layer.adapter_names
    ]
    if existing:
        fail(
            f"{verb}: layer '{existing[0]}' already has an adapter named "
            f"{name!r}. Pass another name (name='task_b') or "
            "keras_lowrank.delete_adapter(model, name) first."
        )
    _apply(model, target, config, plan, name)
    return model


def _apply(model, target, config, plan, name):
    from keras_lowrank import lifecycle
    from keras_lowrank.surgery.adapt import adapt

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


# --- export ------------------------------------------------------------------


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
    from keras_lowrank.state.model_state import adapted_visits
    from keras_lowrank.state.model_state import state_of

    verb = "export_peft_adapter"
    target = _Target.of(model, verb)
    state = state_of(model)
    name = _pick_adapter(model, state, name, verb)
    prefix = _export_prefix(target, module_prefix, verb)

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
        fail(
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
            fail(
                f"{verb}: adapter {name!r} mixes {field} values "
                f"{sorted(map(str, values))} across layers; one LoraConfig "
                "has one."
            )
    if first.init in ("pissa", "olora"):
        fail(
            f"{verb}: adapter {name!r} was initialised with init="
            f"{first.init!r}, which rewrote the Keras kernels into residuals; "
            "PEFT applies adapters to the original base weights, so the "
            "factors alone do not describe the change."
        )
    for visit, module in entries:
        others = [
            n for n in visit.layer.adapter_names
            if n != name
            and visit.layer.adapter_spec(n).init in ("pissa", "olora")
        ]
        merged = [n for n in visit.layer.merged_adapters if n != name]
        if others or (merged and first.method == "dora"):
            fail(
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
    peft_format.write_folder(os.fspath(path), config, tensors, verb)
    return path


def _pick_adapter(model, state, name, verb):
    names = list(state.options)
    if name is not None:
        if name not in names:
            fail(
                f"{verb}: model '{model.name}' has no adapter named {name!r}; "
                f"it has {sorted(names)}."
            )
        return name
    if len(names) == 1:
        return names[0]
    if len(state.active) == 1:
        return state.active[0]
    fail(
        f"{verb}: model '{model.name}' has adapters {sorted(names)}; pass "
        "name=... to choose the one to export."
    )


def _export_prefix(target, module_prefix, verb):
    if module_prefix is not None:
        if module_prefix and not module_prefix.endswith("."):
            fail(
                f"{verb}: module_prefix {module_prefix!r} must be empty or "
                "end with '.' (like 'model.')."
            )
        return module_prefix
    if target.backbone is target.model:
        return ""
    if target.task is None:
        fail(
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
            fail(
                f"{verb}: layer '{kept}' trains fully (a task head or "
                "adapt(trainable=...)), so PEFT would need it in "
                "modules_to_save, but "
                + (
                    "it also holds adapters"
                    if hit is not None
                    else "it has no counterpart in the "
                    f"{target.arch.name} table"
                )
                + ". Re-adapt with trainable=[] (or without this layer) "
                "before exporting."
            )
        kind, module = hit
        if module in lora_modules:
            fail(f"{verb}: module '{module}' is both adapted and kept.")
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
        fail(
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

