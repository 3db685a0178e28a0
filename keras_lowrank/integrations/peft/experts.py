"""PEFT `target_parameters` (MoE expert banks) ↔ KerasHub expert kernels.

`transformers` 5 keeps the experts of one MoE layer as fused 3-D
`nn.Parameter`s (`gate_up_proj (E, 2I, H)`, `down_proj (E, H, I)`), which
PEFT adapts with `LoraConfig(target_parameters=[...])`: one `ParamWrapper`
per parameter, with

- `lora_A.weight (E·r, in)`, expert-major: `A_e = lora_A.reshape(E, r, in)[e]`;
- `lora_B.weight (out, r·E)`, rank-major: `B_e = lora_B.reshape(out, r, E)[..., e]`;
- `ΔW_e = s·B_e·A_e` in the `(out, in)` layout, `s = lora_alpha/r` (or
  `/sqrt(r)`), one rank for all experts.

The Keras expert kernel is `(E, in, out)`, so the Keras factors are the
per-expert transposes, `A (E, in, r)` and `B (E, r, out)`
(`keras_expert_factors`, `peft_expert_factors`); this holds whether or not
the parameter is stored transposed, because only the base weight's layout
differs. Several parameters of one module nest their wrappers, the first in
`named_parameters` order innermost, so the i-th of n targeted parameters has
its tensors under `"base_layer." * (n-1-i)`.

A fused PEFT parameter can hold several Keras kernels as blocks of its
output columns (Mixtral's `gate_up_proj` is `[gate | up]`, two Keras
kernels): a rank-r PEFT adapter loads as a rank-r adapter on each, with the
same `A` and its `B` split; Keras adapters of ranks `r_g`, `r_u` export as
one of rank `r_g + r_u` (`A = [A_g, A_u]`, block-diagonal `B`; the rank goes
into `rank_pattern`), or of rank r when both share one `A` (an imported
adapter). Both are exact.
"""

import dataclasses
import re

import numpy as np

from keras_lowrank.integrations import moe
from keras_lowrank.integrations.peft import format as peft_format
from keras_lowrank.integrations.peft.format import KEY_PREFIX
from keras_lowrank.integrations.peft.format import fail
from keras_lowrank.integrations.peft.mapping import as_numpy
from keras_lowrank.integrations.peft.mapping import first
from keras_lowrank.layers import adapter_class_for
from keras_lowrank.surgery.walk import walk


def keras_expert_factors(lora_a, lora_b, experts):
    """PEFT's `ParamWrapper` factors as the Keras `A (E, in, r)`,
    `B (E, r, out)`.

    Args:
        lora_a: `lora_A.weight`, `(E·r, in)`.
        lora_b: `lora_B.weight`, `(out, r·E)`.
        experts: `E`.

    Example:

    >>> a, b = keras_expert_factors(np.ones((6, 4)), np.ones((5, 6)), 3)
    >>> a.shape, b.shape
    ((3, 4, 2), (3, 2, 5))
    """
    lora_a, lora_b = np.asarray(lora_a), np.asarray(lora_b)
    rank = lora_a.shape[0] // experts
    a = lora_a.reshape(experts, rank, lora_a.shape[-1])
    b = lora_b.reshape(lora_b.shape[0], rank, experts)
    return (
        as_numpy(a.transpose(0, 2, 1)),
        as_numpy(b.transpose(2, 1, 0)),
    )


def peft_expert_factors(a, b):
    """The Keras `A (E, in, r)`, `B (E, r, out)` as PEFT's `lora_A.weight`
    `(E·r, in)` and `lora_B.weight` `(out, r·E)`; the reverse of
    `keras_expert_factors`.

    Args:
        a: the Keras `A`.
        b: the Keras `B`.

    Example:

    >>> rng = np.random.default_rng(0)
    >>> a, b = rng.normal(size=(3, 4, 2)), rng.normal(size=(3, 2, 5))
    >>> la, lb = peft_expert_factors(a, b)
    >>> back = keras_expert_factors(la, lb, 3)
    >>> la.shape, lb.shape, bool(np.allclose(back[0], a) and np.allclose(back[1], b))
    ((6, 4), (5, 6), True)
    """
    a, b = np.asarray(a), np.asarray(b)
    experts, d, rank = a.shape
    lora_a = a.transpose(0, 2, 1).reshape(experts * rank, d)
    lora_b = b.transpose(2, 1, 0).reshape(b.shape[2], rank * experts)
    return as_numpy(lora_a), as_numpy(lora_b)


@dataclasses.dataclass
class ExpertLora:
    """One Keras expert kernel to adapt from a PEFT parameter adapter (the
    fields of `plan._LoraModule`).

    Args:
        key: the `transformers` parameter name
            (`"model.layers.0.mlp.experts.gate_up_proj"`).
        path: the Keras path of the `ExpertKernel`.
        layer: the `ExpertKernel`.
        values: `A (E, d, r)` and `B (E, r, k)`, float32.
        rank: its rank.
        alpha: its `lora_alpha`.

    Example: see `plan_experts`.
    """

    key: str
    path: str
    layer: object
    values: dict
    rank: int
    alpha: float


def banks(target):
    """`{block index: (Keras path, expert layer)}` of `target`'s expert banks,
    found by structure (the MoE block's own name is auto-generated).

    Args:
        target: a `mapping.Target` whose architecture has `experts`.

    Example:

    >>> import keras_hub
    >>> from keras_lowrank.integrations.peft.mapping import Target
    >>> model = keras_hub.models.MixtralBackbone(
    ...     vocabulary_size=16, num_layers=2, num_query_heads=2,
    ...     hidden_dim=8, intermediate_dim=6, num_key_value_heads=1,
    ...     num_experts=4, top_k=2)
    >>> {i: path.split("/")[-1] for i, (path, _) in
    ...  banks(Target.of(model, "ex")).items()}
    {0: 'experts', 1: 'experts'}
    """
    spec = target.arch.experts
    pattern = re.compile(
        re.escape(target.backbone_path + spec.block).replace(
            r"\{i\}", r"(?P<i>\d+)"
        )
        + "/"
    )
    out = {}
    for visit in walk(target.model):
        if moe.expert_layer_kind(visit.layer) is None:
            continue
        match = pattern.match(visit.path)
        if match:
            out[int(match["i"])] = (visit.path, visit.layer)
    return out


def _kernel(bank, attr, key, verb):
    """The `ExpertKernel` child of `bank` for `attr` (the bank is prepared)."""
    path, layer = bank
    child = getattr(layer, moe.child_attr(attr), None)
    if child is None:
        fail(
            f"{verb}: module '{key}' maps to Keras layer '{path}' "
            f"({type(layer).__name__}), which has no expert kernel {attr!r}; "
            "the adapter belongs to another architecture."
        )
    return f"{path}/{child.name}", child


def selects_parameter(targets, key):
    """PEFT's `target_parameters` rule: `key` (`module.param`) is an entry or
    ends with `"." + entry`.

    Args:
        targets: the config's `target_parameters`.
        key: `"<module name>.<parameter name>"`.

    Example:

    >>> key = "model.layers.0.mlp.experts.down_proj"
    >>> selects_parameter(["mlp.experts.down_proj"], key)
    True
    >>> selects_parameter(["experts.gate_up_proj", "proj"], key)
    False
    """
    return any(key == t or key.endswith("." + t) for t in targets)


_REST = re.compile(r"(?P<nest>(?:\.base_layer)*)\.lora_(?P<what>[AB])\.weight")


def _module_pattern(target):
    spec = target.arch.experts
    prefixes = "|".join(re.escape(p) for p in target.arch.prefixes)
    body = re.escape(spec.hf).replace(r"\{i\}", r"(?P<i>\d+)")
    return re.compile(rf"(?P<module>(?:{prefixes}){body})(?P<rest>\..+)")


def plan_experts(target, config, tensors, verb):
    """The expert adapters of a PEFT folder, checked: `(loras, the other
    tensors)`. Raises on the first problem, before anything changes.

    Args:
        target: the model, as a `mapping.Target` (its expert layers
            prepared, `moe.prepared`).
        config: the folder's checked `adapter_config.json`.
        tensors: the folder's tensors.
        verb: the public function, for messages.

    Example:

    >>> import keras_hub
    >>> from keras_lowrank.integrations import moe
    >>> from keras_lowrank.integrations.peft.mapping import Target
    >>> model = keras_hub.models.MixtralBackbone(
    ...     vocabulary_size=16, num_layers=1, num_query_heads=2,
    ...     hidden_dim=8, intermediate_dim=6, num_key_value_heads=1,
    ...     num_experts=4, top_k=2)
    >>> key = "base_model.model.layers.0.mlp.experts"
    >>> tensors = {key + ".lora_A.weight": np.ones((8, 8), "float32"),
    ...            key + ".lora_B.weight": np.ones((12, 8), "float32")}
    >>> config = {"r": 2, "target_parameters": ["gate_up_proj"]}
    >>> with moe.prepared(model):
    ...     loras, rest = plan_experts(Target.of(model, "ex"), config,
    ...                                tensors, "ex")
    >>> [(p.path.split("/")[-1], p.values["B"].shape) for p in loras]
    [('expert_feedforward_gate_dense', (4, 2, 6)), ('expert_feedforward_intermediate_dense', (4, 2, 6))]
    """
    wanted = config.get("target_parameters") or []
    spec = target.arch.experts
    if wanted and spec is None:
        fail(
            f"{verb}: the adapter sets target_parameters={wanted!r}, which "
            "adapts raw nn.Parameters (MoE experts), but the "
            f"{target.arch.name} table has no expert banks. The adapter "
            "belongs to a mixture-of-experts architecture."
        )
    if spec is None:
        return [], tensors
    if not isinstance(wanted, (list, tuple)) or not all(
        isinstance(t, str) for t in wanted
    ):
        fail(f"{verb}: target_parameters must be a list of names.")
    pattern = _module_pattern(target)
    found, rest, strays = {}, {}, []
    for name, value in sorted(tensors.items()):
        match = name.startswith(KEY_PREFIX) and pattern.fullmatch(
            name[len(KEY_PREFIX):]
        )
        if not match:
            rest[name] = value
            continue
        part = _REST.fullmatch(match["rest"])
        if part is None:
            strays.append(name)
            continue
        depth = part["nest"].count(".base_layer")
        entry = found.setdefault(match["module"], (int(match["i"]), {}))
        entry[1].setdefault(depth, {})[part["what"]] = value
    if strays:
        fail(
            f"{verb}: tensor(s) {first(strays)} of an expert module are not "
            "lora_A/lora_B weights; PEFT's ParamWrapper (target_parameters) "
            "saves nothing else (no DoRA magnitude, no LoRA bias)."
        )
    if not found:
        return [], rest
    key0 = next(iter(found))
    all_banks = banks(target)
    where = f"expert module '{key0}'"
    if found[key0][0] in all_banks:
        where += f" (Keras layer '{all_banks[found[key0][0]][0]}')"
    if not wanted:
        fail(
            f"{verb}: the file has LoRA factors for {where}, but the config "
            "sets no target_parameters; the file and its config disagree."
        )
    _refuse_variants(config, where, verb)
    loras = []
    for key, (index, depths) in found.items():
        loras.extend(
            _plan_module(target, config, key, index, depths, all_banks, verb)
        )
    return loras, rest


def _refuse_variants(config, where, verb):
    """What PEFT's `ParamWrapper` refuses (it raises on such a config)."""
    if config.get("use_dora"):
        fail(
            f"{verb}: the adapter sets use_dora=true and adapts {where} "
            "through target_parameters, which PEFT's ParamWrapper refuses "
            "(no DoRA on parameters), so PEFT cannot have made it. Save the "
            "expert adapter with use_dora=False."
        )
    dropout = config.get("lora_dropout") or 0.0
    if dropout:
        fail(
            f"{verb}: the adapter sets lora_dropout={dropout!r} and adapts "
            f"{where} through target_parameters, which PEFT's ParamWrapper "
            "refuses (dropout != 0 cannot be factored out of a parameter). "
            "Set lora_dropout to 0 in adapter_config.json (dropout only acts "
            "in training; the factors stay valid)."
        )


def _plan_module(target, config, key, index, depths, all_banks, verb):
    spec = target.arch.experts
    wanted = config["target_parameters"]
    bank = all_banks.get(index)
    if bank is None:
        fail(
            f"{verb}: expert module '{key}' maps to decoder block {index}, "
            f"which this {type(target.backbone).__name__} does not have or "
            "which has no expert layer (a dense-MLP block). The adapter was "
            "made for another model; load it into the model it was trained "
            "on."
        )
    targeted = [
        p for p in spec.params if selects_parameter(wanted, f"{key}.{p.hf}")
    ]
    out = []
    for depth, parts in sorted(depths.items()):
        stem = key + ".base_layer" * depth
        if depth >= len(targeted):
            fail(
                f"{verb}: the file has LoRA factors under '{stem}', but "
                f"target_parameters={wanted!r} selects "
                f"{len(targeted)} parameter(s) of '{key}' (PEFT nests one "
                "'base_layer.' per further parameter); the file and its "
                "config disagree."
            )
        param = targeted[len(targeted) - 1 - depth]
        for what in ("A", "B"):
            if what not in parts:
                fail(
                    f"{verb}: '{stem}' ({key}.{param.hf}) has no "
                    f"lora_{what}.weight; the file is incomplete."
                )
        out.extend(
            _plan_param(config, f"{key}.{param.hf}", stem, param, bank, parts,
                        verb)
        )
    return out


def _plan_param(config, key, stem, param, bank, parts, verb):
    kernels = [_kernel(bank, attr, key, verb) for attr in param.kernels]
    layouts = []
    for path, child in kernels:
        cls = adapter_class_for(child)
        cls.check_convertible(child, path)
        layouts.append(cls.kernel_layout(child))
    experts, d, _ = layouts[0].kernel_shape
    out_features = sum(layout.k for layout in layouts)
    lora_a, lora_b = parts["A"], parts["B"]
    rank = lora_a.shape[0] // experts
    needs = {"A": (experts * rank, d), "B": (out_features, experts * rank)}
    for what, value in (("A", lora_a), ("B", lora_b)):
        if rank < 1 or tuple(value.shape) != needs[what]:
            fail(
                f"{verb}: {stem}.lora_{what}.weight ({key}) has shape "
                f"{tuple(value.shape)}, but Keras layer "
                f"'{kernels[0][0].rsplit('/', 1)[0]}' ({experts} experts, "
                f"{d} inputs, {out_features} outputs) needs "
                f"{needs[what] if rank else '(E·r, in)'}. The adapter was "
                "made for a model of another size."
            )
    alpha = peft_format.file_alpha(config, key, rank, verb, "parameter")
    a, b = keras_expert_factors(lora_a, lora_b, experts)
    out, start = [], 0
    for (path, child), layout in zip(kernels, layouts):
        layout.check_rank(
            rank, path, f" (parameter '{key}' of the PEFT file has rank {rank})"
        )
        values = {"A": a, "B": b[..., start:start + layout.k]}
        start += layout.k
        out.append(ExpertLora(key, path, child, values, int(rank), alpha))
    return out
