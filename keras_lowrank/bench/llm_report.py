"""Ratios and Markdown tables of the LLM benchmark (`bench.llm`).

Works on plain dicts (what `llm.run` returns, or the benchmark's JSON), so it
needs no Keras and can combine files written on different backends. A
case's memory figure is the device's peak where the backend reported one,
else the peak resident memory of the case's own process.
"""

# (ratio name, figure, numerator entry, denominator entry, text).
RATIOS = (
    ("lora_all_linear_peak_vs_full", "memory", "lowrank_all_linear", "full",
     "LoRA all linear peak memory / full fine-tuning"),
    ("lora_all_linear_added_memory_vs_full", "added_memory",
     "lowrank_all_linear", "full",
     "the same, memory above the process's start only"),
    ("lowrank_all_linear_step_vs_floor", "step", "lowrank_all_linear",
     "floor", "LoRA all linear step / floor"),
    ("lowrank_qv_step_vs_floor", "step", "lowrank_qv", "floor",
     "LoRA query/value step / floor"),
    ("dora_all_linear_step_vs_floor", "step", "dora_all_linear", "floor",
     "DoRA all linear step / floor"),
    ("int4_peak_vs_float_base", "memory", "int4_all_linear",
     "lowrank_all_linear", "int4 base peak memory / float base (LoRA all "
     "linear)"),
    ("int8_peak_vs_float_base", "memory", "int8_all_linear",
     "lowrank_all_linear", "int8 base peak memory / float base (LoRA all "
     "linear)"),
    ("first_step_vs_builtin_all_linear", "first", "lowrank_all_linear",
     "builtin_all_linear", "first step (trace + compile), LoRA / "
     "`enable_lora`, all linear"),
    ("first_step_vs_builtin_qv", "first", "lowrank_qv", "builtin_qv",
     "first step (trace + compile), LoRA / `enable_lora`, query/value"),
)
TARGETS = {None: "–", "qv": "query/value", "all_linear": "all linear"}


def figure(record, name):
    """One figure of an entry's record (None when not measured).

    Args:
        record: an entry of `llm.run(...)["entries"]`.
        name: `"step"` (median ms), `"first"` (s), `"memory"` (bytes: the
            device peak, else peak RSS) or `"added_memory"` (peak RSS minus
            the process's RSS before the model was built).

    Example:

    >>> figure({"time": {"median_ms": 12.5}}, "step")
    12.5
    >>> figure({"peak_rss_bytes": 300, "rss_start_bytes": 100}, "added_memory")
    200
    """
    if name == "step":
        return record.get("time", {}).get("median_ms")
    if name == "first":
        return record.get("first_step_s")
    if name == "memory":
        return record.get("device_peak_bytes") or record.get("peak_rss_bytes")
    if name == "added_memory":
        if record.get("peak_rss_bytes") and record.get("rss_start_bytes"):
            return record["peak_rss_bytes"] - record["rss_start_bytes"]
        return None
    raise ValueError(f"keras_lowrank: unknown LLM figure {name!r}; use step, "
                     "first, memory or added_memory.")


def add_ratios(result):
    """Adds `result["ratios"]` (`{name: float}`, for the ratios of `RATIOS`
    whose two entries were measured) to an `llm.run` result.

    Args:
        result: a dict with `entries` (name -> record).

    Example:

    >>> result = {"entries": {"lowrank_qv": {"time": {"median_ms": 11.0}},
    ...                       "floor": {"time": {"median_ms": 10.0}}}}
    >>> add_ratios(result)["ratios"]
    {'lowrank_qv_step_vs_floor': 1.1}
    """
    entries = result["entries"]
    result["ratios"] = {}
    for name, fig, top, bottom, _ in RATIOS:
        if top in entries and bottom in entries:
            a, b = figure(entries[top], fig), figure(entries[bottom], fig)
            if a is not None and b:
                result["ratios"][name] = a / b
    return result


def _ratio(entries, name, fig, reference):
    if reference not in entries:
        return "–"
    a, b = figure(entries[name], fig), figure(entries[reference], fig)
    return "–" if a is None or not b else f"{a / b:.2f}"


def _mib(value):
    return "–" if value is None else f"{value / 2**20:,.0f} MiB"


def markdown(llm):
    """The LLM results of one backend as Markdown.

    Args:
        llm: what `llm.run` returned (`result["llm"]` in the JSON).

    Example:

    >>> entries = {
    ...     "full": {"label": "full fine-tuning", "targets": None,
    ...              "time": {"median_ms": 20.0}, "first_step_s": 3.0,
    ...              "peak_rss_bytes": 2**31, "rss_start_bytes": 2**30,
    ...              "trainable_params": 1000, "optimizer_state_bytes": 8000},
    ...     "floor": {"label": "floor", "targets": None,
    ...               "time": {"median_ms": 10.0}, "first_step_s": 2.0,
    ...               "trainable_params": 8, "optimizer_state_bytes": 64}}
    >>> llm = add_ratios({"title": "toy", "entries": entries,
    ...                   "dtype": {"note": "float32 (asked for)"},
    ...                   "settings": {"memory": "off", "memory_steps": 2,
    ...                                "steps": 1}})
    >>> print(markdown(llm))  # doctest: +NORMALIZE_WHITESPACE
    **LLM fine-tuning** (toy); compute: float32 (asked for)
    <BLANKLINE>
    | case | what | targets | step | / floor | first step | peak memory | / full | trainable params | optimizer state |
    | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |
    | `full` | full fine-tuning | – | 20.0 ms | 2.00 | 3.0 s | 2,048 MiB (+1,024) | 1.00 | 1,000 | 0.008 MiB |
    | `floor` | floor | – | 10.0 ms | 1.00 | 2.0 s | – | – | 8 | 0.000 MiB |
    <BLANKLINE>
    | ratio | measured |
    | --- | --- |
    <BLANKLINE>
    Step: median of the interleaved timed steps. First step: the first `train_on_batch` (tracing, compilation and one step). Memory: not measured.
    <BLANKLINE>
    """
    entries = llm["entries"]
    out = [f"**LLM fine-tuning** ({llm['title']}); compute: "
           f"{llm['dtype']['note']}", "",
           "| case | what | targets | step | / floor | first step | "
           "peak memory | / full | trainable params | optimizer state |",
           "| --- | --- | --- |" + " ---: |" * 7]
    for name, r in entries.items():
        step, first, memory = (figure(r, f) for f in ("step", "first",
                                                      "memory"))
        cell = _mib(memory)
        added = figure(r, "added_memory")
        if memory is not None and added is not None and not r.get(
                "device_peak_bytes"):
            cell += f" (+{added / 2**20:,.0f})"
        out.append(
            f"| `{name}` | {r['label']} | {TARGETS.get(r['targets'])} | "
            + ("–" if step is None else f"{step:,.1f} ms")
            + f" | {_ratio(entries, name, 'step', 'floor')} | "
            + ("–" if first is None else f"{first:,.1f} s")
            + f" | {cell} | {_ratio(entries, name, 'memory', 'full')} | "
            f"{r['trainable_params']:,} | "
            f"{r['optimizer_state_bytes'] / 2**20:,.3f} MiB |")
    out += ["", "| ratio | measured |", "| --- | --- |"]
    for name, _, _, _, text in RATIOS:
        if name in llm["ratios"]:
            out.append(f"| {text} | {llm['ratios'][name]:.2f} |")
    settings = llm["settings"]
    timed = max(settings["steps"], settings["memory_steps"])
    memory = {
        "subprocess": f"peak RSS over those {timed} steps (the device's peak "
        "where the backend reports one), in the first pass; in parentheses, "
        "above the process's RSS before the model was built",
        "inprocess": "in this process, after every case was built (not per "
        "case)",
        "off": "not measured",
    }[settings["memory"]]
    if settings.get("timing") == "process":
        step = (f"median of {timed} steps after warm-up of each case alone in "
                f"a fresh process, {settings['rounds']} passes over the cases "
                "(order rotating). First step: the first `train_on_batch` of "
                "the first pass (tracing, compilation and one step)")
    else:
        step = ("median of the interleaved timed steps. First step: the first "
                "`train_on_batch` (tracing, compilation and one step)")
    out += ["", f"Step: {step}. Memory: {memory}.", ""]
    return "\n".join(out)


def across_backends(results):
    """One Markdown table of every LLM ratio, a column per backend.

    Args:
        results: the benchmark's per-backend results (dicts with `meta` and,
            where the LLM workload ran, `llm`).

    Example:

    >>> llm = add_ratios({"dtype": {"compute": "bfloat16"}, "entries": {
    ...     "lowrank_qv": {"time": {"median_ms": 12.0}},
    ...     "floor": {"time": {"median_ms": 10.0}}}})
    >>> print(across_backends([{"meta": {"backend": "jax"}, "llm": llm}]))
    | ratio | jax |
    | --- | --- |
    | compute dtype | bfloat16 |
    | LoRA query/value step / floor | 1.20 |
    <BLANKLINE>
    """
    results = [r for r in results if r.get("llm")]
    lines = ["| ratio | " + " | ".join(r["meta"]["backend"] for r in results)
             + " |", "|" + " --- |" * (1 + len(results)),
             "| compute dtype | " + " | ".join(
                 r["llm"]["dtype"]["compute"] for r in results) + " |"]
    for name, _, _, _, text in RATIOS:
        cells = [r["llm"]["ratios"].get(name) for r in results]
        if any(c is not None for c in cells):
            lines.append(f"| {text} | " + " | ".join(
                "–" if c is None else f"{c:.2f}" for c in cells) + " |")
    return "\n".join(lines) + "\n"
