"""`combine()`: a new adapter made from existing ones.

On each layer, adapters `i` with weights `w_i` and scales `s_i` (`alpha/r`)
aim at the weighted sum of their deltas, `ΔW = Σ w_i·s_i·A_i·B_i`. Three ways
to get an adapter for it (all three give the new adapter `alpha = rank`,
`scaling="standard"`, so its scale is 1 and the factors carry `c_i = w_i·s_i`):

- `"linear"` (PEFT's `"linear"`): same rank `r` on each layer;
  `A = Σ sign(c_i)·sqrt(|c_i|)·A_i`, `B = Σ sqrt(|c_i|)·B_i`. Rank stays `r`,
  but `A·B` has cross terms `A_i·B_j`: it equals the weighted sum only for a
  single adapter (or when the cross terms cancel).
- `"cat"` (PEFT's `"cat"`): the factors are stacked,
  `A = [sign(c_i)·sqrt(|c_i|)·A_i ...]`, `B = [sqrt(|c_i|)·B_i ...]`: exactly
  the weighted sum, at rank `Σ r_i`.
- `"svd"` (PEFT's `"svd"`): the best rank-`rank` approximation of the weighted
  sum (truncated SVD, computed from the factors without forming a d×k SVD);
  `rank` defaults to the largest source rank.

A layer that holds only some of the adapters combines those (the others
count as zero there). Every method reports, per layer, the relative Frobenius
error `‖ΔW_new − Σ w_i·s_i·A_i·B_i‖_F / ‖Σ w_i·s_i·A_i·B_i‖_F`: ~1e-7 for
`"cat"`, the truncation error for `"svd"`, the cross terms' share for
`"linear"`.
"""

import dataclasses
import math
import numbers

from keras import ops

from keras_lowrank import adapter_math
from keras_lowrank import errors
from keras_lowrank.state import owned
from keras_lowrank.state.model_state import adapted_visits
from keras_lowrank.state.model_state import state_of
from keras_lowrank.spec import AdapterSpec
from keras_lowrank.spec import check_adapter_name
from keras_lowrank.state.transaction import transaction
from keras_lowrank.surgery.adapt import install
from keras_lowrank.surgery.adapt_checks import check_plan

HOWS = ("linear", "cat", "svd")


@dataclasses.dataclass(frozen=True)
class Combination:
    """What `combine()` made; `print()` it for a table.

    Attributes:
        name: the new adapter's name.
        how: `"linear"`, `"cat"` or `"svd"`.
        sources: the combined adapters' names.
        weights: their weights.
        ranks: `{layer path: rank of the new adapter there}`.
        errors: `{layer path: relative Frobenius error}` of the new delta
            against the weighted sum of the sources' deltas.
    """

    name: str
    how: str
    sources: tuple
    weights: tuple
    ranks: dict
    errors: dict

    @property
    def max_error(self):
        """The largest per-layer relative error."""
        return max(self.errors.values(), default=0.0)

    def __str__(self):
        width = max([len("path")] + [len(p) for p in self.ranks])
        lines = [
            f"adapter {self.name!r} = {self.how} of "
            + ", ".join(f"{w:g}·{n}" for n, w in zip(self.sources, self.weights)),
            f"{'path'.ljust(width)}  rank  relative error",
        ]
        for path, rank in self.ranks.items():
            lines.append(f"{path.ljust(width)}  {rank:<4}  {self.errors[path]:.3g}")
        return "\n".join(lines)


def combine(model, names, weights, name, how="linear", rank=None):
    """Adds adapter `name`, a weighted combination of adapters `names`.

    The new adapter becomes the only active one (as with `adapt`); the
    sources are kept. It is a plain LoRA adapter (scale 1) that trains,
    merges, switches and saves like any other. It owns what `names[0]` owns
    (`trainable` layers such as a task head, bias policy), starting from
    `names[0]`'s values: list first the adapter whose head you want.

    Args:
        model: an adapted model.
        names: the adapters to combine (distinct, at least one), all
            `method="lora"`.
        weights: one real number per adapter (negative values subtract).
        name: the new adapter's name.
        how: `"linear"` (same ranks, weighted factors), `"cat"` (exact,
            rank = sum of ranks) or `"svd"` (weighted sum of deltas truncated
            to `rank`). See the module docstring for the exact formulas.
        rank: for `"svd"` only: the target rank (default: the largest source
            rank), capped per layer by what the sum can have.

    Returns:
        A `Combination`: the per-layer ranks and relative errors.

    Example:

    >>> import keras, keras_lowrank
    >>> model = keras.Sequential([keras.Input((8,)),
    ...                           keras.layers.Dense(8, name="hidden"),
    ...                           keras.layers.Dense(2, name="out")])
    >>> _ = keras_lowrank.adapt(model, rank=2, name="a")
    >>> _ = keras_lowrank.adapt(model, rank=2, name="b")
    >>> mix = keras_lowrank.combine(model, ["a", "b"], [0.5, 0.5], "mix",
    ...                             how="cat")
    >>> mix.ranks, model.get_layer("hidden").active_adapters
    ({'hidden': 4}, ['mix'])
    >>> mix.errors["hidden"] < 1e-6
    True
    """
    state = state_of(model)
    check_adapter_name(name)
    names, weights = _check_arguments(model, state, names, weights, name, how, rank)
    with transaction(model, "combine"):
        return _combine(model, state, names, weights, name, how, rank)


def _combine(model, state, names, weights, name, how, rank):
    if how == "svd" and rank is None:
        rank = max(
            visit.layer.adapter_spec(n).rank
            for visit in adapted_visits(model)
            for n in names
            if n in visit.layer.adapter_names
        )

    first = state.options[names[0]]
    plan, factors, ranks, errors = [], {}, {}, {}
    for visit in adapted_visits(model):
        layer = visit.layer
        present = [(n, w) for n, w in zip(names, weights) if n in layer.adapter_names]
        if not present:
            continue
        specs = [layer.adapter_spec(n) for n, _ in present]
        for (source, _), spec in zip(present, specs):
            if spec.method != "lora":
                raise ValueError(
                    f"keras_lowrank: layer '{visit.path}': adapter {source!r} "
                    f"uses method={spec.method!r}; its update is not a "
                    "low-rank product A·B, so it cannot be combined. Combine "
                    "LoRA adapters only."
                )
        if how == "linear" and len({spec.rank for spec in specs}) > 1:
            raise ValueError(
                f"keras_lowrank: layer '{visit.path}': how='linear' needs "
                "adapters of the same rank, but "
                + ", ".join(f"{n!r} has rank {s.rank}" for (n, _), s in zip(present, specs))
                + ". Use how='cat' (exact) or how='svd' (any rank)."
            )
        layout = layer.lowrank_layout
        a_list, b_list, coefficients = [], [], []
        for (source, weight), spec in zip(present, specs):
            variables = layer.adapter_variables(source)
            a_list.append(layout.a_to_matrix(variables["A"]))
            b_list.append(layout.b_to_matrix(variables["B"]))
            coefficients.append(weight * spec.scale)
        if how == "linear":
            a, b = adapter_math.combine_linear(a_list, b_list, coefficients)
        else:
            a, b = adapter_math.combine_cat(a_list, b_list, coefficients)
            if how == "svd":
                a, b = adapter_math.truncate_product(a, b, rank)
        target = sum(
            adapter_math.lowrank_delta(x, y, c)
            for x, y, c in zip(a_list, b_list, coefficients)
        )
        errors[visit.path] = adapter_math.relative_error(
            adapter_math.lowrank_delta(a, b, 1.0), target
        )
        layer_rank = int(a.shape[-1])
        ranks[visit.path] = layer_rank
        factors[visit.path] = {
            "A": ops.convert_to_numpy(layout.a_from_matrix(a)),
            "B": ops.convert_to_numpy(layout.b_from_matrix(b)),
        }
        plan.append(
            (
                visit,
                AdapterSpec(
                    rank=layer_rank,
                    dropout=specs[0].dropout,
                    bias="none" if first["bias"] == "none" else "all",
                ),
            )
        )

    top = max(ranks.values())
    record = {
        "rank": top,
        "alpha": None,
        "targets": list(ranks),
        "exclude": None,
        "dropout": float(plan[0][1].dropout),
        "scaling": "standard",
        "method": "lora",
        "init": "default",
        "bias": first["bias"],
        "trainable": first.get("trainable"),
        "rank_pattern": {p: r for p, r in ranks.items() if r != top},
        "alpha_pattern": {},
        "layers": list(ranks),
        "kept": list(first.get("kept", [])),
        "combined": {
            "from": list(names),
            "weights": list(weights),
            "how": how,
            "rank": rank,
        },
    }
    values = {
        key: owned.value_of(model, state, names[0], key)
        for key in first.get("owned", [])
    }
    check_plan(model, plan, name)
    install(
        model, name, plan, record, factors=factors, owned_values=values,
        verb="combine",
    )
    return Combination(
        name=name,
        how=how,
        sources=tuple(names),
        weights=tuple(weights),
        ranks=ranks,
        errors=errors,
    )


def _check_arguments(model, state, names, weights, name, how, rank):
    if name in state.options:
        raise ValueError(
            f"keras_lowrank: model '{model.name}' already has an adapter "
            f"named {name!r}. Choose another name for the combination."
        )
    if not isinstance(how, str) or how not in HOWS:
        raise ValueError(
            f"keras_lowrank: unknown combination how={how!r}. Use 'linear', "
            "'cat' or 'svd'."
        )
    if isinstance(names, str):
        names = [names]
    elif not isinstance(names, (list, tuple)):
        raise TypeError(
            "keras_lowrank: combine() takes `names` as an adapter name or a "
            f"list of names, got {type(names).__name__} ({names!r}). Pass "
            f"names from {sorted(state.options)}."
        )
    names = list(names)
    if not names:
        raise ValueError("keras_lowrank: combine() needs at least one adapter name.")
    for source in names:
        errors.check_known_adapter(model, source, state.options, "combine")
    if len(set(names)) != len(names):
        raise ValueError(
            f"keras_lowrank: combine() got a repeated adapter name in {names}; "
            "list each adapter once and put the total in its weight."
        )
    if isinstance(weights, numbers.Real):
        weights = [weights]
    elif not isinstance(weights, (list, tuple)) and not hasattr(weights, "shape"):
        raise TypeError(
            f"keras_lowrank: combine() takes `weights` as {len(names)} "
            f"number(s), one per adapter in {names}, got "
            f"{type(weights).__name__} ({weights!r}). Pass e.g. "
            f"weights={[1.0] * len(names)}."
        )
    weights = list(weights)
    if len(weights) != len(names) or not all(
        isinstance(w, numbers.Real) and not isinstance(w, bool) and math.isfinite(w)
        for w in weights
    ):
        raise ValueError(
            f"keras_lowrank: weights must be {len(names)} finite number(s), "
            f"one per adapter in {names}; got {weights!r}."
        )
    if how == "svd":
        if rank is not None and (
            isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1
        ):
            raise ValueError(
                f"keras_lowrank: rank must be a positive integer, got {rank!r}."
            )
    elif rank is not None:
        raise ValueError(
            f"keras_lowrank: rank={rank!r} only applies to how='svd'; "
            f"how={how!r} sets the rank itself (linear: the sources' rank, "
            "cat: their sum). Leave rank=None."
        )
    return names, [float(w) for w in weights]
