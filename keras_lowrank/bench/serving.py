"""The serving benchmark (`keras-lowrank bench --workloads serving`): many
adapters on one base model, switched between calls or mixed within a batch.

Two parts, each measured in one process, its entries timed **interleaved**
(every round runs each entry `steps` times, the order rotating between
rounds; figures are medians), so only ratios are compared:

- `classifier`: the pretrained MiniLM classifier (`workloads.minilm_spec`)
  with `adapters` LoRA adapters (all linear layers, `trainable=[]`), one
  batch of `batch_size` rows. `predict_on_batch` of the whole batch with one
  adapter (`single`, unstacked; `single_stacked`), with a different adapter
  per row (`mixed`: `per_example_adapters` on the stacked model), and the
  loop a server does without mixed batches: for each adapter `set_adapter`
  and `predict_on_batch` of its rows (`loop_stacked`; `loop_unstacked`,
  whose compiled functions come back from `state.compiled`'s cache; and
  `loop_unstacked_cold`, whose every switch traces again, as when the
  functions are not cached: more adapters than the cache holds, or a
  release without that cache).
- `generate`: a small random KerasHub `Llama3CausalLM`, greedy `generate`:
  `set_adapter(other)` + the first `generate` after it, stacked against
  unstacked (cached and cold), against a steady-state `generate`, and a
  mixed-adapter `generate`.

Each part also checks its own results: stacked and mixed rows against each
adapter run alone (`checks`).
"""

import itertools

import numpy as np

import keras_lowrank
from keras_lowrank import keras_private
from keras_lowrank.bench import measure
from keras_lowrank.bench import workloads as wl
from keras_lowrank.state import compiled

PARTS = ("classifier", "generate")

DESCRIPTIONS = {
    "single": "one adapter for every row (unstacked)",
    "single_stacked": "one adapter for every row (stacked)",
    "mixed": "stacked, `per_example_adapters`, adapters cycling over rows",
    "loop_stacked": "stacked; per adapter: `set_adapter` + its rows",
    "loop_unstacked": "unstacked; per adapter: `set_adapter` + its rows "
                      "(compiled functions cached)",
    "loop_unstacked_cold": "unstacked, the same loop, every switch traces "
                           "again (no cached functions)",
    "steady_unstacked": "`generate`, no switch (unstacked)",
    "steady_stacked": "`generate`, no switch (stacked)",
    "switch_stacked": "`set_adapter(other)` + `generate` (stacked)",
    "switch_unstacked": "`set_adapter(other)` + `generate` (unstacked, "
                        "compiled function cached)",
    "switch_unstacked_cold": "`set_adapter(other)` + `generate` (unstacked, "
                             "traces again)",
    "mixed_stacked": "`generate` with `per_example_adapters` (stacked)",
}

# (ratio name, numerator entry, denominator entry, goal, "min"/"max", text):
# ratio = time(numerator) / time(denominator).
RATIOS = {
    "classifier": (
        ("mixed_throughput_vs_single", "single", "mixed", 0.8, "min",
         "mixed-batch throughput / single-adapter throughput"),
        ("mixed_throughput_vs_single_stacked", "single_stacked", "mixed",
         None, "min", "mixed / single adapter, both stacked"),
        ("mixed_speedup_vs_loop_unstacked", "loop_unstacked", "mixed", 3.0,
         "min", "loop (unstacked, cached) time / mixed time"),
        ("mixed_speedup_vs_loop_unstacked_cold", "loop_unstacked_cold",
         "mixed", 3.0, "min", "loop (unstacked, traces) time / mixed time"),
        ("mixed_speedup_vs_loop_stacked", "loop_stacked", "mixed", None,
         "min", "loop (stacked) time / mixed time"),
    ),
    "generate": (
        ("switch_stacked_vs_steady", "switch_stacked", "steady_stacked",
         None, "max", "switch + generate / steady generate (stacked)"),
        ("switch_unstacked_vs_steady", "switch_unstacked", "steady_unstacked",
         None, "max", "switch + generate / steady generate (unstacked, "
         "cached)"),
        ("cold_switch_vs_stacked_switch", "switch_unstacked_cold",
         "switch_stacked", None, "min", "unstacked switch that traces / "
         "stacked switch"),
        ("stacked_vs_unstacked_steady", "steady_stacked", "steady_unstacked",
         None, "max", "steady generate, stacked / unstacked"),
        ("mixed_vs_steady", "mixed_stacked", "steady_unstacked", None,
         "max", "mixed-adapter generate / single-adapter generate"),
    ),
}

LLAMA = {"vocabulary_size": 1000, "num_layers": 2, "num_query_heads": 4,
         "num_key_value_heads": 2, "hidden_dim": 128,
         "intermediate_dim": 256}
LLAMA_TINY = {"vocabulary_size": 128, "num_layers": 1, "num_query_heads": 2,
              "num_key_value_heads": 1, "hidden_dim": 32,
              "intermediate_dim": 64}


def run(tiny=False, adapters=None, rank=None, batch_size=None,
        sequence_length=None, rounds=2, steps=1, warmup=1, parts=PARTS,
        log=None):
    """Measures the serving parts on the current backend.

    Args:
        tiny: a synthetic one-layer BERT and a tiny Llama (seconds, tests)
            instead of the pretrained MiniLM and the small Llama.
        adapters: adapters per model (default 8; tiny 2).
        rank: their rank (default 8; tiny 2).
        batch_size: classifier batch rows (default 64; tiny 4).
        sequence_length: classifier tokens per row (default 128; tiny 8).
        rounds: interleaved rounds.
        steps: timed calls per entry per round (1 for the entries that
            trace on every call).
        warmup: untimed calls per entry before timing (the first traces).
        parts: a subset of `PARTS`.
        log: `print`-like progress function, or None.

    Returns:
        `{part: {"title", "times", "rows", "ratios", "goals", "checks"}}`;
        `times[entry]` is `measure.summarize`'s dict, `ratios[name]` a float.

    Example:

    >>> from keras_lowrank.bench import serving
    >>> result = serving.run(tiny=True, rounds=1, warmup=0,
    ...                      parts=("classifier",))
    >>> sorted(result["classifier"]["times"])  # doctest: +NORMALIZE_WHITESPACE
    ['loop_stacked', 'loop_unstacked', 'loop_unstacked_cold', 'mixed',
     'single', 'single_stacked']
    >>> result["classifier"]["checks"]["mixed_vs_adapters_max_abs"] < 1e-4
    True
    """
    log = log or (lambda *a: None)
    options = {
        "tiny": tiny,
        "adapters": adapters or (2 if tiny else 8),
        "rank": rank or (2 if tiny else 8),
        "batch_size": batch_size or (4 if tiny else 64),
        "sequence_length": sequence_length or (8 if tiny else 128),
        "rounds": rounds, "steps": steps, "warmup": warmup,
    }
    result = {}
    for part in parts:
        measure_part = {"classifier": _classifier, "generate": _generate}
        result[part] = measure_part[part](options, log)
        result[part]["settings"] = dict(options)
        _add_ratios(part, result[part])
    return result


# --- the parts ------------------------------------------------------------


def _classifier(o, log):
    if o["tiny"]:
        spec = wl.synthetic_spec(16, 1, o["batch_size"], o["sequence_length"])
    else:
        spec = wl.minilm_spec(o["batch_size"], o["sequence_length"])
    workload = wl.make_workload(spec)
    names = [f"adapter_{i}" for i in range(o["adapters"])]

    def build():
        model = workload.build()
        paths = [l.path for l in workload.target_layers(model, "all_linear")]
        return _adapt(model, names, o["rank"], paths, std=0.01)

    unstacked, cold = build(), build()
    stacked = keras_lowrank.stack_adapters(build())
    log(f"[serving: classifier] {workload.describe()}, {len(names)} adapters")
    x, _ = workload.batch()
    rows = [names[i % len(names)] for i in range(o["batch_size"])]
    groups = [(n, np.array([i for i, r in enumerate(rows) if r == n]))
              for n in names]
    groups = [(n, idx, {k: v[idx] for k, v in x.items()})
              for n, idx in groups if len(idx)]

    def use(model, name):
        return lambda: keras_lowrank.set_adapter(model, name)

    def predict(model):
        return lambda: model.predict_on_batch(x)

    def mixed():
        with keras_lowrank.per_example_adapters(stacked, rows):
            return stacked.predict_on_batch(x)

    def loop(model, forget=False):
        def step():
            out = np.zeros((len(rows),) + _logits_shape(model), "float32")
            for name, idx, part in groups:
                if forget:
                    compiled.forget(model)
                keras_lowrank.set_adapter(model, name)
                out[idx] = np.asarray(model.predict_on_batch(part))
            return out
        return step

    entries = [
        _entry("single", predict(unstacked), enter=use(unstacked, names[0])),
        _entry("single_stacked", predict(stacked), enter=use(stacked, names[0])),
        _entry("mixed", mixed),
        _entry("loop_stacked", loop(stacked)),
        _entry("loop_unstacked", loop(unstacked)),
        _entry("loop_unstacked_cold", loop(cold, forget=True), cold=True),
    ]
    _warm_up(entries, o, log)
    per_adapter = loop(unstacked)()
    single = {}
    for name in names[:2]:
        keras_lowrank.set_adapter(unstacked, name)
        single[name] = np.asarray(unstacked.predict_on_batch(x))
    checks = {
        "mixed_vs_adapters_max_abs": _max_abs(mixed(), per_adapter),
        "loop_stacked_vs_unstacked_max_abs": _max_abs(
            loop(stacked)(), per_adapter),
        "adapters_differ_max_abs": _max_abs(*single.values()) if len(
            single) > 1 else 0.0,
    }
    times = _interleave(entries, o, log)
    return {
        "title": f"{workload.describe()}; {len(names)} adapters (LoRA "
                 f"r={o['rank']}, all linear), `predict_on_batch`",
        "times": times,
        "rows": {e["name"]: o["batch_size"] for e in entries},
        "checks": checks,
    }


def _generate(o, log):
    import keras
    import keras_hub

    config = LLAMA_TINY if o["tiny"] else LLAMA
    batch, prompt, length = (2, 4, 8) if o["tiny"] else (8, 16, 48)
    names = [f"adapter_{i}" for i in range(max(2, min(o["adapters"], 4)))]

    def build():
        keras.utils.set_random_seed(0)
        backbone = keras_hub.models.Llama3Backbone(**config)
        model = keras_hub.models.Llama3CausalLM(backbone=backbone,
                                                preprocessor=None)
        model = _adapt(model, names, o["rank"], "all-linear", std=0.1)
        model.compile(sampler="greedy")
        return model

    unstacked, cold = build(), build()
    stacked = keras_lowrank.stack_adapters(build())
    log(f"[serving: generate] random Llama3 {config}, {len(names)} adapters")
    rng = np.random.default_rng(0)
    tokens = np.zeros((batch, length), "int32")
    tokens[:, :prompt] = rng.integers(1, config["vocabulary_size"],
                                      (batch, prompt))
    mask = np.zeros((batch, length), "bool")
    mask[:, :prompt] = True
    inputs = {"token_ids": tokens, "padding_mask": mask}
    rows = [names[i % len(names)] for i in range(batch)]

    def generate(model):
        out = model.generate(inputs, stop_token_ids=None)
        return np.asarray(out["token_ids"])

    def switch(model, forget=False):
        order = itertools.cycle(names)

        def step():
            if forget:
                compiled.forget(model)
            keras_lowrank.set_adapter(model, next(order))
            return generate(model)
        return step

    def mixed():
        with keras_lowrank.per_example_adapters(stacked, rows):
            return generate(stacked)

    entries = [
        _entry("steady_unstacked", lambda: generate(unstacked)),
        _entry("steady_stacked", lambda: generate(stacked)),
        _entry("switch_stacked", switch(stacked)),
        _entry("switch_unstacked", switch(unstacked)),
        _entry("switch_unstacked_cold", switch(cold, forget=True), cold=True),
        _entry("mixed_stacked", mixed),
    ]
    for name in names:  # every adapter's functions traced before timing
        keras_lowrank.set_adapter(unstacked, name)
        generate(unstacked)
    _warm_up(entries, o, log)
    alone = {}
    for name in names:
        keras_lowrank.set_adapter(unstacked, name)
        alone[name] = generate(unstacked)
    stacked_out = {}
    for name in names:
        keras_lowrank.set_adapter(stacked, name)
        stacked_out[name] = generate(stacked)
    expected = np.stack([alone[r][i] for i, r in enumerate(rows)])
    checks = {
        "stacked_vs_unstacked_tokens_differing": int(sum(
            (stacked_out[n] != alone[n]).sum() for n in names)),
        "mixed_vs_adapters_tokens_differing": int((mixed() != expected).sum()),
        "adapters_differ_tokens": int((alone[names[0]] != alone[names[1]])
                                      .sum()),
    }
    times = _interleave(entries, o, log)
    return {
        "title": f"random Llama3CausalLM (d={config['hidden_dim']}, "
                 f"{config['num_layers']} layers), {len(names)} adapters "
                 f"(LoRA r={o['rank']}, all linear), greedy `generate` of "
                 f"batch {batch}: {prompt} prompt + {length - prompt} new tokens",
        "times": times,
        "rows": {e["name"]: batch for e in entries},
        "checks": checks,
    }


# --- helpers ------------------------------------------------------------------


def _adapt(model, names, rank, targets, std):
    """`model` with one LoRA adapter per name; each `B` drawn from
    N(0, std) (a fresh adapter's `B` is zero: all would equal the base)."""
    for index, name in enumerate(names):
        keras_lowrank.adapt(model, rank=rank, targets=targets, name=name,
                            init="gaussian", trainable=[], seed=index)
    rng = np.random.default_rng(0)
    for layer in keras_private.all_sublayers(model):
        for name in getattr(layer, "adapter_names", ()):
            b = layer.adapter_variables(name)["B"]
            b.assign(rng.normal(0.0, std, tuple(b.shape)).astype("float32"))
    keras_lowrank.set_adapter(model, names[0])
    return model


def _logits_shape(model):
    return tuple(model.outputs[0].shape[1:])


def _max_abs(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def _entry(name, step, enter=None, cold=False):
    return {"name": name, "step": step, "enter": enter, "cold": cold}


def _warm_up(entries, o, log):
    # At least one call each: the first traces. A second pass, since the
    # first mixed batch adds a variable to the stacks, so the functions of a
    # stacked model traced before it are traced once more. Cold entries
    # trace on every call: nothing to warm up.
    for count in (max(o["warmup"], 1), 1):
        for entry in entries:
            if entry["enter"]:
                entry["enter"]()
            for _ in range(0 if entry["cold"] else count):
                entry["step"]()
    log(f"  warmed up {', '.join(e['name'] for e in entries)}")


def _interleave(entries, o, log):
    times = {entry["name"]: [] for entry in entries}
    for round_index in range(o["rounds"]):
        shift = round_index % len(entries)
        for entry in entries[shift:] + entries[:shift]:
            if entry["enter"]:
                entry["enter"]()
            count = 1 if entry["cold"] else o["steps"]
            times[entry["name"]].extend(measure.time_calls(entry["step"], count))
        log(f"  round {round_index + 1}/{o['rounds']} done")
    return {name: measure.summarize(t) for name, t in times.items()}


def _add_ratios(part, result):
    ms = {name: t["median_ms"] for name, t in result["times"].items()}
    result["ratios"], result["goals"] = {}, {}
    for name, top, bottom, goal, sense, _ in RATIOS[part]:
        if top in ms and bottom in ms and ms[bottom]:
            result["ratios"][name] = ms[top] / ms[bottom]
            result["goals"][name] = None if goal is None else [sense, goal]


# --- report ---------------------------------------------------------------------


def markdown(serving):
    """The serving results of one backend as Markdown tables.

    Args:
        serving: what `run` returned (`result["serving"]` in the benchmark's
            JSON); parts and entries that are missing are left out.

    Example:

    >>> times = {"single": {"median_ms": 20.0}, "mixed": {"median_ms": 25.0}}
    >>> part = {"title": "toy", "times": times, "rows": {"single": 64,
    ...         "mixed": 64}, "checks": {"mixed_vs_adapters_max_abs": 0.0}}
    >>> _add_ratios("classifier", part)
    >>> print(markdown({"classifier": part}))
    **Serving: classifier** (toy)
    <BLANKLINE>
    | entry | what | median | rows/s |
    | --- | --- | --- | --- |
    | `single` | one adapter for every row (unstacked) | 20.0 ms | 3,200 |
    | `mixed` | stacked, `per_example_adapters`, adapters cycling over rows | 25.0 ms | 2,560 |
    <BLANKLINE>
    | ratio | measured | goal |
    | --- | --- | --- |
    | mixed-batch throughput / single-adapter throughput | 0.80 | >= 0.8 ✓ |
    <BLANKLINE>
    Checks: mixed_vs_adapters_max_abs = 0
    <BLANKLINE>
    """
    out = []
    for part in PARTS:
        result = serving.get(part)
        if not result:
            continue
        out += [f"**Serving: {part}** ({result['title']})", "",
                "| entry | what | median | rows/s |", "| --- | --- | --- | --- |"]
        for name, t in result["times"].items():
            rate = 1000.0 * result["rows"][name] / t["median_ms"]
            out.append(f"| `{name}` | {DESCRIPTIONS[name]} | "
                       f"{t['median_ms']:.1f} ms | {rate:,.0f} |")
        out += ["", "| ratio | measured | goal |", "| --- | --- | --- |"]
        for name, _, _, _, _, text in RATIOS[part]:
            if name in result["ratios"]:
                out.append(f"| {text} | {result['ratios'][name]:.2f} | "
                           f"{_goal(result['goals'][name], result['ratios'][name])} |")
        checks = ", ".join(f"{k} = {v:.3g}" for k, v in result["checks"].items())
        out += ["", f"Checks: {checks}", ""]
    return "\n".join(out)


def across_backends(results):
    """One Markdown table of every serving ratio, a column per backend.

    Args:
        results: the benchmark's per-backend results (dicts with `meta` and,
            where the serving workload ran, `serving`).

    Example:

    >>> part = {"title": "toy", "rows": {"single": 8, "mixed": 8},
    ...         "times": {"single": {"median_ms": 9.0},
    ...                   "mixed": {"median_ms": 10.0}}}
    >>> _add_ratios("classifier", part)
    >>> print(across_backends([{"meta": {"backend": "jax"},
    ...                         "serving": {"classifier": part}}]))
    | ratio | jax |
    | --- | --- |
    | classifier: mixed-batch throughput / single-adapter throughput | 0.90 ✓ |
    <BLANKLINE>
    """
    results = [r for r in results if r.get("serving")]
    lines = ["| ratio | " + " | ".join(r["meta"]["backend"] for r in results)
             + " |", "|" + " --- |" * (1 + len(results))]
    for part in PARTS:
        for name, _, _, _, _, text in RATIOS[part]:
            cells = []
            for r in results:
                found = r["serving"].get(part, {})
                value = found.get("ratios", {}).get(name)
                goal = found.get("goals", {}).get(name)
                mark = "" if goal is None else " " + _goal(goal, value)[-1]
                cells.append("–" if value is None else f"{value:.2f}{mark}")
            if any(c != "–" for c in cells):
                lines.append(f"| {part}: {text} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _goal(goal, value):
    if goal is None:
        return "–"
    sense, bound = goal
    met = value >= bound if sense == "min" else value <= bound
    return f"{'>=' if sense == 'min' else '<='} {bound:g} {'✓' if met else '✗'}"
