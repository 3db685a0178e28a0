"""Benchmark: expert LoRA next to full fine-tuning of the experts on a MoE LM.

    python scripts/bench_moe.py [--backends jax tensorflow torch]
        [--rounds 4] [--steps 3] [--tiny] [--json OUT]

A random KerasHub `MixtralCausalLM` (built from a config, no download):
one decoder layer, but wide experts (8 experts, top-2, hidden 512, expert
intermediate 1024 by default), a small vocabulary and a batch of 4 x 128
tokens, so the expert banks dominate the step. KerasHub computes every
expert on every token (dense dispatch) and weights the outputs by the
routing, so all cases do the same forward work. Three cases:

- `full_experts`: the unadapted model, every layer frozen with plain Keras
  `trainable` flags except the expert banks (`MixtralMoeExperts`): the
  expert kernels `(E, d, k)` train, routers, attention, norms, embeddings
  and head do not;
- `lora_experts`: `keras_lowrank.adapt(model, targets=["experts"],
  rank=8, trainable=[])`: per-expert factors `A (E, d, r)`, `B (E, r, k)`
  on every expert kernel train, nothing else;
- `lora_experts_qv`: the same plus attention query/value
  (`targets=["experts", "query", "value"]`).

Per case: the median `train_on_batch` step (Adam, sparse categorical
cross-entropy; the cases built in one process and timed interleaved,
`--rounds` rounds of `--steps` steps each, the order rotating between
rounds, after two warm-up steps), the peak resident memory of
`--memory-steps` training steps in a fresh process per case (kernel
high-water mark after a reset, as `keras-lowrank bench` does; the device
peak too where there is a device), trainable parameters and the
optimizer's per-weight state. Ratios are to `full_experts`. Each backend
runs in its own processes (one for the timing, one per case for memory).
"""

import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))

CASES = ("full_experts", "lora_experts", "lora_experts_qv")
TARGETS = {
    "lora_experts": ["experts"],
    "lora_experts_qv": ["experts", "query", "value"],
}
RANK = 8
SIZES = {
    "full": dict(num_layers=1, hidden_dim=512, intermediate_dim=1024,
                 num_query_heads=8, num_key_value_heads=2, num_experts=8,
                 top_k=2, vocabulary_size=512, batch=4, seq=128),
    "tiny": dict(num_layers=1, hidden_dim=32, intermediate_dim=64,
                 num_query_heads=2, num_key_value_heads=1, num_experts=4,
                 top_k=2, vocabulary_size=64, batch=2, seq=16),
}


def build(case, sizes, seed=0):
    """The compiled model of one case (random weights, fixed seed)."""
    import keras
    import keras_hub

    import keras_lowrank

    keras.utils.set_random_seed(seed)
    shape = {k: v for k, v in sizes.items() if k not in ("batch", "seq")}
    backbone = keras_hub.models.MixtralBackbone(**shape)
    model = keras_hub.models.MixtralCausalLM(backbone, preprocessor=None)
    if case == "full_experts":
        freeze_all_but_experts(model)
    else:
        keras_lowrank.adapt(model, targets=TARGETS[case], rank=RANK,
                            trainable=[])
    model.compile(
        optimizer=keras.optimizers.Adam(1e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def freeze_all_but_experts(model):
    """Plain Keras: `trainable = False` on every leaf layer except the
    expert banks, so exactly the expert kernels train."""
    from keras_hub.src.models.mixtral.mixtral_decoder import MixtralMoeExperts

    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, MixtralMoeExperts):
            continue
        if not list(layer._flatten_layers(include_self=False)):
            layer.trainable = False
    experts = [
        id(v) for layer in model._flatten_layers()
        if isinstance(layer, MixtralMoeExperts) for v in layer.weights
    ]
    if sorted(id(v) for v in model.trainable_weights) != sorted(experts):
        raise RuntimeError("freezing left weights other than the expert "
                           "kernels trainable")


def data(sizes, seed=1):
    """One batch of random tokens; the labels are the tokens themselves."""
    rng = np.random.default_rng(seed)
    shape = (sizes["batch"], sizes["seq"])
    tokens = rng.integers(1, sizes["vocabulary_size"], shape).astype("int32")
    x = {"token_ids": tokens, "padding_mask": np.ones(shape, "int32")}
    return x, tokens


def measure_times(sizes, rounds, steps, warmup=2):
    """Child: every case built in this one process, timed interleaved."""
    from keras_lowrank.bench import measure

    x, y = data(sizes)
    models = {case: build(case, sizes) for case in CASES}
    for model in models.values():
        for _ in range(warmup):
            model.train_on_batch(x, y)
    times = {case: [] for case in CASES}
    order = list(CASES)
    for r in range(rounds):
        for case in order[r % len(order):] + order[:r % len(order)]:
            model = models[case]
            times[case] += measure.time_calls(
                lambda m=model: m.train_on_batch(x, y), steps)
    return {case: measure.summarize(t) for case, t in times.items()}


def measure_memory(case, sizes, memory_steps, warmup=2):
    """Child: one case alone in this fresh process."""
    import keras

    from keras_lowrank.bench import measure

    x, y = data(sizes)
    model = build(case, sizes)
    for _ in range(warmup):
        model.train_on_batch(x, y)
    measure.release_free_memory()
    resident = measure.rss_bytes()
    if measure.accelerator():
        measure.reset_device_peak()
    peak = measure.PeakRSS()
    peak.start()
    for _ in range(memory_steps):
        model.train_on_batch(x, y)
    trainable = model.trainable_weights
    return {
        "case": case,
        "backend": keras.backend.backend(),
        "rss_before_bytes": resident,
        "peak_rss_bytes": peak.peak(),
        "peak_method": peak.method,
        "device_peak_bytes": (measure.device_peak_bytes()
                              if measure.accelerator() else None),
        "trainable_params": measure.count_params(trainable),
        "total_params": measure.count_params(model.weights),
        "optimizer_state_bytes": measure.optimizer_state_bytes(
            model.optimizer),
        "trainable_paths": sorted(v.path for v in trainable),
    }


def _child_args(child, args):
    out = [child, "--rounds", str(args.rounds), "--steps", str(args.steps),
           "--memory-steps", str(args.memory_steps)]
    return out + (["--tiny"] if args.tiny else [])


def run_child(backend, child_args):
    """Runs `bench_moe.py --child ...` in a fresh process on `backend` and
    returns its row (`bench_remat.py`'s runner)."""
    sys.path.insert(0, HERE)
    import bench_remat

    return bench_remat.run_child(__file__, backend, child_args)


def run_backend(backend, args):
    """The rows of one backend: one process per case for memory, then one
    timing process with every case."""
    rows = {}
    for case in CASES:
        rows[case] = run_child(backend, _child_args(case, args))
    times = run_child(backend, _child_args("times", args))
    for case in CASES:
        rows[case].update(times[case])
    full = rows["full_experts"]
    for row in rows.values():
        row["step_ratio"] = row["median_ms"] / full["median_ms"]
        row["peak_ratio"] = row["peak_rss_bytes"] / full["peak_rss_bytes"]
    return [rows[case] for case in CASES]


def _mib(n):
    return "–" if n is None else f"{n / 2**20:,.1f} MiB"


def table(rows):
    """The markdown table of all rows (a device-peak column only when some
    row has a device figure)."""
    device = any(r.get("device_peak_bytes") is not None for r in rows)
    head = ["backend", "case", "trainable params", "optimizer state",
            "step (median)", "step q1–q3", "x full step",
            "peak RSS of a step", "x full peak"]
    if device:
        head.append("device peak")
    lines = ["| " + " | ".join(head) + " |",
             "| --- | --- |" + " ---: |" * (len(head) - 2)]
    for r in rows:
        cells = [r["backend"], r["case"], f"{r['trainable_params']:,}",
                 _mib(r["optimizer_state_bytes"]),
                 f"{r['median_ms']:,.1f} ms",
                 f"{r['q1_ms']:,.0f}–{r['q3_ms']:,.0f} ms",
                 f"{r['step_ratio']:.2f}", _mib(r["peak_rss_bytes"]),
                 f"{r['peak_ratio']:.2f}"]
        if device:
            cells.append(_mib(r.get("device_peak_bytes")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe(sizes):
    s = sizes
    layers = "layer" if s["num_layers"] == 1 else "layers"
    return (f"MixtralCausalLM, random weights: {s['num_layers']} decoder "
            f"{layers}, hidden {s['hidden_dim']}, {s['num_experts']} experts "
            f"(top-{s['top_k']}) of intermediate {s['intermediate_dim']}, "
            f"{s['num_query_heads']} query / {s['num_key_value_heads']} KV "
            f"heads, vocabulary {s['vocabulary_size']}; batch {s['batch']} x "
            f"{s['seq']} tokens; LoRA rank {RANK}; Adam")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", nargs="+",
                        default=["jax", "tensorflow", "torch"])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--memory-steps", type=int, default=2)
    parser.add_argument("--tiny", action="store_true",
                        help="seconds-fast sizes (what the test runs)")
    parser.add_argument("--json", help="write the rows to this JSON file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = SIZES["tiny" if args.tiny else "full"]
    if args.child == "times":
        row = measure_times(sizes, args.rounds, args.steps)
    elif args.child:
        row = measure_memory(args.child, sizes, args.memory_steps)
    if args.child:
        print("ROW " + json.dumps(row), flush=True)
        return
    rows = []
    for backend in args.backends:
        rows += run_backend(backend, args)
    from keras_lowrank.bench import measure

    print(describe(sizes))
    print(f"{args.rounds} rounds x {args.steps} steps, interleaved; "
          f"{measure.machine()['cores']} CPU cores")
    print()
    print(table(rows))
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"sizes": sizes, "machine": measure.machine(),
                       "rounds": args.rounds, "steps": args.steps,
                       "rows": rows}, out, indent=1)


if __name__ == "__main__":
    main()
