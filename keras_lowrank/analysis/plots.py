"""Plots of the low-rank analysis (matplotlib, an optional extra).

Figures are built with `matplotlib.figure.Figure` (no pyplot global state,
no display needed) and saved with the Agg canvas when a path is given.

Example:

>>> from keras_lowrank.analysis import plots
>>> fig = plots.plot_accuracy_vs_rank([1, 4], [0.8, 0.9], full=0.95, head_only=0.7)
>>> len(fig.axes)
1
"""

import numpy as np


def _figure(width, height, columns=1):
    try:
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - the extra is installed in CI
        raise ImportError(
            "keras_lowrank: plotting needs matplotlib. Install it with "
            "`pip install keras-lowrank[plot]` (or `pip install matplotlib`)."
        ) from None
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(1, columns, squeeze=False)[0]
    return fig, list(axes)


def _save(fig, path):
    if path is not None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        FigureCanvasAgg(fig)
        fig.savefig(path, dpi=110)
    return fig


def plot_spectrum(result, path=None, ranks=(1, 2, 4, 8, 16, 32, 64)):
    """Three panels for a `DeltaSpectrum`: singular values per layer
    (normalised to the largest), energy kept vs rank (every layer and the
    median), and the parameter budget `d·k` vs `r·(d+k)` of the median layer.

    Args:
        result: a `DeltaSpectrum`.
        path: where to save a PNG (optional).
        ranks: the ranks marked on the energy panel.

    Returns:
        The matplotlib `Figure`.
    """
    fig, (spec_ax, energy_ax, budget_ax) = _figure(14, 4.2, 3)
    layers = result.layers
    top = max(1, max((layer.max_rank for layer in layers), default=1))
    grid = np.arange(1, top + 1)
    for layer in layers:
        s = np.sort(layer.singular_values.ravel())[::-1]
        if s[0] > 0:
            spec_ax.semilogy(np.arange(1, s.size + 1), s / s[0], lw=0.7, alpha=0.5)
        energy_ax.plot(grid, [layer.energy(r) for r in grid], lw=0.6, alpha=0.35)
    if layers:
        median = [result.median_energy(r) for r in grid]
        energy_ax.plot(grid, median, color="black", lw=2.2, label="median layer")
        for r in ranks:
            if r <= top:
                energy_ax.annotate(f"{result.median_energy(r):.0%}", (r, result.median_energy(r)),
                                   textcoords="offset points", xytext=(3, -10), fontsize=7)
        energy_ax.legend(loc="lower right")
    spec_ax.set(title="singular values of ΔW (σᵢ/σ₁), per layer",
                xlabel="index i", ylabel="σᵢ / σ₁")
    energy_ax.set(title="energy kept by the best rank-r update", xlabel="rank r",
                  ylabel="‖ΔW_r‖² / ‖ΔW‖²", xscale="log", ylim=(0, 1.02))
    if layers:
        layer = sorted(layers, key=lambda l: l.d * l.k)[len(layers) // 2]
        full = layer.d * layer.k
        budget_ax.plot(grid, grid * (layer.d + layer.k), label="r·(d+k): LoRA")
        budget_ax.axhline(full, color="black", ls="--", label="d·k: full update")
        budget_ax.set(title=f"parameters for a {layer.d}×{layer.k} kernel",
                      xlabel="rank r", ylabel="parameters", xscale="log", yscale="log")
        budget_ax.legend(loc="lower right")
    return _save(fig, path)


def plot_accuracy_vs_rank(ranks, accuracies, path=None, full=None, head_only=None,
                          lora=None, label="extracted adapter"):
    """Held-out accuracy against rank, with the full fine-tune and the
    head-only model as reference lines.

    Args:
        ranks: the ranks measured.
        accuracies: the accuracy at each rank.
        path: where to save a PNG (optional).
        full: full fine-tuning's accuracy (a horizontal line).
        head_only: the head-only model's accuracy (a horizontal line).
        lora: optional accuracies of LoRA trained directly at `ranks`.
        label: the legend entry of `accuracies`.

    Returns:
        The matplotlib `Figure`.
    """
    fig, (ax,) = _figure(6, 4)
    ax.plot(ranks, accuracies, "o-", label=label)
    if lora is not None:
        ax.plot(ranks, lora, "s--", label="LoRA trained at that rank")
    if full is not None:
        ax.axhline(full, color="black", ls="--", label=f"full fine-tuning ({full:.3f})")
    if head_only is not None:
        ax.axhline(head_only, color="grey", ls=":", label=f"head only ({head_only:.3f})")
    ax.set(xscale="log", xlabel="rank r", ylabel="held-out accuracy",
           title="accuracy vs rank")
    ax.set_xticks(list(ranks), [str(r) for r in ranks])
    ax.legend(loc="lower right")
    return _save(fig, path)


def plot_gradient_subspace(history, path=None):
    """The `GradientSubspace` curves over training: the mean fraction of the
    gradient's energy in its top-r subspace and, for adapted layers, in the
    factors' span.

    Args:
        history: a `GradientSubspace` callback (its `.history`) or that list.
        path: where to save a PNG (optional).

    Returns:
        The matplotlib `Figure`.
    """
    records = getattr(history, "history", history)
    fig, (ax,) = _figure(6, 4)
    steps = [row["step"] for row in records]
    for key, label in (("top_r", "top-r subspace of the gradient"),
                       ("factor_span", "span of the adapter's factors")):
        values = [row["mean"].get(key) for row in records]
        if any(v is not None for v in values):
            ax.plot(steps, values, "o-", label=label)
    ax.set(xlabel="training step", ylabel="fraction of ‖∇W‖²", ylim=(0, 1.02),
           title="where the weight gradient lies")
    ax.legend(loc="lower right")
    return _save(fig, path)
