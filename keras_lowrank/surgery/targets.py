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
  layers inside attention layers), `"mlp"` (the other linear layers and the
  MoE expert kernels), `"all-linear"` (every Dense/EinsumDense except the
  output layers, and the expert kernels) or `"experts"` (the expert kernels
  of every KerasHub mixture-of-experts layer, see
  `keras_lowrank.integrations.moe`). `"mlp"` and `"all-linear"` leave out
  the MoE routers, whose training would change which experts every token
  sees; name a router to adapt it.

A string is read literally first: if a layer's name, path or path suffix is
exactly the string, it selects those layers and nothing else, so a layer
named `"block[0]"` is never confused with `block0`. Only a string that names
no layer is read as a glob pattern (or, as a `rank_pattern` key, a regular
expression).

Every entry of `targets`, `exclude`, `rank_pattern` and `alpha_pattern` must
select something: a misspelt one raises a `ValueError` naming it and the
closest layer names. Exact names, suffixes and classes must hit supported
layers (a `TypeError` names the one that is not); patterns and presets skip
layers that cannot be adapted.
"""

import collections.abc
import difflib
import fnmatch
import re

import keras

from keras_lowrank.integrations import keras_hub as hub_integration
from keras_lowrank.integrations import moe
from keras_lowrank.layers import ExpertKernel
from keras_lowrank.layers import adapter_class_for
from keras_lowrank.surgery.outputs import LINEAR_CLASSES
from keras_lowrank.surgery.outputs import output_layers
from keras_lowrank.surgery.walk import walk

PRESETS = ("attention", "mlp", "all-linear", "experts")
_GLOB_CHARS = set("*?[")
_FORMS = (
    "a layer name or path suffix, a glob pattern, a regular expression "
    "(re.compile(...)), a layer class, or a preset ('attention', 'mlp', "
    "'all-linear', 'experts')"
)


def normalize(argument, value, lone_regex=True):
    """`targets`, `exclude` or `trainable` as adapt() uses and records it:
    `None`, a lone string, `re.Pattern` or class, or a list (any other
    iterable, a generator say, is read once, here).

    Args:
        argument: the argument's name, for error messages.
        value: what the caller passed.
        lone_regex: whether a lone string is a regular expression (it is for
            `targets` and `exclude`, as in PEFT).

    Raises:
        TypeError: `value`, or one of its entries, has no target form.
        ValueError: a lone string is not a valid regular expression.

    Example:

    >>> normalize("targets", (name for name in ["query", "value"]))
    ['query', 'value']
    """
    if value is None or isinstance(value, (re.Pattern, type)):
        return value
    if isinstance(value, str):
        if lone_regex and not _is_preset(value):
            try:
                re.compile(value)
            except re.error as error:
                raise ValueError(
                    f"keras_lowrank: {argument}={value!r} is not a valid "
                    f"regular expression ({error}); a lone string is one, as "
                    f"in PEFT. Escape it (re.escape), or pass names in a "
                    f"list: {argument}=[{value!r}]."
                ) from None
        return value
    if isinstance(value, (bytes, bytearray, collections.abc.Mapping)) or not (
        isinstance(value, collections.abc.Iterable)
    ):
        raise TypeError(
            f"keras_lowrank: {argument}={value!r} ({type(value).__name__}) "
            f"is not a target. Pass {_FORMS}, or a list of them."
        )
    entries = list(value)
    for entry in entries:
        if not isinstance(entry, (str, re.Pattern, type)):
            raise TypeError(
                f"keras_lowrank: {argument} entry {entry!r} "
                f"({type(entry).__name__}) is not a target. Each entry is "
                f"{_FORMS}."
            )
    return entries


def check_pattern(argument, pattern):
    """`rank_pattern`/`alpha_pattern` as a dict (`{}` for `None`).

    Raises:
        TypeError: `pattern` is not a dict, or a key is not a string,
            `re.Pattern` or class.
    """
    if pattern is None:
        return {}
    if not isinstance(pattern, collections.abc.Mapping):
        raise TypeError(
            f"keras_lowrank: {argument} must be a dict from layer pattern to "
            f"value, such as {{'value': 16}}; got {type(pattern).__name__} "
            f"{pattern!r}."
        )
    for key in pattern:
        if not isinstance(key, (str, re.Pattern, type)):
            raise TypeError(
                f"keras_lowrank: {argument} key {key!r} "
                f"({type(key).__name__}) is not a layer pattern. Keys are "
                "layer names, path suffixes, globs, regular expressions or "
                "layer classes."
            )
    return dict(pattern)


def select_layers(model, targets, exclude=None):
    """The layers (as `walk.Visit`s, in model order) that `targets` selects.

    Args:
        model: a built Keras model.
        targets: see the module docstring (after `normalize`); `None` means
            the default targets.
        exclude: same forms as `targets`; matching layers are left out.

    Returns:
        A list of `Visit`s, each for a layer that can hold an adapter.

    Raises:
        ValueError: nothing matched, an entry matched no layer, or a target
            has an unknown form.
        TypeError: an exact target names a layer that cannot be adapted.

    Example:

    >>> import keras
    >>> model = keras.Sequential([keras.Input((4,)),
    ...     keras.layers.Dense(8, name="block[0]"),
    ...     keras.layers.Dense(8, name="block0"), keras.layers.Dense(2)])
    >>> [v.path for v in select_layers(model, ["block[0]"])]
    ['block[0]']
    """
    visits = walk(model)
    head = _Head(model, visits)
    chosen = _match(model, visits, head, targets, "targets", strict=True)
    if not chosen:
        raise ValueError(
            f"keras_lowrank: targets={_show(targets)} matched no adaptable "
            f"layer in model '{model.name}'. Adaptable layers are "
            "Dense, EinsumDense, Embedding, Conv1D/2D/3D and MoE expert "
            "kernels; candidate paths "
            f"include: {_examples(visits)}. Pass names, path suffixes, "
            "patterns or a preset ('attention', 'mlp', 'all-linear', "
            "'experts')."
        )
    if exclude is not None:
        dropped = {
            id(v.layer)
            for v in _match(model, visits, head, exclude, "exclude", strict=False)
        }
        chosen = [v for v in chosen if id(v.layer) not in dropped]
        if not chosen:
            raise ValueError(
                f"keras_lowrank: exclude={_show(exclude)} removed every layer "
                f"that targets={_show(targets)} selected. Narrow `exclude`."
            )
    return chosen


def select_any_layers(model, names, argument="trainable"):
    """Layers named by `names` (same forms as targets), adaptable or not:
    used for `trainable=[...]` (and `trainable_tokens` keys, with
    `argument` naming them in messages). Every entry must match something."""
    visits = walk(model)
    head = _Head(model, visits)
    out = []
    for entry in _as_list(names):
        matched, _ = _match_one(visits, head, entry)
        if not matched:
            _unmatched(model, visits, argument, entry)
        out.extend(v for v in matched if v not in out)
    return out


def default_trainable_layers(model):
    """Layers that stay trainable by default: a KerasHub task's head."""
    return hub_integration.head_layers(model)


def pattern_layers(model, chosen, argument, pattern):
    """`rank_pattern`/`alpha_pattern` resolved: `[(value, {id(layer)})]` in
    key order, each key matched among `model`'s layers (a string literally
    first, else as a glob, else as a regular expression).

    Raises:
        ValueError: a key selects none of the `chosen` layers.
    """
    visits = walk(model)
    head = _Head(model, visits)
    ids = {id(v.layer) for v in chosen}
    out = []
    for key, value in pattern.items():
        hits = {id(v.layer) for v in _pattern_hits(visits, head, key)} & ids
        if not hits:
            _unmatched(model, chosen, argument, key, what="key", among="adapted")
        out.append((value, hits))
    return out


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


class _Head:
    """Layers the presets leave out, found on first use: a KerasHub task's
    head, or else the model's output layers (tracing them runs the model)."""

    def __init__(self, model, visits):
        self.model = model
        self.visits = visits
        self._ids = None

    def ids(self):
        if self._ids is None:
            if hub_integration.is_keras_hub_model(self.model):
                layers = hub_integration.head_layers(self.model)
            else:
                layers = output_layers(self.model, self.visits)
            self._ids = {id(layer) for layer in layers}
        return self._ids


def _match(model, visits, head, targets, argument, strict):
    if targets is None:
        if argument != "targets":
            return []
        names = hub_integration.default_target_names(model)
        if names is not None:
            backbone = hub_integration.backbone_of(model)
            # A bare backbone is the model itself, which is no visit's parent.
            scope = visits if backbone is model else _inside(visits, backbone)
            return [
                v for v in scope if v.layer.name in names and _adaptable(v.layer)
            ]
        return _preset(visits, head, "all-linear")
    if isinstance(targets, str) and not _is_preset(targets):
        # A lone string is a regular expression, as in PEFT.
        targets = re.compile(targets)
    selected = []
    seen = set()
    for target in _as_list(targets):
        hits, exact = _match_one(visits, head, target)
        if not hits and target == "experts":
            raise moe.no_expert_layers(model, argument)
        if not hits:
            _unmatched(model, visits, argument, target)
        for visit in hits:
            if not _adaptable(visit.layer):
                if strict and exact:
                    raise TypeError(
                        f"keras_lowrank: layer '{visit.path}' "
                        f"({type(visit.layer).__name__}) matched target "
                        f"{_show(target)} but cannot hold an adapter. "
                        "Adaptable layers are exactly Dense, EinsumDense, "
                        "Embedding, Conv1D/2D/3D and MoE expert kernels; "
                        "target the layers inside "
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
        return _regex_hits(visits, target), False
    if _is_preset(target):
        return _preset(visits, head, target), False
    literal = _literal_hits(visits, target)
    if literal or not _GLOB_CHARS & set(target):
        return literal, True
    return _glob_hits(visits, target), False


def _pattern_hits(visits, head, key):
    # A rank/alpha pattern key: as a target, but a string that names no
    # layer and matches none as a glob is a regular expression (as in PEFT's
    # rank_pattern).
    if not isinstance(key, str) or _is_preset(key):
        return _match_one(visits, head, key)[0]
    literal = _literal_hits(visits, key)
    if literal:
        return literal
    if _GLOB_CHARS & set(key):
        hits = _glob_hits(visits, key)
        if hits:
            return hits
    try:
        return _regex_hits(visits, re.compile(key))
    except re.error:
        return []


def _literal_hits(visits, name):
    return [
        v
        for v in visits
        if v.path == name or v.path.endswith("/" + name) or v.layer.name == name
    ]


def _glob_hits(visits, pattern):
    return [
        v
        for v in visits
        if fnmatch.fnmatchcase(v.path, pattern)
        or fnmatch.fnmatchcase(v.layer.name, pattern)
    ]


def _regex_hits(visits, pattern):
    return [
        v
        for v in visits
        if pattern.fullmatch(v.path) or pattern.fullmatch(v.layer.name)
    ]


def _preset(visits, head, name):
    experts = [v for v in visits if isinstance(v.layer, ExpertKernel)]
    if name == "experts":
        return experts
    linear = [
        v
        for v in visits
        if isinstance(v.layer, LINEAR_CLASSES)
        and _adaptable(v.layer)
        and id(v.layer) not in head.ids()
        and not moe.is_router(v)
    ]
    order = {id(v.layer): i for i, v in enumerate(visits)}
    if name == "all-linear":
        chosen = linear + experts
    else:
        attention = [v for v in linear if _in_attention(v)]
        if name == "attention":
            return attention
        chosen = [v for v in linear if v not in attention] + experts
    return sorted(chosen, key=lambda v: order[id(v.layer)])


def _in_attention(visit):
    return any(
        isinstance(p, keras.layers.MultiHeadAttention)
        or "attention" in type(p).__name__.lower()
        for p in visit.parents
    )


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


def _unmatched(model, visits, argument, entry, what="entry", among=None):
    """Raises the error for an entry that selects nothing, with the closest
    layer names and paths (a misspelling, most likely)."""
    candidates = sorted({v.layer.name for v in visits} | {v.path for v in visits})
    close = []
    if isinstance(entry, (str, re.Pattern)):
        text = entry if isinstance(entry, str) else entry.pattern
        close = difflib.get_close_matches(text, candidates, n=3, cutoff=0.6)
    hint = (
        f"Closest layer names: {', '.join(repr(c) for c in close)}."
        if close
        else f"Layer paths include: {_examples(visits, adaptable=False)}."
    )
    scope = "the layers being adapted" if among else f"model '{model.name}'"
    raise ValueError(
        f"keras_lowrank: {argument} {what} {_show(entry)} matched no layer "
        f"in {scope}. {hint} Fix the spelling, or remove it from "
        f"`{argument}`."
    )


def _show(targets):
    if isinstance(targets, re.Pattern):
        return f"re.compile({targets.pattern!r})"
    if isinstance(targets, type):
        return targets.__name__
    if isinstance(targets, (list, tuple)):
        return "[" + ", ".join(_show(t) for t in targets) + "]"
    return repr(targets)


def _examples(visits, limit=4, adaptable=True):
    paths = [v.path for v in visits if not adaptable or _adaptable(v.layer)]
    return ", ".join(repr(p) for p in paths[:limit]) or "(none)"
