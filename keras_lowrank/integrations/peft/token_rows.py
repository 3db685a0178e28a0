"""PEFT's `trainable_token_indices` in and out: token-rows adapters.

PEFT stores the trained rows' *values* (`<embedding>.token_adapter.
trainable_tokens_delta`, `(n, width)`, despite the name: its merge copies
them into the table), keras_lowrank their change `B` against the base
table (`layers.token_rows`). So a load sets `B = rows − W[ids]` and an
export writes `W[ids] + B`, where `W` is the base table. PEFT ties the rows
of a tied output layer to the embedding's, as `LowRankReversibleEmbedding`
does, and leaves an untied output layer alone, as it does too.
"""

import numbers

import numpy as np
from keras import ops

from keras_lowrank.integrations.peft.format import KEY_PREFIX
from keras_lowrank.integrations.peft.format import fail
from keras_lowrank.integrations.peft.mapping import as_numpy
from keras_lowrank.surgery.walk import find_layer

SUFFIX = ".token_adapter.trainable_tokens_delta"
FIELD = "trainable_token_indices"


def plan_token_rows(target, config, tensors, verb):
    """`({keras path: (layer, ids, rows)}, the other tensors)`, checked.

    Args:
        target: the model, as a `mapping.Target`.
        config: the folder's config.
        tensors: the folder's tensors (name → float32 array).
        verb: the public function, for messages.

    Example:

    >>> import keras_hub, numpy as np
    >>> from keras_lowrank.integrations.peft.mapping import Target
    >>> lm = keras_hub.models.Llama3Backbone(vocabulary_size=10,
    ...     num_layers=1, num_query_heads=1, num_key_value_heads=1,
    ...     hidden_dim=4, intermediate_dim=8)
    >>> rows = {"base_model.model.embed_tokens" + SUFFIX: np.ones((1, 4))}
    >>> plan, rest = plan_token_rows(Target.of(lm, "ex"),
    ...     {FIELD: [7]}, rows, "ex")
    >>> [(path, ids) for path, (_, ids, _) in plan.items()], rest
    ([('token_embedding', [7])], {})
    """
    plan, rest = {}, {}
    for name, value in tensors.items():
        if not name.endswith(SUFFIX):
            rest[name] = value
            continue
        key = name[len(KEY_PREFIX):-len(SUFFIX)]
        hit = target.resolve(key) if name.startswith(KEY_PREFIX) else None
        if hit is None or hit[0] != "embedding":
            fail(
                f"{verb}: the file trains token rows of '{key}', which is "
                f"not the token embedding of the {target.arch.name} table."
            )
        path = hit[2]
        layer = find_layer(target.model, path)
        ids = ids_for(config, key, verb)
        vocab, width = tuple(layer.embeddings.shape)
        if tuple(value.shape) != (len(ids), width):
            fail(
                f"{verb}: {name} has shape {tuple(value.shape)}, but "
                f"{FIELD} lists {len(ids)} id(s) of the Keras layer "
                f"'{path}' ({vocab}x{width}), which needs "
                f"({len(ids)}, {width}); the file and its config disagree."
            )
        plan[path] = (layer, ids, value)
    if config.get(FIELD) and not plan:
        fail(
            f"{verb}: the config sets {FIELD}={config[FIELD]!r}, but the file "
            f"holds no '{SUFFIX[1:]}'; the file is incomplete."
        )
    return plan, rest


def ids_for(config, key, verb):
    """The token ids `config` trains in module `key`: a list applies to the
    token embedding; a dict maps module names (exact or a `.` suffix)."""
    value = config.get(FIELD)
    if isinstance(value, dict):
        picked = [
            ids for module, ids in value.items()
            if key == module or key.endswith("." + module)
        ]
        value = picked[0] if len(picked) == 1 else None
    if not isinstance(value, list) or not value or not all(
        isinstance(i, numbers.Integral) and not isinstance(i, bool)
        for i in value
    ):
        fail(
            f"{verb}: the file trains token rows of '{key}', but {FIELD}="
            f"{config.get(FIELD)!r} gives no list of ids for it; the file "
            "and its config disagree."
        )
    return [int(i) for i in value]


def assign_rows(layer, name, ids, rows):
    """Sets adapter `name`'s change so that the rows `ids` become `rows`."""
    base = ops.take(ops.cast(layer.embeddings, "float32"), ids, axis=0)
    layer.adapter_variables(name)["B"].assign(
        ops.subtract(ops.convert_to_tensor(rows, "float32"), base)
    )


def export_token_rows(visits, modules, name, verb):
    """`(tensors, ids)` for adapter `name`'s token rows on `visits` (each
    with its `transformers` module name in `modules`).

    PEFT's `trainable_token_indices` list names the token embedding's rows,
    so one table per adapter is exported.
    """
    if len(visits) > 1:
        fail(
            f"{verb}: adapter {name!r} trains token rows of several layers "
            f"({', '.join(repr(v.path) for v in visits)}); PEFT's "
            f"{FIELD} list holds the token embedding's."
        )
    tensors = {}
    ids = []
    for visit, module in zip(visits, modules):
        layer = visit.layer
        others = [n for n in layer.merged_adapters if n != name]
        if others:
            fail(
                f"{verb}: layer '{visit.path}' holds the merged adapter "
                f"{others[0]!r}, so its table is not the base model's. "
                "keras_lowrank.unmerge(model) first."
            )
        ids = list(layer.adapter_spec(name).token_ids)
        table = as_numpy(layer.embeddings).astype("float32")[ids]
        if name not in layer.merged_adapters:
            table = table + as_numpy(layer.adapter_variables(name)["B"])
        tensors[f"{KEY_PREFIX}{module}{SUFFIX}"] = np.asarray(table, "float32")
    return tensors, ids
