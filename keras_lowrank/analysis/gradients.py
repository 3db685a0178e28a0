"""`GradientSubspace`: how much of each weight gradient lies in a rank-r
subspace, measured during `fit`.

For a kernel `W` with full gradient `G = ∂L/∂W` (matrix form, as the
factors see it) the callback logs, every `every` steps on a fixed probe
batch:

- `top_r`: `Σ_{i≤r} σ_i(G)² / ‖G‖²_F`, the share of the gradient's energy in
  its own best rank-r subspace: the seed's "projecting gradient information
  onto a lower-dimensional plane", measured. Near 1 means a rank-r update
  loses little of what full fine-tuning would do at this step.
- `factor_span` (adapted layers): the share of `‖G‖²` in the tangent space
  of the rank-r factorisation at the adapter's current `A·B`,
  `{A·X + Y·B}`: `‖P_A·G‖² + ‖G·P_B‖² − ‖P_A·G·P_B‖²` over `‖G‖²`, with
  `P_A`, `P_B` the projections onto `A`'s column and `B`'s row space. This is
  the part of the full gradient a LoRA step on `A` and `B` can follow. At
  `B = 0` (the usual start) only the `P_A` term is left.

The gradient is taken with respect to the kernels themselves, frozen or
not, so the same callback serves a full fine-tune and a LoRA fit. It costs
one extra forward/backward pass on the probe batch and one SVD per kernel
per measurement.

Example:

>>> import keras, numpy as np, keras_lowrank
>>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, name="dense")])
>>> _ = keras_lowrank.adapt(model, rank=2, targets=["dense"])
>>> model.compile("sgd", "mse")
>>> x, y = np.ones((4, 8), "float32"), np.zeros((4, 4), "float32")
>>> probe = GradientSubspace((x, y), rank=1, every=1)
>>> _ = model.fit(x, y, epochs=1, verbose=0, callbacks=[probe])
>>> row = probe.history[-1]["layers"]["dense"]
>>> round(row["top_r"], 6)  # a constant batch: the gradient has rank 1
1.0
"""

import keras
import numpy as np

from keras_lowrank.analysis import autodiff
from keras_lowrank.analysis import deltas
from keras_lowrank.analysis import spectra
from keras_lowrank.layers import LowRankLayer
from keras_lowrank.layers import adapter_class_for
from keras_lowrank.surgery.walk import walk


class GradientSubspace(keras.callbacks.Callback):
    """Logs the low-rank share of every kernel gradient during `fit`.

    Args:
        data: the probe batch `(x, y)` (inputs as the model's `call` takes
            them; a KerasHub task's raw inputs go through its preprocessor
            once, at the start).
        rank: the `r` of `top_r`.
        every: measure every this many training steps (and at step 0).
        targets: which layers (as in `adapt`); `None`: the adapted layers
            of an adapted model, else every Dense, EinsumDense and Conv
            layer outside a KerasHub task's head.
        loss: `loss(y_true, y_pred)`; `None` takes the compiled loss (a
            single loss).
        verbose: print the means at each measurement.

    Attributes:
        history: one dict per measurement: `{"step", "layers": {path:
            {"top_r", "factor_span"?}}, "mean": {"top_r", "factor_span"?}}`.

    Example:

    >>> import keras, numpy as np
    >>> model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3, name="d")])
    >>> model.compile("sgd", "mse")
    >>> x = np.random.default_rng(0).normal(size=(8, 6)).astype("float32")
    >>> probe = GradientSubspace((x, np.zeros((8, 3), "float32")), rank=3)
    >>> _ = model.fit(x, np.zeros((8, 3)), verbose=0, callbacks=[probe])
    >>> round(probe.history[0]["mean"]["top_r"], 6)  # rank 3 = full rank
    1.0
    """

    def __init__(self, data, rank=8, every=50, targets=None, loss=None, verbose=False):
        super().__init__()
        if not isinstance(data, (tuple, list)) or len(data) < 2:
            raise TypeError(
                "keras_lowrank: GradientSubspace needs a probe batch "
                f"`data=(x, y)`; got {type(data).__name__}."
            )
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"keras_lowrank: rank must be a positive int; got {rank!r}.")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"keras_lowrank: every must be a positive int; got {every!r}.")
        self.data = (data[0], data[1])
        self.rank = rank
        self.every = every
        self.targets = targets
        self.loss = loss
        self.verbose = verbose
        self.history = []
        self._step = 0
        self._grad = None

    def on_train_begin(self, logs=None):
        model = self.model
        if self.targets is None and any(
            isinstance(v.layer, LowRankLayer) for v in walk(model)
        ):
            visits = [v for v in walk(model) if isinstance(v.layer, LowRankLayer)]
        else:
            visits = deltas.selected_layers(model, self.targets)
        visits = [v for v in visits if getattr(v.layer, "quantization_mode", None) is None]
        if not visits:
            raise ValueError(
                f"keras_lowrank: GradientSubspace found no float kernel to "
                f"measure in model '{model.name}' (targets={self.targets!r})."
            )
        self._visits = visits
        kernels = [adapter_class_for(v.layer).kernel_variable(v.layer) for v in visits]
        self._grad = autodiff.gradient_function(model, kernels, self._loss())
        self._probe = self._preprocessed()
        self._step = 0
        self.measure()

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        if self._step % self.every == 0:
            self.measure()

    def measure(self):
        """Measures now; appends to and returns the latest `history` row."""
        x, y = self._probe
        # JAX's fit keeps the live values outside the variables between
        # steps; its public sync puts them back (a no-op when in sync).
        sync = getattr(self.model, "jax_state_sync", None)
        if sync is not None:
            sync()
        grads = self._grad(x, y)
        layers = {}
        for visit, grad in zip(self._visits, grads):
            layers[visit.path] = _fractions(visit.layer, grad, self.rank)
        mean = {}
        for key in ("top_r", "factor_span"):
            values = [row[key] for row in layers.values() if key in row]
            if values:
                mean[key] = float(np.mean(values))
        row = {"step": self._step, "layers": layers, "mean": mean}
        self.history.append(row)
        if self.verbose:
            text = ", ".join(f"{k} {v:.3f}" for k, v in mean.items())
            print(f"GradientSubspace step {self._step}: {text}")
        return row

    def plot(self, path=None):
        """The curves over training (see `plots.plot_gradient_subspace`)."""
        from keras_lowrank.analysis import plots

        return plots.plot_gradient_subspace(self, path=path)

    def _loss(self):
        loss = self.loss if self.loss is not None else getattr(self.model, "loss", None)
        if loss is None or isinstance(loss, (dict, list, tuple)):
            raise ValueError(
                "keras_lowrank: GradientSubspace needs one loss: compile the "
                "model with a single loss, or pass loss=... to the callback."
            )
        return keras.losses.get(loss) if isinstance(loss, str) else loss

    def _preprocessed(self):
        x, y = self.data
        preprocessor = getattr(self.model, "preprocessor", None)
        if preprocessor is not None:
            x, y, _ = keras.utils.unpack_x_y_sample_weight(preprocessor(x, y))
        return x, y


def _fractions(layer, grad, rank):
    layout = adapter_class_for(layer).kernel_layout(layer)
    g = deltas.to_matrix(layout, grad)
    total = float(np.square(g).sum())
    s = spectra.singular_values(g)
    out = {"top_r": spectra.energy_at(s, rank) if total else 1.0}
    factors = _active_factors(layer, layout)
    if factors is not None:
        out["factor_span"] = _tangent_fraction(g, *factors) if total else 1.0
    return out


def _active_factors(layer, layout):
    if not isinstance(layer, LowRankLayer):
        return None
    terms = [t for kind, t in deltas.active_terms(layer) if kind == "lowrank"]
    if not terms:
        return None
    a = np.concatenate([t[0] for t in terms], axis=-1)
    b = np.concatenate([t[1] for t in terms], axis=-2)
    return a, b


def _basis(m):
    """An orthonormal basis of the column space of `m` `(*batch, n, r)`
    (directions with singular value below 1e-10·max dropped: zero at B=0)."""
    u, s, _ = np.linalg.svd(m, full_matrices=False)
    keep = s > 1e-10 * max(float(s.max()) if s.size else 0.0, 1e-30)
    return u * keep[..., None, :]


def _tangent_fraction(g, a, b):
    q_a = _basis(a)
    q_b = _basis(np.swapaxes(b, -1, -2))
    left = np.swapaxes(q_a, -1, -2) @ g
    right = g @ q_b
    both = left @ q_b
    captured = np.square(left).sum() + np.square(right).sum() - np.square(both).sum()
    return float(captured / np.square(g).sum())
