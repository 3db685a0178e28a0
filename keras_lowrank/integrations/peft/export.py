"""`export_peft_adapter`: one adapter of a KerasHub model as a PEFT folder.

The reverse of `load`: every adapted layer is named through the
architecture's table (`mapping.Target.hf_name`), the adapter is checked to be
expressible as one `LoraConfig` over the original base weights, and the
tensors and config are written by `format.write_folder`, which replaces the
folder as a whole.
"""

import os
import re

import keras
import numpy as np

from keras_lowrank.errors import check_known_adapter
from keras_lowrank.integrations.peft import format as peft_format
from keras_lowrank.integrations.peft.expert_export import export_experts
from keras_lowrank.integrations.peft.expert_export import is_expert_visit
from keras_lowrank.integrations.peft.format import KEY_PREFIX
from keras_lowrank.integrations.peft.format import fail
from keras_lowrank.integrations.peft.mapping import Target
from keras_lowrank.integrations.peft.mapping import as_numpy
from keras_lowrank.integrations.peft.mapping import first
from keras_lowrank.integrations.peft.mapping import linear_weight
from keras_lowrank.integrations.peft.mapping import most_common
from keras_lowrank.integrations.peft.mapping import peft_factors
from keras_lowrank.integrations.peft.token_rows import FIELD as TOKEN_FIELD
from keras_lowrank.integrations.peft.token_rows import export_token_rows
from keras_lowrank.layers import LowRankLayer
from keras_lowrank.layers import adapter_class_for
from keras_lowrank.state.model_state import state_of
from keras_lowrank.state.transaction import transaction
from keras_lowrank.surgery.walk import find_layer
from keras_lowrank.surgery.walk import walk


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
    written as `modules_to_save`. MoE expert adapters (Mixtral, Qwen2-MoE,
    Qwen3-MoE) are written as PEFT `target_parameters` adapters of the
    experts' `gate_up_proj`/`down_proj` (plain LoRA without dropout only,
    as PEFT's `ParamWrapper` requires; see docs/peft.md).

    The folder is replaced as a whole: everything is written into a new
    sibling folder, which then takes the place of the old one, so a failed
    export leaves an existing folder exactly as it was (and no stale file of
    an earlier export survives a successful one).

    Args:
        model: an adapted KerasHub model of a supported architecture.
        path: the folder to write (created if needed, replaced with all its
            contents if it exists).
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
    verb = "export_peft_adapter"
    with transaction(model, verb, read_only=True):
        config, tensors = _gather(
            model, name, module_prefix, base_model_name_or_path, verb
        )
    peft_format.write_folder(os.fspath(path), config, tensors, verb)
    return path


def _gather(model, name, module_prefix, base_model_name_or_path, verb):
    """`(config, tensors)` of the PEFT folder for adapter `name`."""
    target = Target.of(model, verb)
    state = state_of(model)
    name = _pick_adapter(model, state, name, verb)
    prefix = _export_prefix(target, module_prefix, verb)
    entries, expert_visits, token_visits = _mapped_layers(
        model, target, name, prefix, verb
    )
    if not entries and not expert_visits:
        fail(
            f"{verb}: adapter {name!r} trains token rows only; a PEFT LoRA "
            "folder needs LoRA modules beside its trainable_token_indices. "
            "Adapt with targets as well (adapt(..., trainable_tokens=...) "
            "with the default targets)."
        )
    spec = _one_config(
        entries + [(visit, None) for visit in expert_visits], name, verb
    )
    expert_tensors, expert_ranks, expert_alphas, parameters = (
        export_experts(target, expert_visits, name, prefix, verb)
        if expert_visits else ({}, {}, {}, [])
    )

    tensors = {}
    ranks, alphas = {}, {}
    bias_policy = (state.options.get(name) or {}).get("bias", "none")
    for visit, module in entries:
        layer = visit.layer
        layout = layer.lowrank_layout
        factors = peft_factors(layout, layer.adapter_variables(name))
        for suffix, value in factors.items():
            tensors[f"{KEY_PREFIX}{module}.{suffix}"] = value
        if bias_policy != "none" and layer.bias is not None:
            tensors[f"{KEY_PREFIX}{module}.base_layer.bias"] = np.reshape(
                as_numpy(layer.bias), (layout.k,)
            )
        layer_spec = layer.adapter_spec(name)
        ranks[module], alphas[module] = layer_spec.rank, layer_spec.alpha
    lora_modules = set(ranks)
    tensors.update(expert_tensors)
    token_tensors, token_ids = export_token_rows(
        [v for v, _ in token_visits], [m for _, m in token_visits], name, verb
    )
    tensors.update(token_tensors)

    to_save = _export_kept(target, state, prefix, lora_modules, tensors, verb)
    if bias_policy == "all":
        _export_all_biases(target, prefix, lora_modules, to_save, tensors, verb)

    config = _export_config(
        target, ranks, alphas, spec, bias_policy, to_save,
        base_model_name_or_path, prefix, (expert_ranks, expert_alphas),
    )
    if parameters:
        config["target_parameters"] = parameters
    if token_ids:
        config[TOKEN_FIELD] = token_ids
    return config, tensors


def _mapped_layers(model, target, name, prefix, verb):
    """`(visit, transformers module name)` for each layer holding adapter
    `name`, every one an `nn.Linear` of the table; the expert kernels
    holding it (`experts.export_experts` names those); and the token
    embedding's rows, `(visit, module)`, when the adapter trains some."""
    from keras_lowrank.state.model_state import adapted_visits

    entries = []
    experts = []
    tokens = []
    unmapped = []
    for visit in adapted_visits(model):
        if name not in visit.layer.adapter_names:
            continue
        if is_expert_visit(visit):
            experts.append(visit)
            continue
        hit = target.hf_name(visit.path, prefix)
        if visit.layer.adapter_spec(name).is_token_rows and hit is not None:
            if hit[0] == "embedding":
                tokens.append((visit, hit[1]))
                continue
        if hit is None or hit[0] != "linear":
            unmapped.append(visit.path)
        else:
            entries.append((visit, hit[1]))
    if unmapped:
        fail(
            f"{verb}: adapter {name!r} is on layer(s) {first(unmapped)}, "
            f"which have no nn.Linear counterpart in the {target.arch.name} "
            "table, so PEFT could not load them. Export an adapter that "
            "targets only attention and MLP projections (delete and re-adapt "
            "without those layers)."
        )
    return entries, experts, tokens


def _one_config(entries, name, verb):
    """The spec all layers of adapter `name` share, once it is checked that
    one `LoraConfig` over the original base weights describes them all."""
    specs = [visit.layer.adapter_spec(name) for visit, _ in entries]
    for field in ("method", "scaling", "dropout", "init"):
        values = {getattr(s, field) for s in specs}
        if len(values) > 1:
            fail(
                f"{verb}: adapter {name!r} mixes {field} values "
                f"{sorted(map(str, values))} across layers; one LoraConfig "
                "has one."
            )
    spec = specs[0]
    if spec.rewrites_kernel:
        fail(
            f"{verb}: adapter {name!r} was initialised with init="
            f"{spec.init!r}, which rewrote the Keras kernels into residuals; "
            "PEFT applies adapters to the original base weights, so the "
            "factors alone do not describe the change."
        )
    for visit, _ in entries:
        layer = visit.layer
        others = [
            n for n in layer.adapter_names
            if n != name and layer.adapter_spec(n).rewrites_kernel
        ]
        merged = [n for n in layer.merged_adapters if n != name]
        if others or (merged and spec.method == "dora"):
            fail(
                f"{verb}: layer '{visit.path}' has its kernel changed by "
                f"adapter {(others or merged)[0]!r} (PiSSA/OLoRA residual or "
                "merged), so a DoRA/PiSSA export would not match the original "
                "base model. keras_lowrank.unmerge(model) or delete that "
                "adapter first."
            )
    return spec


def _pick_adapter(model, state, name, verb):
    names = list(state.options)
    if name is not None:
        return check_known_adapter(model, name, names, verb, "name")
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
        if kind == "embedding":
            fail(
                f"{verb}: layer '{kept}' (the token embedding) trains fully; "
                "keras_lowrank exports token embeddings as "
                "trainable_token_indices rows only. Re-adapt with "
                "trainable_tokens=[ids] instead."
            )
        if module in lora_modules:
            fail(f"{verb}: module '{module}' is both adapted and kept.")
        if kind == "norm":
            tensors[f"{KEY_PREFIX}{module}.weight"] = as_numpy(layer.gamma)
            tensors[f"{KEY_PREFIX}{module}.bias"] = as_numpy(layer.beta)
        else:
            layout = adapter_class_for(layer).kernel_layout(layer)
            tensors[f"{KEY_PREFIX}{module}.weight"] = linear_weight(
                layout, adapter_class_for(layer).kernel_variable(layer)
            )
            if layer.bias is not None:
                tensors[f"{KEY_PREFIX}{module}.bias"] = np.reshape(
                    as_numpy(layer.bias), (layout.k,)
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
        tensors[f"{KEY_PREFIX}{module}.bias"] = as_numpy(bias).reshape(-1)
    if unmapped:
        fail(
            f"{verb}: the adapter trains every bias (bias='all'), but "
            f"layer(s) {first(unmapped)} have no counterpart in the "
            f"{target.arch.name} table, so their biases cannot be written."
        )


def _export_config(
    target, ranks, alphas, spec, bias_policy, to_save,
    base_model_name_or_path, prefix, experts,
):
    modules = list(ranks)
    # Expert parameters (`...mlp.experts.gate_up_proj`) share r, lora_alpha
    # and the patterns with the modules.
    ranks = {**ranks, **experts[0]}
    alphas = {**alphas, **experts[1]}
    r = most_common(ranks.values())
    alpha = most_common(alphas.values())
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
        "rank_pattern": _patterns(ranks, r, list(ranks), int),
        "alpha_pattern": _patterns(alphas, alpha, list(ranks), _number),
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


def _number(value):
    value = float(value)
    return int(value) if value.is_integer() else value
