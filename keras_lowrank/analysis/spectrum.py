"""`delta_spectrum`: how low-rank is the update between two models?

For every selected layer the singular values of `ΔW` in the matrix form the
adapter factors use (input-side axes × output-side axes; a conv kernel as
`(kh·kw·c_in) × c_out`), the energy kept at each rank, the ranks for 90 /
95 / 99% of the energy, the stable rank and the effective rank.

Example:

>>> import keras, numpy as np, keras_lowrank
>>> from keras_lowrank.analysis import delta_spectrum
>>> base = keras.Sequential([keras.Input((8,)), keras.layers.Dense(6, name="dense")])
>>> tuned = keras.models.clone_model(base)
>>> u, v = np.ones((8, 1)), np.arange(6.0).reshape(1, 6)
>>> tuned.set_weights([base.get_weights()[0] + u @ v, base.get_weights()[1]])
>>> result = delta_spectrum(base, tuned)
>>> layer = result.layers[0]
>>> layer.path, layer.rank_for(0.99), round(layer.energy(1), 6)
('dense', 1, 1.0)
"""

import dataclasses
import json

import numpy as np

from keras_lowrank.analysis import deltas
from keras_lowrank.analysis import spectra

DEFAULT_RANKS = (1, 2, 4, 8, 16, 32, 64)
ENERGY_LEVELS = (0.9, 0.95, 0.99)


@dataclasses.dataclass
class LayerSpectrum:
    """The spectrum of one layer's update.

    Attributes:
        path: the layer's path.
        kind: the layer's class name.
        kernel_shape: the kernel's shape.
        d, k: the matrix form's input and output sizes.
        batch_shape: the kernel's batch axes (each entry is its own matrix).
        singular_values: `(*batch, min(d, k))`, descending, float64.
        exact: True when computed from the factors (no d×k SVD).
    """

    path: str
    kind: str
    kernel_shape: tuple
    d: int
    k: int
    batch_shape: tuple
    singular_values: np.ndarray
    exact: bool

    @property
    def norm(self):
        """`‖ΔW‖_F`."""
        return float(np.sqrt(np.square(self.singular_values).sum()))

    @property
    def max_rank(self):
        return min(self.d, self.k)

    def energy(self, rank):
        """Fraction of `‖ΔW‖²_F` kept by the best rank-`rank` update."""
        return spectra.energy_at(self.singular_values, rank)

    def rank_for(self, energy):
        """The smallest rank that keeps `energy` (a fraction) of it."""
        return spectra.rank_for_energy(self.singular_values, energy)

    @property
    def stable_rank(self):
        return spectra.stable_rank(self.singular_values)

    @property
    def effective_rank(self):
        return spectra.effective_rank(self.singular_values)

    def parameters(self, rank):
        """`(d·k, r·(d+k))` per batch entry times entries: full vs rank-r."""
        entries = int(np.prod(self.batch_shape)) if self.batch_shape else 1
        return entries * self.d * self.k, entries * rank * (self.d + self.k)

    def to_dict(self):
        return {
            "path": self.path,
            "kind": self.kind,
            "kernel_shape": list(self.kernel_shape),
            "d": self.d,
            "k": self.k,
            "batch_shape": list(self.batch_shape),
            "norm": self.norm,
            "exact": self.exact,
            "stable_rank": self.stable_rank,
            "effective_rank": self.effective_rank,
            "rank_for_energy": {str(e): self.rank_for(e) for e in ENERGY_LEVELS},
            "singular_values": self.singular_values.tolist(),
        }


class DeltaSpectrum:
    """What `delta_spectrum` returns.

    Attributes:
        layers: `[LayerSpectrum]` of the layers whose kernel changed, in
            model order.
        unchanged: paths of selected layers whose kernel did not change.
        changed_weights: keys of other weights that changed (biases, norms,
            a head, embeddings): what the kernels' spectra do not cover.

    Example:

    >>> import keras, numpy as np
    >>> from keras_lowrank.analysis import delta_spectrum
    >>> base = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4, name="dense")])
    >>> tuned = keras.models.clone_model(base)
    >>> tuned.set_weights([w + 1 for w in base.get_weights()])
    >>> result = delta_spectrum(base, tuned)
    >>> result.changed_weights, round(result.median_energy(1), 6)
    (['dense/bias'], 1.0)
    """

    def __init__(self, layers, unchanged=(), changed_weights=()):
        self.layers = list(layers)
        self.unchanged = list(unchanged)
        self.changed_weights = list(changed_weights)

    def __getitem__(self, path):
        for layer in self.layers:
            if layer.path == path:
                return layer
        raise KeyError(
            f"keras_lowrank: no changed layer {path!r} in this spectrum; "
            f"layers: {[layer.path for layer in self.layers][:6]}"
        )

    def median_energy(self, rank):
        """The median over layers of the energy kept at `rank`."""
        if not self.layers:
            return 1.0
        return float(np.median([layer.energy(rank) for layer in self.layers]))

    def table(self, ranks=DEFAULT_RANKS):
        """A plain-text table: one row per layer, energy at `ranks`."""
        head = ["layer", "d×k", "‖ΔW‖"] + [f"r={r}" for r in ranks]
        head += ["r90", "r95", "r99", "stable", "eff."]
        rows = []
        for layer in self.layers:
            shape = f"{layer.d}×{layer.k}"
            if layer.batch_shape:
                shape = "×".join(map(str, layer.batch_shape)) + "·" + shape
            rows.append(
                [layer.path, shape, f"{layer.norm:.3g}"]
                + [f"{layer.energy(r):.1%}" for r in ranks]
                + [str(layer.rank_for(e)) for e in ENERGY_LEVELS]
                + [f"{layer.stable_rank:.1f}", f"{layer.effective_rank:.1f}"]
            )
        if self.layers:
            rows.append(
                ["median", "", ""]
                + [f"{self.median_energy(r):.1%}" for r in ranks]
                + [str(int(np.median([l.rank_for(e) for l in self.layers])))
                   for e in ENERGY_LEVELS]
                + ["", ""]
            )
        lines = format_rows([head] + rows)
        if self.changed_weights:
            lines.append(
                f"{len(self.changed_weights)} other weights changed: "
                + ", ".join(self.changed_weights[:6])
                + (" …" if len(self.changed_weights) > 6 else "")
            )
        return "\n".join(lines)

    def to_dict(self):
        return {
            "layers": [layer.to_dict() for layer in self.layers],
            "unchanged": self.unchanged,
            "changed_weights": self.changed_weights,
        }

    def to_json(self, indent=None):
        """The whole result (singular values included) as JSON text."""
        return json.dumps(self.to_dict(), indent=indent)

    def plot(self, path=None, ranks=DEFAULT_RANKS):
        """Spectra, energy vs rank and the parameter budget, as a matplotlib
        figure (saved to `path` if given). Needs matplotlib
        (`pip install keras-lowrank[plot]`)."""
        from keras_lowrank.analysis import plots

        return plots.plot_spectrum(self, path=path, ranks=ranks)


def delta_spectrum(base, tuned=None, targets=None):
    """The singular values of every layer's update `ΔW` from `base` to
    `tuned`.

    Args:
        base: a built Keras model (plain or adapted).
        tuned: a model of the same architecture: a full fine-tune of `base`,
            an adapted copy, a task holding `base` as its backbone. `None`:
            the update of `base`'s own active adapters.
        targets: which layers (as in `adapt`); `None`: every Dense,
            EinsumDense and Conv layer outside a KerasHub task's head.

    Returns:
        A `DeltaSpectrum`.

    Raises:
        ValueError: a layer of `base` has no counterpart in `tuned`, or a
            different kernel shape there; `tuned=None` and `base` has no
            adapters.

    Example:

    >>> import keras, numpy as np, keras_lowrank
    >>> from keras_lowrank.analysis import delta_spectrum
    >>> model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(8, name="dense")])
    >>> _ = keras_lowrank.adapt(model, rank=2, targets=["dense"])
    >>> _ = model.layers[0].adapter_variables("default")["B"].assign(np.ones((2, 8)))
    >>> layer = delta_spectrum(model).layers[0]
    >>> layer.exact, layer.singular_values.shape
    (True, (8,))
    """
    if tuned is None and not _has_adapters(base):
        raise ValueError(
            f"keras_lowrank: model '{base.name}' has no adapters, so with "
            "tuned=None there is no update to measure. Pass the tuned model: "
            "delta_spectrum(base, tuned)."
        )
    layer_deltas = deltas.layer_deltas(base, tuned, targets)
    layers, unchanged = [], []
    for delta in layer_deltas:
        if delta.is_zero():
            unchanged.append(delta.path)
            continue
        layers.append(_spectrum(delta))
    changed = []
    if tuned is not None:
        changed = deltas.changed_weights(
            base, tuned, {d.path for d in layer_deltas}
        )
    return DeltaSpectrum(layers, unchanged, changed)


def _spectrum(delta):
    layout = delta.layout
    if delta.factors is not None:
        s = spectra.product_svd(*delta.factors)[1]
        pad = layout.max_rank - s.shape[-1]
        if pad > 0:
            s = np.concatenate([s, np.zeros(s.shape[:-1] + (pad,))], axis=-1)
    else:
        s = spectra.singular_values(delta.dense)
    return LayerSpectrum(
        path=delta.path,
        kind=type(delta.layer).__name__,
        kernel_shape=layout.kernel_shape,
        d=layout.d,
        k=layout.k,
        batch_shape=layout.batch_shape,
        singular_values=s,
        exact=delta.factors is not None,
    )


def _has_adapters(model):
    from keras_lowrank.state.model_state import adapted_layers

    return bool(adapted_layers(model))


def format_rows(rows):
    """Text columns: the first left-aligned, the rest right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                  for i, (cell, w) in enumerate(zip(row, widths)))
        for row in rows
    ]
