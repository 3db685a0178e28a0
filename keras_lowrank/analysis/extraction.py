"""`extract`: a full fine-tune turned into a LoRA adapter by truncated SVD.

For each layer the best rank-r approximation of `ΔW = W_tuned − W_base`
(Eckart–Young) is `U_r·S_r·V_rᵀ`; the adapter stores `A = U_r·√S_r`,
`B = √S_r·V_rᵀ` with `alpha = r` (scale 1), so merging it adds exactly the
truncated update. The rank per layer is fixed (`rank=`) or the smallest
that keeps a fraction of the update's energy (`energy=`), recorded in the
adapter's `rank_pattern`. The adapter joins `base` as a named adapter (so
`save_adapter` writes it), in one transaction: a failure leaves `base` as
it was.

Example:

>>> import keras, numpy as np, keras_lowrank
>>> base = keras.Sequential([keras.Input((8,)), keras.layers.Dense(6, name="dense")])
>>> tuned = keras.models.clone_model(base)
>>> u, v = np.ones((8, 1)), np.arange(6.0).reshape(1, 6)
>>> tuned.set_weights([base.get_weights()[0] + u @ v, base.get_weights()[1]])
>>> result = keras_lowrank.extract(base, tuned, rank=1)
>>> row = result.layers[0]
>>> row.path, row.rank, row.error < 1e-6
('dense', 1, True)
"""

import dataclasses
import json
import numbers

import numpy as np

from keras_lowrank.analysis import deltas
from keras_lowrank.analysis import spectra
from keras_lowrank.spec import AdapterSpec
from keras_lowrank.spec import check_adapter_name
from keras_lowrank.state import owned
from keras_lowrank.state.model_state import state_of
from keras_lowrank.surgery import adapt as adapting
from keras_lowrank.surgery import adapt_checks
from keras_lowrank.surgery import targets as targeting
from keras_lowrank.surgery.walk import walk


@dataclasses.dataclass(frozen=True)
class ExtractedLayer:
    """One layer of an extracted adapter.

    Attributes:
        path: the layer's path.
        rank: the rank it got.
        energy: the fraction of `‖ΔW‖²_F` the rank keeps.
        bound: the Eckart–Young error `‖ΔW − ΔW_r‖_F / ‖ΔW‖_F`, the best
            any rank-r update can do.
        error: the same error measured on the installed adapter's `s·A·B`
            (equal to `bound` up to float32 rounding).
        params: the adapter's `r·(d+k)` (times any batch axes).
        full_params: the kernel's `d·k`.
    """

    path: str
    rank: int
    energy: float
    bound: float
    error: float
    params: int
    full_params: int


@dataclasses.dataclass(frozen=True)
class Extraction:
    """What `extract` returns.

    Attributes:
        name: the new adapter's name on `base`.
        layers: one `ExtractedLayer` per adapted layer.
        unchanged: selected layers whose kernel did not change (no adapter).
        changed_weights: other weights that differ in `tuned` (keys).
        kept: the keys the adapter carries with `tuned`'s values
            (`keep_changed`).
    """

    name: str
    layers: tuple
    unchanged: tuple
    changed_weights: tuple
    kept: tuple

    @property
    def params(self):
        return sum(row.params for row in self.layers)

    @property
    def full_params(self):
        return sum(row.full_params for row in self.layers)

    def table(self):
        """A plain-text table, one row per layer."""
        from keras_lowrank.analysis.spectrum import format_rows

        rows = [["layer", "rank", "energy", "error", "Eckart–Young", "r·(d+k)", "d·k"]]
        for row in self.layers:
            rows.append([
                row.path, str(row.rank), f"{row.energy:.1%}", f"{row.error:.4f}",
                f"{row.bound:.4f}", f"{row.params:,}", f"{row.full_params:,}",
            ])
        lines = format_rows(rows)
        lines.append(
            f"adapter {self.name!r}: {self.params:,} parameters for "
            f"{self.full_params:,} kernel entries "
            f"({self.params / max(self.full_params, 1):.1%})"
        )
        if self.changed_weights:
            lines.append(
                f"{len(self.changed_weights)} other weights changed, "
                f"{len(self.kept)} kept with the adapter"
            )
        return "\n".join(lines)

    def to_json(self, indent=None):
        return json.dumps({
            "name": self.name,
            "layers": [dataclasses.asdict(row) for row in self.layers],
            "unchanged": list(self.unchanged),
            "changed_weights": list(self.changed_weights),
            "kept": list(self.kept),
        }, indent=indent)


def extract(
    base, tuned, rank=None, energy=None, targets=None, name="extracted",
    keep_changed=False,
):
    """Adds to `base` the LoRA adapter closest to the update `base → tuned`.

    Args:
        base: the model before fine-tuning (plain, or adapted with no active
            adapter); it gets the new adapter, in place.
        tuned: the fine-tuned model of the same architecture.
        rank: one rank for every layer (capped at each kernel's
            `min(d, k)`).
        energy: instead of `rank`, a fraction in (0, 1]: each layer gets the
            smallest rank that keeps this much of `‖ΔW‖²_F`.
        targets: which layers (as in `adapt`); `None`: every Dense,
            EinsumDense and Conv layer outside a KerasHub task's head.
        name: the new adapter's name.
        keep_changed: `True` keeps every other weight that changed (biases,
            norms, a head, embeddings) with the adapter, at `tuned`'s values,
            as PEFT's `modules_to_save`; a list of layer names or patterns
            keeps the changed weights of those layers only; `False` keeps
            none (they are listed in the result).

    Returns:
        An `Extraction` (its `.table()` gives per-layer ranks and errors).

    Raises:
        ValueError: neither or both of `rank`/`energy`, values out of range,
            models of different architectures, `base` with active adapters,
            or an adapter `name` already on `base`.

    Example:

    >>> import keras, numpy as np, keras_lowrank
    >>> base = keras.Sequential([keras.Input((8,)), keras.layers.Dense(6, name="dense")])
    >>> tuned = keras.models.clone_model(base)
    >>> tuned.set_weights([w + 1.0 for w in base.get_weights()])
    >>> result = keras_lowrank.extract(base, tuned, energy=0.9, keep_changed=True)
    >>> result.kept, base.layers[0].active_adapters
    (('dense/bias',), ['extracted'])
    """
    _check_arguments(base, rank, energy, name)
    layer_deltas = deltas.layer_deltas(base, tuned, targets)
    changed = deltas.changed_weights(base, tuned, {d.path for d in layer_deltas})
    plan, factors, bounds, unchanged = [], {}, {}, []
    for delta in layer_deltas:
        if delta.is_zero():
            unchanged.append(delta.path)
            continue
        u, s, vt = _svd(delta)
        r = _rank(s, rank, energy, delta.layout.max_rank)
        a, b = spectra.truncate(u, s, vt, r)
        visit = _visit(base, delta.path)
        plan.append((visit, AdapterSpec(rank=r)))
        factors[delta.path] = {
            "A": deltas.from_matrix(delta.layout, a, "a").astype("float32"),
            "B": deltas.from_matrix(delta.layout, b, "b").astype("float32"),
        }
        bounds[delta.path] = (spectra.energy_at(s, r), spectra.tail_error(s, r), delta)
    if not plan:
        raise ValueError(
            f"keras_lowrank: no selected kernel of model '{base.name}' differs "
            f"in model '{tuned.name}', so there is nothing to extract "
            f"(selected: {unchanged[:4]})."
        )
    kept_keys, bias, kept_paths = _kept(base, plan, changed, keep_changed)
    record = adapt_checks.options_record(
        max(spec.rank for _, spec in plan), None,
        [visit.path for visit, _ in plan], None, 0.0, "standard", "lora",
        "default", bias, kept_paths,
        {visit.path: spec.rank for visit, spec in plan}, None,
        [visit.path for visit, _ in plan], kept_paths,
    )
    record["owned"] = kept_keys
    adapt_checks.check_plan(base, plan, name)
    adapt_checks.check_kept_paths(base, kept_paths, plan)
    values = _kept_values(base, tuned, kept_keys)
    adapting.install(
        base, name, plan, record, factors=factors, owned_values=values,
        verb="extract",
    )
    rows = [_row(visit, spec, bounds[visit.path], name) for visit, spec in plan]
    return Extraction(name, tuple(rows), tuple(unchanged), tuple(changed), tuple(kept_keys))


def _check_arguments(base, rank, energy, name):
    if (rank is None) == (energy is None):
        raise ValueError(
            "keras_lowrank: extract needs exactly one of rank= (a fixed rank "
            "per layer) or energy= (a fraction of each update's energy to "
            f"keep); got rank={rank!r}, energy={energy!r}."
        )
    if rank is not None and (
        isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1
    ):
        raise ValueError(f"keras_lowrank: rank must be a positive int; got {rank!r}.")
    if energy is not None and (
        isinstance(energy, bool) or not isinstance(energy, numbers.Real)
        or not 0.0 < energy <= 1.0
    ):
        raise ValueError(
            f"keras_lowrank: energy must be a fraction in (0, 1], such as "
            f"0.9; got {energy!r}."
        )
    check_adapter_name(name)
    state = state_of(base, required=False)
    if state is not None and state.active:
        raise ValueError(
            f"keras_lowrank: model '{base.name}' has active adapters "
            f"{state.active}, so it is not the base of the update. Extract "
            "onto the plain base model, or deactivate them first: "
            "keras_lowrank.set_adapter(model, [])."
        )


def _svd(delta):
    if delta.factors is not None:
        return spectra.product_svd(*delta.factors)
    return np.linalg.svd(delta.dense, full_matrices=False)


def _rank(s, rank, energy, max_rank):
    if rank is not None:
        return min(int(rank), max_rank)
    return min(spectra.rank_for_energy(s, energy), max_rank)


def _visit(model, path):
    for visit in walk(model):
        if visit.path == path:
            return visit
    raise AssertionError(path)  # layer_deltas walked the same model


def _kept(base, plan, changed, keep_changed):
    """`(owned keys, bias policy, kept layer paths)` for `keep_changed`."""
    if keep_changed is False or not changed:
        return [], "none", []
    adapted = {visit.path for visit, _ in plan}
    if keep_changed is True:
        wanted = None
    else:
        patterns = targeting.normalize("keep_changed", keep_changed, lone_regex=False)
        wanted = {v.path for v in targeting.select_any_layers(base, patterns)}
    layers = {}
    for key in changed:
        path = key.rsplit("/", 1)[0]
        if wanted is None or path in wanted:
            layers.setdefault(path, []).append(key)
    bias = "lora_only" if any(p in adapted for p in layers) else "none"
    kept_paths = [p for p in layers if p not in adapted]
    keys = owned.keys_for(base, kept_paths, bias, sorted(adapted))
    # bias="lora_only" owns every adapted layer's bias: keep only the
    # changed ones (a kept layer keeps all its weights).
    wanted_keys = {k for ks in layers.values() for k in ks}
    keys = [k for k in keys if k in wanted_keys or k.rsplit("/", 1)[0] not in adapted]
    return keys, bias, kept_paths


def _kept_values(base, tuned, keys):
    if not keys:
        return {}
    find = deltas.finder(tuned, adaptable=False)
    values = {}
    for key in keys:
        path, weight = key.rsplit("/", 1)
        visit = find(path)
        theirs = owned.keyed_weights(visit.layer, path)
        values[key] = deltas.to_numpy(theirs[key])
    return values


def _row(visit, spec, bound, name):
    kept_energy, tail, delta = bound
    layout = delta.layout
    a, b = deltas.factor_matrices(layout, visit.layer.adapter_variables(name))
    target = delta.matrix()
    error = float(np.linalg.norm(spec.scale * (a @ b) - target) / np.linalg.norm(target))
    entries = int(np.prod(layout.batch_shape)) if layout.batch_shape else 1
    return ExtractedLayer(
        visit.path, spec.rank, kept_energy, tail, error,
        entries * spec.rank * (layout.d + layout.k), entries * layout.d * layout.k,
    )
