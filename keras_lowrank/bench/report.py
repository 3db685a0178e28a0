"""Turning result records into ratios, Markdown tables, JSON and a plot.

Works on plain dicts (the JSON records), so it runs without Keras and can
combine files written by runs on different backends.
"""

import json
import math

# Figures reported for every entry; (record key, column title, formatter).
TRAIN_FIGURES = (
    ("step_ms", "step time", lambda v: f"{v:.1f} ms"),
    ("peak_rss_mib", "peak RSS", lambda v: f"{v:,.0f} MiB"),
    ("device_peak_mib", "device peak", lambda v: f"{v:,.0f} MiB"),
    ("trainable_params", "trainable params", lambda v: f"{v:,.0f}"),
    ("optimizer_state_mib", "optimizer state", lambda v: _mib(v)),
)
INFER_FIGURES = (
    ("step_ms", "inference time", lambda v: f"{v:.1f} ms"),
    ("peak_rss_mib", "peak RSS", lambda v: f"{v:,.0f} MiB"),
    ("device_peak_mib", "device peak", lambda v: f"{v:,.0f} MiB"),
)
REFERENCES = {"train": ("full", "builtin", "floor"), "infer": ("base",)}
REFERENCE_TITLES = {"full": "full", "builtin": "built-in", "floor": "floor", "base": "base"}
# Ratios computed for `TARGETS` but not shown in every cell: variants
# (DoRA) are judged against plain LoRA on the same targets and rank.
EXTRA_REFERENCES = {"train": ("lowrank",), "infer": ()}

# Targets of the benchmark: (description, case, targets, reference, figure,
# bound). The bounds are issue 16's.
TARGETS = [
    ("all linear: step <= 1.10x floor", "lowrank", "all_linear", "floor", "step_ms", 1.10),
    ("all linear: step <= 0.85x built-in", "lowrank", "all_linear", "builtin", "step_ms", 0.85),
    ("query/value: step <= 0.95x built-in", "lowrank", "qv", "builtin", "step_ms", 0.95),
    ("unmerged inference <= 1.05x base (all linear)", "unmerged", "all_linear", "base", "step_ms", 1.05),
    ("unmerged inference <= 1.05x base (query/value)", "unmerged", "qv", "base", "step_ms", 1.05),
    ("merged inference = base within noise (all linear)", "merged", "all_linear", "base", "step_ms", 1.05),
    ("DoRA: step <= 1.15x LoRA (all linear)", "dora", "all_linear", "lowrank", "step_ms", 1.15),
    ("DoRA: step <= 1.15x LoRA (query/value)", "dora", "qv", "lowrank", "step_ms", 1.15),
]


def _mib(value):
    if value < 1:
        return f"{value * 1024:,.0f} KiB"
    return f"{value:,.1f} MiB"


def figures(record):
    """The record's figures under uniform keys (ms, MiB, counts)."""
    out = {"step_ms": record["time"]["median_ms"]}
    if record.get("peak_rss_bytes"):
        out["peak_rss_mib"] = record["peak_rss_bytes"] / 2**20
    if record.get("device_peak_bytes"):
        out["device_peak_mib"] = record["device_peak_bytes"] / 2**20
    if record["kind"] == "train":
        out["trainable_params"] = record["trainable_params"]
        if record.get("optimizer_state_bytes") is not None:
            out["optimizer_state_mib"] = record["optimizer_state_bytes"] / 2**20
    return out


def find_reference(records, record, reference):
    """The record of case `reference` comparable with `record`: same block,
    and for adapted references the same target set and rank."""
    for other in records:
        if other["block"] != record["block"] or other["case"] != reference:
            continue
        if other["targets"] is not None and (
            other["targets"] != record["targets"] or other["rank"] != record["rank"]
        ):
            continue
        return other
    return None


def add_ratios(records):
    """Adds `figures` and `ratios` (`{figure: {reference: x}}`) to every record."""
    for record in records:
        record["figures"] = figures(record)
    for record in records:
        ratios = {}
        kind = record["kind"]
        for reference in REFERENCES[kind] + EXTRA_REFERENCES[kind]:
            other = find_reference(records, record, reference)
            if other is None:
                continue
            for key, value in record["figures"].items():
                base = other["figures"].get(key)
                if base:
                    ratios.setdefault(key, {})[reference] = value / base
        record["ratios"] = ratios
    return records


def _cell(record, key, fmt):
    value = record["figures"].get(key)
    if value is None:
        return "–"
    ratios = record["ratios"].get(key, {})
    refs = REFERENCES[record["kind"]]
    shown = [f"{ratios[r]:.2f}" if r in ratios else "–" for r in refs]
    if all(s == "–" for s in shown):
        return fmt(value)
    return f"{fmt(value)} ({' / '.join(shown)})"


def _targets_label(record):
    names = {"qv": "query/value", "all_linear": "all linear", None: "–"}
    return names.get(record["targets"], record["targets"])


def compare_tables(records, block):
    """Training and inference tables of one comparison block."""
    rows = [r for r in records if r["block"] == block]
    lines = []
    for kind, figs in (("train", TRAIN_FIGURES), ("infer", INFER_FIGURES)):
        chosen = [r for r in rows if r["kind"] == kind]
        if not chosen:
            continue
        figs = [f for f in figs if any(f[0] in r["figures"] for r in chosen)]
        refs = " / ".join(f"x {REFERENCE_TITLES[r]}" for r in REFERENCES[kind])
        lines.append(
            f"| {'training' if kind == 'train' else 'inference'} case | targets | r | "
            + " | ".join(f"{title} ({refs})" for _, title, _ in figs)
            + " |"
        )
        lines.append("|" + " --- |" * (3 + len(figs)))
        for r in chosen:
            lines.append(
                f"| {r['label']} | {_targets_label(r)} | {r['rank'] or '–'} | "
                + " | ".join(_cell(r, key, fmt) for key, _, fmt in figs)
                + " |"
            )
        lines.append("")
    return "\n".join(lines)


def sweep_table(records, role, variable):
    """One row per swept value: step times and the keras_lowrank ratios."""
    rows = [r for r in records if r["role"] == role and r["kind"] == "train"]
    if not rows:
        return ""

    def value_of(r):
        return r["rank"] if variable == "rank" else r["sweep"].get(variable)

    values = sorted({value_of(r) for r in rows if value_of(r) is not None})
    lines = [
        f"| {variable} | full | floor | Keras enable_lora | keras_lowrank | "
        "keras_lowrank x floor | x built-in | x full | built-in x floor |",
        "|" + " --- |" * 9,
    ]
    for v in values:
        def pick(case):
            for r in rows:
                if r["case"] != case:
                    continue
                if variable == "rank" and r["rank"] in (v, None):
                    return r
                if variable != "rank" and r["sweep"].get(variable) == v:
                    return r
            return None

        full, floor = pick("full"), pick("floor")
        builtin, lowrank = pick("builtin"), pick("lowrank")

        def ms(r):
            return f"{r['figures']['step_ms']:.1f}" if r else "–"

        def ratio(r, ref):
            value = r and r["ratios"].get("step_ms", {}).get(ref)
            return f"{value:.2f}" if value else "–"

        lines.append(
            f"| {v} | {ms(full)} | {ms(floor)} | {ms(builtin)} | {ms(lowrank)} | "
            f"{ratio(lowrank, 'floor')} | {ratio(lowrank, 'builtin')} | "
            f"{ratio(lowrank, 'full')} | {ratio(builtin, 'floor')} |"
        )
    return "\n".join(lines) + "\n"


def target_checks(records):
    """`[(description, measured ratio or None, bound, met)]` for `TARGETS`."""
    checks = []
    for text, case, targets, reference, key, bound in TARGETS:
        found = [
            r for r in records
            if r["role"] == "compare" and r["case"] == case and r["targets"] == targets
        ]
        value = None
        if found:
            value = found[0]["ratios"].get(key, {}).get(reference)
        checks.append((text, value, bound, value is not None and value <= bound))
    return checks


def targets_across_backends(results):
    """One Markdown table of `TARGETS`, a column per backend's result:
    `ratio ✓` where met, `ratio ✗` where missed, `–` where not measured."""
    backends = [result["meta"]["backend"] for result in results]
    columns = [target_checks(add_ratios(result["records"])) for result in results]
    lines = [
        "| target | " + " | ".join(backends) + " |",
        "|" + " --- |" * (1 + len(backends)),
    ]
    for row, (text, *_rest) in enumerate(TARGETS):
        cells = []
        for checks in columns:
            _, value, _, met = checks[row]
            cells.append("–" if value is None else f"{value:.2f}x {'✓' if met else '✗'}")
        lines.append(f"| {text} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown(result):
    """The whole report of one run (one backend) as Markdown."""
    records = result["records"]
    meta = result["meta"]
    header = (
        f"Machine: {meta['machine']['cpu']}, {meta['machine']['cores']} cores, "
        f"{meta['machine']['memory_gib']} GiB; {meta.get('accelerator') or 'no accelerator'}. "
        f"keras {meta['keras']}, {meta['backend']} {meta['backend_version']}."
    )
    # Interleaved rounds time the compare blocks and serving; the LLM
    # section says how it was timed (a process per case), so an LLM-only
    # run leaves the sentence out.
    if records or result.get("serving"):
        header += (
            f" Timing: {meta['rounds']} interleaved rounds x {meta['steps']} "
            f"steps per entry, medians; memory: {meta['memory']}."
        )
    out = [f"### Backend `{meta['backend']}` — {meta['date']}", "", header, ""]
    blocks = []
    for r in records:
        if r["block"] not in blocks:
            blocks.append(r["block"])
    for block in blocks:
        first = next(r for r in records if r["block"] == block)
        if first["role"] != "compare":
            continue
        out += [f"**{block}**: {first['workload']}", "", compare_tables(records, block)]
    checks = [c for c in target_checks(records) if c[1] is not None]
    if checks:
        out += ["| target | measured | met |", "| --- | --- | --- |"]
        for text, value, _, met in checks:
            out.append(f"| {text} | {value:.2f}x | {'yes' if met else 'no'} |")
        out.append("")
    for role, variable, title in (
        ("rank_sweep", "rank", "Rank sweep"),
        ("width_sweep", "hidden_dim", "Width sweep"),
    ):
        table = sweep_table(records, role, variable)
        if table:
            workload = next(r["workload"] for r in records if r["role"] == role)
            if role == "width_sweep":  # one workload per width: drop "d=..."
                workload = workload.split(" d=")[0] + workload.split(",", 1)[1]
            out += [f"**{title}** ({workload}; training step, ms):", "", table]
    return "\n".join(out)


def write_json(result, path):
    with open(path, "w") as f:
        # The run's own order (the LLM cases as `llm.ENTRIES` lists them),
        # so a report rebuilt from the file (`combine`) lists them alike.
        json.dump(result, f, indent=1)


# Bar and line colours by case, shared by this plot and `llm_plot`.
CASE_COLORS = {"full": "#888888", "builtin": "#d62728", "lowrank": "#1f77b4",
               "floor": "#2ca02c"}


def plot(result, path):
    """A PNG: MiniLM step time per case, the rank sweep and the width sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = result["records"]
    panels = []
    compare = [r for r in records if r["role"] == "compare" and r["kind"] == "train"]
    if compare:
        panels.append("compare")
    if any(r["role"] == "rank_sweep" for r in records):
        panels.append("rank")
    if any(r["role"] == "width_sweep" for r in records):
        panels.append("width")
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2))
    axes = [axes] if len(panels) == 1 else list(axes)
    colors = CASE_COLORS
    for ax, panel in zip(axes, panels):
        if panel == "compare":
            labels, values, cols = [], [], []
            for r in compare:
                labels.append(
                    r["label"].replace("keras_lowrank", "kl").replace(" fine-tuning", "")
                    + ("" if r["targets"] is None else f"\n{_targets_label(r)}")
                )
                values.append(r["figures"]["step_ms"])
                cols.append(colors.get(r["case"], "#9467bd"))
            bars = ax.bar(range(len(values)), values, color=cols)
            for bar, r in zip(bars, compare):
                ratio = r["ratios"].get("step_ms", {}).get("floor")
                if ratio:
                    ax.annotate(f"{ratio:.2f}x", (bar.get_x() + bar.get_width() / 2,
                                bar.get_height()), ha="center", va="bottom",
                                fontsize=7)
            ax.set_xticks(range(len(values)))
            ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
            ax.set_ylabel("training step (ms, median; label: x floor)")
            ax.set_title(compare[0]["workload"].split(",")[0], fontsize=9)
        elif panel == "rank":
            rows = [r for r in records if r["role"] == "rank_sweep" and r["kind"] == "train"]
            for case in ("builtin", "lowrank"):
                pts = sorted((r["rank"], r["figures"]["step_ms"]) for r in rows if r["case"] == case)
                if pts:
                    ax.plot(*zip(*pts), marker="o", color=colors[case],
                            label=rows[0] and next(r["label"] for r in rows if r["case"] == case))
            for case in ("full", "floor"):
                for r in rows:
                    if r["case"] == case:
                        ax.axhline(r["figures"]["step_ms"], color=colors[case],
                                   linestyle="--", label=r["label"])
            ax.set_xscale("log", base=2)
            ax.set_xlabel("rank r")
            ax.set_ylabel("training step (ms, median)")
            ax.set_title("rank sweep: " + rows[0]["workload"].split(",")[0], fontsize=9)
            ax.legend(fontsize=7)
        else:
            rows = [r for r in records if r["role"] == "width_sweep" and r["kind"] == "train"]
            for case in ("full", "builtin", "lowrank"):
                pts = sorted(
                    (r["sweep"]["hidden_dim"], r["ratios"]["step_ms"].get("floor", math.nan))
                    for r in rows if r["case"] == case
                )
                if pts:
                    ax.plot(*zip(*pts), marker="o", color=colors[case],
                            label=next(r["label"] for r in rows if r["case"] == case))
            ax.axhline(1.0, color=colors["floor"], linestyle="--", label="floor")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("hidden size d")
            ax.set_ylabel("training step / floor step")
            ranks = sorted({r["rank"] for r in rows if r["rank"]})
            ax.set_title(f"width sweep (rank {ranks[0] if ranks else '?'}, "
                         "all linear layers)", fontsize=9)
            ax.legend(fontsize=7)
    fig.suptitle(
        f"keras_lowrank benchmark — {result['meta']['backend']} — "
        f"{result['meta']['date']}", fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
