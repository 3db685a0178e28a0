"""What `adapt()` checks, and records, before it changes anything.

Every check runs on the plan (`[(walk.Visit, AdapterSpec)]`) before the first
layer is converted, so a refused `adapt` (and `combine` and `load_adapter`,
which install through the same `check_plan`) leaves the model as it was. The
options record is the JSON-ready copy of `adapt()`'s arguments kept in the
model state and in adapter files.
"""

import numbers

import keras

from keras_lowrank.layers import LowRankLayer
from keras_lowrank.layers import adapter_class_for
from keras_lowrank.layers.token_rows import check_token_rows
from keras_lowrank.state import owned
from keras_lowrank.state.model_state import adapted_visits
from keras_lowrank.state.model_state import own_state
from keras_lowrank.state.model_state import state_of
from keras_lowrank.surgery import targets as targeting
from keras_lowrank.surgery.walk import walk


def check_model(model):
    if not isinstance(model, keras.Model):
        raise TypeError(
            "keras_lowrank: adapt() takes a keras.Model, got "
            f"{type(model).__name__}. To adapt one layer, use "
            "LowRankDense.from_layer(layer, rank=...) and the like."
        )
    if not model.built:
        raise ValueError(
            f"keras_lowrank: model '{model.name}' is not built, so its "
            "layers have no kernels yet. Build it first (call it on a batch, "
            "or `model.build(input_shape)`), then adapt it."
        )


def spec_for(visit, base, ranks, alphas, alpha_given):
    """`base` with the first matching rank and alpha pattern applied; `ranks`
    and `alphas` are `targeting.pattern_layers` results."""
    changes = {}
    for option, pattern in (("rank", ranks), ("alpha", alphas)):
        for value, layer_ids in pattern:
            if id(visit.layer) in layer_ids:
                changes[option] = value
                break
    if "rank" in changes and "alpha" not in changes and not alpha_given:
        # alpha defaulted to rank: keep that default per layer (an explicit
        # alpha stays as given, as in PEFT).
        changes["alpha"] = None
    if not changes:
        return base
    try:
        return base.replace(**changes)
    except (TypeError, ValueError) as error:
        raise type(error)(str(error).replace(
            "keras_lowrank:", f"keras_lowrank: layer '{visit.path}':", 1
        )) from None


def check_plan(model, plan, name):
    state = state_of(model, required=False)
    kept = {}
    for other, options in (state.options.items() if state else ()):
        for path in options.get("kept", []):
            kept.setdefault(path, other)
    paths = {}
    for visit, spec in plan:
        for root, other in kept.items():
            if owned.is_under(visit.path, root):
                raise ValueError(
                    f"keras_lowrank: layer '{visit.path}' is kept fully "
                    f"trainable by adapter {other!r} (layer '{root}'), so it "
                    "cannot also get an adapter. Leave it out of `targets`, "
                    f"or delete adapter {other!r} first."
                )
        layer = visit.layer
        other = paths.setdefault(visit.path, layer)
        if other is not layer:
            raise ValueError(
                f"keras_lowrank: two layers share the path '{visit.path}'. "
                "Adapters are identified by layer path; give the layers "
                "distinct names."
            )
        cls = adapter_class_for(layer)
        cls.check_convertible(layer, visit.path)
        spec.validate(visit.path)
        if isinstance(layer, LowRankLayer) and name in layer.adapter_names:
            raise ValueError(
                f"keras_lowrank: layer '{visit.path}' already has an adapter "
                f"named {name!r}. Use another name (adapt(..., name='task_b')) "
                "or keras_lowrank.delete_adapter(model, name) first."
            )
        layout = cls.kernel_layout(layer)
        check_token_rows(cls, layout, spec, visit.path)
        layout.check_rank(spec.rank, visit.path, ", or a rank_pattern for this layer")
        cls.check_spec(spec, visit.path)


def kept_paths(model, trainable, plan):
    """Paths of the layers the new adapter keeps fully trainable.

    A layer either trains fully or holds adapters, never both (its kernel
    would train under the adapters). The default (a KerasHub task's head)
    quietly leaves out layers that hold adapters; an explicit `trainable`
    entry that does is an error.
    """
    if trainable is None:
        adapted = _adapted_paths(model, plan)
        layers = {id(layer) for layer in targeting.default_trainable_layers(model)}
        paths = [v.path for v in walk(model) if id(v.layer) in layers]
        return [
            p for p in paths if not any(owned.is_under(q, p) for q in adapted)
        ]
    paths = [visit.path for visit in targeting.select_any_layers(model, trainable)]
    check_kept_paths(model, paths, plan)
    return paths


def check_kept_paths(model, paths, plan):
    """Raises if a layer to keep trainable holds or contains adapters."""
    adapted = _adapted_paths(model, plan)
    for path in paths:
        for other in adapted:
            if owned.is_under(other, path):
                raise ValueError(
                    f"keras_lowrank: layer '{path}' is listed in `trainable`, "
                    f"but it holds or contains the adapted layer '{other}'. A "
                    "layer either trains fully or gets an adapter: remove it "
                    "from `trainable` or from `targets`."
                )


def _adapted_paths(model, plan):
    return [visit.path for visit, _ in plan] + [
        v.path for v in adapted_visits(model)
    ]


def check_not_nested(model):
    """Raises if a model inside `model` holds adapters of its own: its
    verbs and `model`'s would fight over the same layers (the outer adapt
    would switch the inner adapter off, and the outer unload would leave the
    inner model an adapted model)."""
    for visit in walk(model):
        if own_state(visit.layer) is not None:
            raise ValueError(
                f"keras_lowrank: layer '{visit.path}' of model '{model.name}' "
                "is an adapted model itself; adapters of nested models cannot "
                "be managed from the outer model. Either manage the adapters "
                f"on '{visit.path}' alone (they train inside the outer model "
                f"as they are), or call keras_lowrank.unload() on "
                f"'{visit.path}' first, then adapt the outer model."
            )


def options_record(
    rank, alpha, targets, exclude, dropout, scaling, method, init, bias,
    trainable, rank_pattern, alpha_pattern, paths, kept, tokens=None,
):
    """adapt()'s arguments as JSON-ready data (targets as given, and the
    layer paths they resolved to; `trainable` as given, and the layer paths
    it resolved to; `tokens`, `{path: [ids]}`, the rows each table trains,
    recorded only when there are any)."""
    record = {
        "rank": int(rank),
        "alpha": float(alpha) if isinstance(alpha, numbers.Real) else alpha,
        "targets": targeting.describe(targets),
        "exclude": targeting.describe(exclude),
        "dropout": float(dropout),
        "scaling": scaling,
        "method": method,
        "init": init,
        "bias": bias,
        "trainable": targeting.describe(trainable),
        "rank_pattern": _pattern_record(rank_pattern),
        "alpha_pattern": _pattern_record(alpha_pattern),
        "layers": list(paths),
        "kept": list(kept),
    }
    if tokens:
        record["trainable_tokens"] = {
            path: [int(i) for i in ids] for path, ids in tokens.items()
        }
    return record


def _pattern_record(pattern):
    if not pattern:
        return {}
    return {targeting.describe(key): value for key, value in pattern.items()}
