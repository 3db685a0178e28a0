"""`adapt(..., trainable_tokens=...)`: which embedding rows train, as plan
entries of token-rows adapters (`AdapterSpec.for_tokens`).

The rows' change is an adapter like the others (see `layers.token_rows`), so
it installs, switches, merges, saves and rolls back with the adapter it
belongs to. This module only turns the argument into
`[(walk.Visit, AdapterSpec)]`; `adapt_checks.check_plan` checks the entries
against their layers (kind, id range, width) with everything else.
"""

import collections.abc

from keras_lowrank.integrations import keras_hub as hub_integration
from keras_lowrank.layers import adapter_class_for
from keras_lowrank.spec import AdapterSpec
from keras_lowrank.spec import check_token_ids
from keras_lowrank.surgery import targets as targeting
from keras_lowrank.surgery.walk import walk


def token_plan(model, trainable_tokens, chosen):
    """The plan entries for `trainable_tokens`, in model order.

    Args:
        model: the model being adapted.
        trainable_tokens: `None`; a list of token ids (rows of the model's
            token embedding: a KerasHub backbone's `token_embedding`, else
            the model's only embedding layer); or `{target: [ids]}`, targets
            in the forms `targets` takes.
        chosen: the visits the low-rank adapter goes on (`targets`).

    Returns:
        `[(visit, AdapterSpec.for_tokens(ids))]`.

    Example:

    >>> import keras
    >>> model = keras.Sequential([keras.Input((3,), dtype="int32"),
    ...     keras.layers.Embedding(10, 4), keras.layers.Dense(2)])
    >>> [(v.path, s.token_ids) for v, s in token_plan(model, [7], [])]
    [('embedding', (7,))]
    """
    if trainable_tokens is None:
        return []
    if isinstance(trainable_tokens, collections.abc.Mapping):
        entries = []
        for target, ids in trainable_tokens.items():
            ids = check_token_ids(ids)
            hits = targeting.select_any_layers(
                model, [target], "trainable_tokens"
            )
            entries.extend((visit, ids) for visit in hits)
    else:
        ids = check_token_ids(trainable_tokens)
        entries = [(_token_embedding(model), ids)]
    plan, seen = [], {}
    lora = {id(visit.layer) for visit in chosen}
    for visit, ids in entries:
        if id(visit.layer) in seen:
            raise ValueError(
                f"keras_lowrank: layer '{visit.path}' is named by two "
                "trainable_tokens entries. Give its ids in one entry."
            )
        seen[id(visit.layer)] = visit
        if id(visit.layer) in lora:
            raise ValueError(
                f"keras_lowrank: layer '{visit.path}' is in `targets` and in "
                "`trainable_tokens`; one adapter holds one update per layer. "
                f"Leave it out of the targets (exclude=['{visit.path}']), or "
                "train its rows in a separate adapter."
            )
        if not _holds_rows(visit.layer):
            raise ValueError(
                f"keras_lowrank: trainable_tokens names layer "
                f"'{visit.path}', a {type(visit.layer).__name__}; token rows "
                "belong to an Embedding (or KerasHub ReversibleEmbedding) "
                "layer. Name the token embedding."
            )
        plan.append((visit, AdapterSpec.for_tokens(list(ids), visit.path)))
    order = {id(v.layer): i for i, v in enumerate(walk(model))}
    return sorted(plan, key=lambda entry: order[id(entry[0].layer)])


def _holds_rows(layer):
    cls = adapter_class_for(layer)
    return cls is not None and getattr(cls, "takes_token_rows", False)


def _token_embedding(model):
    visits = walk(model)
    backbone = hub_integration.backbone_of(model)
    table = getattr(backbone, "token_embedding", None)
    if table is not None:
        for visit in visits:
            if visit.layer is table:
                return visit
    tables = [v for v in visits if _holds_rows(v.layer)]
    if len(tables) == 1:
        return tables[0]
    found = ", ".join(repr(v.path) for v in tables) or "none"
    raise ValueError(
        f"keras_lowrank: trainable_tokens=[...] trains rows of the model's "
        f"token embedding, but model '{model.name}' has "
        f"{len(tables)} embedding layers ({found}). Name the layer: "
        "trainable_tokens={'<layer path>': [ids]}."
    )
