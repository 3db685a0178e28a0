"""PEFT `target_parameters` export: Keras expert-kernel adapters as PEFT
`ParamWrapper` tensors (the layouts, the nesting and the fusing of column
blocks are described in `experts`, which plans the loading direction).
"""

import math

import numpy as np

from keras_lowrank.integrations.peft.experts import banks
from keras_lowrank.integrations.peft.experts import peft_expert_factors
from keras_lowrank.integrations.peft.format import KEY_PREFIX
from keras_lowrank.integrations.peft.format import fail
from keras_lowrank.integrations.peft.mapping import as_numpy
from keras_lowrank.integrations.peft.mapping import first
from keras_lowrank.layers import ExpertKernel


def is_expert_visit(visit):
    """Whether a walked layer is an expert kernel (adapted or not).

    Args:
        visit: a `walk.Visit`.

    Example:

    >>> import keras
    >>> from keras_lowrank.surgery.walk import walk
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    >>> any(is_expert_visit(v) for v in walk(model))
    False
    """
    return isinstance(visit.layer, ExpertKernel)


def export_experts(target, visits, name, prefix, verb):
    """PEFT tensors and settings for adapter `name` on the expert kernels
    `visits`: `(tensors, ranks, alphas, target_parameters)`, the ranks and
    alphas keyed by parameter name (`model.layers.0.mlp.experts.down_proj`).

    Args:
        target: the model, as a `mapping.Target`.
        visits: the walked `LowRankExpertKernel`s holding adapter `name`.
        name: the adapter.
        prefix: the backbone's module prefix in the `transformers` model.
        verb: the public function, for messages.

    Example:

    >>> import keras_hub, keras_lowrank
    >>> from keras_lowrank.integrations.peft.mapping import Target
    >>> from keras_lowrank.state.model_state import adapted_visits
    >>> model = keras_hub.models.Qwen3MoeBackbone(
    ...     vocabulary_size=16, num_layers=1, num_query_heads=2,
    ...     num_key_value_heads=1, hidden_dim=8, intermediate_dim=16,
    ...     moe_intermediate_dim=6, num_experts=4, head_dim=4, top_k=2)
    >>> _ = keras_lowrank.adapt(model, targets=["experts"], rank=2)
    >>> tensors, ranks, _, params = export_experts(
    ...     Target.of(model, "ex"), adapted_visits(model), "default", "", "ex")
    >>> params, sorted(ranks.values())
    (['mlp.experts.down_proj', 'mlp.experts.gate_up_proj'], [2, 2])
    >>> sorted((k.split("experts.")[1], v.shape) for k, v in tensors.items())
    [('base_layer.lora_A.weight', (8, 8)), ('base_layer.lora_B.weight', (12, 8)), ('lora_A.weight', (8, 6)), ('lora_B.weight', (8, 8))]
    """
    spec = target.arch.experts
    all_banks = banks(target)
    index_of = {path: i for i, (path, _) in all_banks.items()}
    adapted = {}
    unmapped = []
    for visit in visits:
        _check_exportable(visit, name, verb)
        bank_path = visit.path.rsplit("/", 1)[0]
        if spec is None or bank_path not in index_of:
            unmapped.append(visit.path)
            continue
        adapted[(index_of[bank_path], visit.layer.kernel_attr)] = visit.layer
    if unmapped:
        fail(
            f"{verb}: adapter {name!r} is on expert kernel(s) "
            f"{first(unmapped)}, which have no transformers counterpart in "
            f"the {target.arch.name} table, so PEFT could not load them. "
            "Export an adapter without those kernels (delete and re-adapt)."
        )
    tensors, ranks, alphas, chosen = {}, {}, {}, {}
    for index in sorted({i for i, _ in adapted}):
        module = prefix + spec.hf.format(i=index)
        params = [
            p for p in spec.params
            if any((index, attr) in adapted for attr in p.kernels)
        ]
        for position, param in enumerate(params):
            layers = [adapted.get((index, attr)) for attr in param.kernels]
            lora_a, lora_b, rank, alpha = _fuse(layers, name)
            stem = f"{KEY_PREFIX}{module}." + "base_layer." * (
                len(params) - 1 - position
            )
            tensors[stem + "lora_A.weight"] = lora_a
            tensors[stem + "lora_B.weight"] = lora_b
            key = f"{module}.{param.hf}"
            ranks[key], alphas[key] = rank, alpha
            chosen.setdefault(param.hf, set()).add(key)
    return tensors, ranks, alphas, _target_parameters(
        spec, prefix, chosen, all_banks
    )


def _check_exportable(visit, name, verb):
    spec = visit.layer.adapter_spec(name)
    if spec.method != "lora":
        fail(
            f"{verb}: adapter {name!r} on expert kernel '{visit.path}' uses "
            f"method={spec.method!r}; PEFT's ParamWrapper (target_parameters)"
            " refuses DoRA and other LoRA variants, so PEFT could not load "
            "it. Adapt the experts with method='lora' to export them."
        )
    if spec.dropout:
        fail(
            f"{verb}: adapter {name!r} on expert kernel '{visit.path}' has "
            f"dropout={spec.dropout!r}; PEFT's ParamWrapper "
            "(target_parameters) refuses lora_dropout != 0, so PEFT could "
            "not load it. Adapt with dropout=0.0 to export it."
        )


def _fuse(layers, name):
    """One PEFT parameter adapter from the Keras adapters of its column
    blocks (`None` for a block without one): `(lora_A, lora_B, r, alpha)`."""
    present = [layer for layer in layers if layer is not None]
    specs = [layer.adapter_spec(name) for layer in present]
    values = {
        id(layer): {k: as_numpy(v) for k, v in
                    layer.adapter_variables(name).items()}
        for layer in present
    }
    first_a = values[id(present[0])]["A"]
    shared = all(
        s.rank == specs[0].rank
        and np.array_equal(values[id(layer)]["A"], first_a)
        for layer, s in zip(present, specs)
    )
    rank = specs[0].rank if shared else sum(s.rank for s in specs)
    scale = specs[0].scale
    # A block without an adapter keeps zero columns, as wide as its sibling
    # (the blocks are the halves of one parameter).
    columns = [None if x is None else x.kernel.shape[2] for x in layers]
    width = next(c for c in columns if c is not None)
    columns = [width if c is None else c for c in columns]
    experts = first_a.shape[0]
    a = first_a if shared else np.concatenate(
        [values[id(layer)]["A"] for layer in present], axis=-1
    )
    b = np.zeros((experts, rank, sum(columns)), np.float32)
    row, col = 0, 0
    for layer, cols in zip(layers, columns):
        if layer is not None:
            spec = specs[present.index(layer)]
            block = values[id(layer)]["B"] * np.float32(spec.scale / scale)
            rows = slice(0, rank) if shared else slice(row, row + spec.rank)
            b[:, rows, col:col + cols] = block
            row += spec.rank
        col += cols
    # The same scale `s` at the fused rank.
    root = math.sqrt(rank) if specs[0].scaling == "rslora" else rank
    alpha = specs[0].alpha if rank == specs[0].rank else scale * root
    lora_a, lora_b = peft_expert_factors(a, b)
    return lora_a, lora_b, int(rank), alpha


def _target_parameters(spec, prefix, chosen, all_banks):
    """`target_parameters` selecting exactly the exported parameters: the
    short `mlp.experts.<param>` where every bank has it, full names
    otherwise."""
    tail = spec.hf.split("{i}.", 1)[1]
    every = {prefix + spec.hf.format(i=i) for i in all_banks}
    out = []
    for param, keys in sorted(chosen.items()):
        if {f"{m}.{param}" for m in every} <= keys:
            out.append(f"{tail}.{param}")
        else:
            out.extend(sorted(keys))
    return out
