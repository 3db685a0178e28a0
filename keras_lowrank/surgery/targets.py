"""Which layers an adapter goes on: turning `targets`/`exclude` into layers.

A target may be:

- an exact layer name (`"query"`) or a `layer.path` suffix
  (`"self_attention_layer/query"`, `"transformer_layer_0/self_attention_layer/query"`);
- a glob pattern (`"transformer_layer_*/self_attention_layer/query"`),
  matched against the path and the name;
- a regular expression: a `re.Pattern`, or a single string passed as
  `targets="..."` (not in a list), as PEFT does; it must match the whole path
  or the whole name;
- a layer class (`keras.layers.Dense`): every layer of that class;
- a preset: `"attention"` (query/key/value/output projections: the linear
  layers inside attention layers), `"mlp"` (the other linear layers) or
  `"all-linear"` (every Dense/EinsumDense except the task head).

Exact names, suffixes and classes must hit supported layers (a `TypeError`
names the one that is not); patterns and presets skip layers that cannot be
adapted. A target list that matches nothing is an error.
"""

import fnmatch
import re

import keras

from keras_lowrank.integrations import keras_hub as hub_integration
from keras_lowrank.layers import adapter_class_for
from keras_lowrank.surgery.walk import walk

PRESETS = ("attention", "mlp", "all-linear")
LINEAR_CLASSES = (keras.layers.Dense, keras.layers.EinsumDense)
_GLOB_CHARS = set("*?[")


def select_layers(model, targets, exclude=None):
    """The layers (as `walk.Visit`s, in model order) that `targets` selects.

    Args:
        model: a built Keras model.
        targets: see the module docstring; `None` means the default targets.
        exclude: same forms as `targets`; matching layers are left out.

    Returns:
        A list of `Visit`s, each for a layer that can hold an adapter.

    Raises:
        ValueError: nothing matched, or a target has an unknown form.
        TypeError: an exact target names a layer that cannot be adapted.
    """
    visits = walk(model)
    head = _head_ids(model, visits)
    chosen = _match(model, visits, head, targets, strict=True, default=True)
    if not chosen:
        raise ValueError(
            f"keras_lowrank: targets={_show(targets)} matched no adaptable "
            f"layer in model '{model.name}'. Adaptable layers are "
            "Dense, EinsumDense, Embedding and Conv1D/2D/3D; candidate paths "
            f"include: {_examples(visits)}. Pass names, path suffixes, "
            "patterns or a preset ('attention', 'mlp', 'all-linear')."
        )
    if exclude is not None:
        dropped = {
            id(v.layer)
            for v in _match(model, visits, head, exclude, strict=False)
        }
        chosen = [v for v in chosen if id(v.layer) not in dropped]
        if not chosen:
            raise ValueError(
                f"keras_lowrank: exclude={_show(exclude)} removed every layer "
                f"that targets={_show(targets)} selected. Narrow `exclude`."
            )
    return chosen


def select_any_layers(model, names):
    """Layers named by `names` (same forms as targets), adaptable or not:
    used for `trainable=[...]`. Every entry must match something."""
    visits = walk(model)
    head = _head_ids(model, visits)
    out = []
    for entry in _as_list(names):
        matched = _match(model, visits, head, [entry], strict=False, any_layer=True)
        if not matched:
            raise ValueError(
                f"keras_lowrank: trainable entry {_show(entry)} matched no "
                f"layer in model '{model.name}'. Use a layer name or path "
                f"suffix such as {_examples(visits)}."
            )
        out.extend(v for v in matched if v not in out)
    return out


def default_trainable_layers(model):
    """Layers that stay trainable by default: a KerasHub task's head."""
    return hub_integration.head_layers(model)


def matches(visit, target):
    """Whether one target (any single form) selects `visit`'s layer; used by
    `rank_pattern`/`alpha_pattern`, where a string key may be a name, path
    suffix, glob or regular expression."""
    if isinstance(target, str) and not _is_preset(target):
        if target in (visit.path, visit.layer.name) or visit.path.endswith(
            "/" + target
        ):
            return True
        if _GLOB_CHARS & set(target):
            return fnmatch.fnmatchcase(visit.path, target) or fnmatch.fnmatchcase(
                visit.layer.name, target
            )
        try:
            pattern = re.compile(target)
        except re.error:
            return False
        return bool(pattern.fullmatch(visit.path) or pattern.fullmatch(visit.layer.name))
    hits, _ = _match_one([visit], set(), target)
    return bool(hits)


def describe(targets):
    """Targets as JSON-ready data: strings stay, classes become their names,
    regular expressions become `"re:<pattern>"`."""
    if targets is None:
        return None
    if isinstance(targets, re.Pattern):
        return "re:" + targets.pattern
    if isinstance(targets, type):
        return targets.__name__
    if isinstance(targets, str):
        return targets
    return [describe(t) for t in targets]


# --- matching ---------------------------------------------------------------


def _match(
    model, visits, head, targets, strict, default=False, any_layer=False
):
    if targets is None:
        if not default:
            return []
        names = hub_integration.default_target_names(model)
        if names is not None:
            backbone = hub_integration.backbone_of(model)
            return [
                v
                for v in _inside(visits, backbone)
                if v.layer.name in names and _adaptable(v.layer)
            ]
        return _preset(visits, head, "all-linear")
    if isinstance(targets, (str, re.Pattern)) and not _is_preset(targets):
        # A lone string is a regular expression, as in PEFT.
        targets = [re.compile(targets) if isinstance(targets, str) else targets]
    selected = []
    seen = set()
    for target in _as_list(targets):
        hits, exact = _match_one(visits, head, target)
        for visit in hits:
            if not any_layer and not _adaptable(visit.layer):
                if strict and exact:
                    raise TypeError(
                        f"keras_lowrank: layer '{visit.path}' "
                        f"({type(visit.layer).__name__}) matched target "
                        f"{_show(target)} but cannot hold an adapter. "
                        "Adaptable layers are exactly Dense, EinsumDense, "
                        "Embedding and Conv1D/2D/3D; target the layers inside "
                        "it, or remove it from `targets`."
                    )
                continue
            if id(visit.layer) not in seen:
                seen.add(id(visit.layer))
                selected.append(visit)
    order = {id(v.layer): i for i, v in enumerate(visits)}
    return sorted(selected, key=lambda v: order[id(v.layer)])


def _match_one(visits, head, target):
    """(matching visits, whether the target was exact)."""
    if isinstance(target, type):
        return [v for v in visits if isinstance(v.layer, target)], True
    if isinstance(target, re.Pattern):
        return [
            v
            for v in visits
            if target.fullmatch(v.path) or target.fullmatch(v.layer.name)
        ], False
    if not isinstance(target, str):
        raise TypeError(
            f"keras_lowrank: cannot read target {target!r} "
            f"({type(target).__name__}). Use a layer name, a path suffix, a "
            "glob or regex pattern, a layer class, or a preset."
        )
    if _is_preset(target):
        return _preset(visits, head, target), False
    if _GLOB_CHARS & set(target):
        return [
            v
            for v in visits
            if fnmatch.fnmatchcase(v.path, target)
            or fnmatch.fnmatchcase(v.layer.name, target)
        ], False
    return [
        v
        for v in visits
        if v.path == target
        or v.path.endswith("/" + target)
        or v.layer.name == target
    ], True


def _preset(visits, head, name):
    linear = [
        v
        for v in visits
        if isinstance(v.layer, LINEAR_CLASSES)
        and _adaptable(v.layer)
        and id(v.layer) not in head
    ]
    if name == "all-linear":
        return linear
    attention = [v for v in linear if _in_attention(v)]
    if name == "attention":
        return attention
    return [v for v in linear if v not in attention]


def _in_attention(visit):
    return any(
        isinstance(p, keras.layers.MultiHeadAttention)
        or "attention" in type(p).__name__.lower()
        for p in visit.parents
    )


def _head_ids(model, visits):
    """Layers excluded from presets: a KerasHub task's head, or else the
    model's output layer."""
    if hub_integration.is_keras_hub_model(model):
        return {id(layer) for layer in hub_integration.head_layers(model)}
    layers = getattr(model, "layers", None)
    if isinstance(model, (keras.Sequential,)) or _is_functional(model):
        return {id(layers[-1])} if layers else set()
    linear = [v.layer for v in visits if isinstance(v.layer, LINEAR_CLASSES)]
    return {id(linear[-1])} if linear else set()


def _is_functional(model):
    # Functional models (including Sequential) know their output tensors;
    # subclassed models do not.
    try:
        return bool(model.outputs)
    except (AttributeError, ValueError):
        return False


def _inside(visits, layer):
    return [v for v in visits if any(p is layer for p in v.parents)]


def _adaptable(layer):
    return adapter_class_for(layer) is not None


def _is_preset(target):
    return isinstance(target, str) and target in PRESETS


def _as_list(targets):
    if isinstance(targets, (str, type, re.Pattern)):
        return [targets]
    return list(targets)


def _show(targets):
    if isinstance(targets, re.Pattern):
        return f"re.compile({targets.pattern!r})"
    if isinstance(targets, type):
        return targets.__name__
    if isinstance(targets, (list, tuple)):
        return "[" + ", ".join(_show(t) for t in targets) + "]"
    return repr(targets)


def _examples(visits, limit=4):
    paths = [v.path for v in visits if _adaptable(v.layer)][:limit]
    return ", ".join(repr(p) for p in paths) or "(none)"
