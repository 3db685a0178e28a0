"""The LLM benchmark's figure: step time and peak memory per case.

A separate PNG from the MiniLM one (`report.plot`): its cases, units and
reference lines (the floor for time, full fine-tuning for memory) differ.
"""

from keras_lowrank.bench import llm_report
from keras_lowrank.bench.report import CASE_COLORS

# An LLM case's name starts with its kind (`builtin_qv`, `int8_all_linear`):
# the MiniLM plot's colours, plus DoRA's and the quantized bases'.
_COLORS = {**CASE_COLORS, "dora": "#9467bd", "int": "#17becf"}


def _color(name):
    for prefix, color in _COLORS.items():
        if name.startswith(prefix):
            return color
    return "#7f7f7f"


def plot(llm, path, title=""):
    """Writes a two-panel PNG of one backend's LLM results; returns `path`,
    or None when no entry has a step time.

    Args:
        llm: what `llm.run` returned (`result["llm"]` in the JSON).
        path: the PNG to write.
        title: the figure's title (e.g. the backend and date).

    Example:

    >>> import os, tempfile
    >>> entries = {
    ...     "full": {"time": {"median_ms": 30.0}, "peak_rss_bytes": 3 << 20},
    ...     "floor": {"time": {"median_ms": 20.0}, "peak_rss_bytes": 2 << 20},
    ... }
    >>> path = os.path.join(tempfile.mkdtemp(), "llm.png")
    >>> plot({"entries": entries}, path) == path
    True
    >>> plot({"entries": {}}, path) is None
    True
    """
    entries = {
        name: record for name, record in llm.get("entries", {}).items()
        if llm_report.figure(record, "step") is not None
    }
    if not entries:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(entries)
    panels = (
        ("step", "training step (ms, median); label: x floor", "floor", 1.0),
        ("memory", "peak memory (MiB); label: x full", "full", 2.0**-20),
    )
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for ax, (fig_name, ylabel, reference, unit) in zip(axes, panels):
        values = [llm_report.figure(entries[n], fig_name) for n in names]
        ref = entries.get(reference)
        ref_value = ref and llm_report.figure(ref, fig_name)
        heights = [0 if v is None else v * unit for v in values]
        bars = ax.bar(range(len(names)), heights,
                      color=[_color(n) for n in names])
        for bar, value in zip(bars, values):
            if value is not None and ref_value:
                ax.annotate(f"{value / ref_value:.2f}x",
                            (bar.get_x() + bar.get_width() / 2,
                             bar.get_height()),
                            ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel(ylabel)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
