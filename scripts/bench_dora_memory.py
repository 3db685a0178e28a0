"""Benchmark: DoRA's training memory next to LoRA's, on one wide layer.

    python scripts/bench_dora_memory.py [--backends jax torch] [--dim 4096] [--tokens 64]

DoRA's output is `m ⊙ (W + s·A·B) / ‖W + s·A·B‖`. A straightforward
implementation forms `W' = W + s·A·B` (d×k) in every training step and keeps
it, and its gradient, for the backward pass; `keras_lowrank` computes the
output as `(m/‖·‖ − 1)·(x·W) + (m/‖·‖)·s·(x·A)·B` and the norm from `Wᵀ·A`
and `Aᵀ·A`, so no d×k temporary exists. This script measures, for one
`Dense(d → d)` layer with a batch of `tokens` rows (d×k = 64 MiB at 4096):

- plain LoRA (`keras_lowrank.adapt`, rank 8);
- DoRA (`keras_lowrank.adapt(method="dora")`);
- a reference DoRA that forms `W + s·A·B` (the formula written directly in
  `keras.ops`, the same math PEFT's DoRA layer uses in training).

For each: the bytes the forward pass keeps for the backward pass (JAX: the
loss VJP's residuals; torch: the tensors autograd saves; weights excluded,
as in `bench_remat.py`), the peak resident memory of the training steps in
a fresh process per case (`VmHWM` after a reset, like `keras-lowrank
bench`) and the median `train_on_batch` step time (the three cases built in
one process and timed interleaved). TensorFlow has no saved-tensor hook, so
it reports RSS and time only.
"""

import argparse
import ctypes
import json
import os
import statistics
import sys
import time

import keras
import numpy as np

import keras_lowrank

# The sibling script's child-process runner and saved-tensor counters.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_remat  # noqa: E402

RANK = 8
CASES = ("lora", "dora", "dora_forming_w")


class FormingDoRA(keras.layers.Layer):
    """DoRA written directly: forms `W + s·A·B` every step (the reference
    this benchmark compares against, not something to use)."""

    def __init__(self, kernel, rank, **kwargs):
        super().__init__(**kwargs)
        self.kernel_value = kernel
        self.rank = rank

    def build(self, input_shape):
        d, k = self.kernel_value.shape
        self.kernel = self.add_weight(
            shape=(d, k), initializer="zeros", trainable=False, name="kernel")
        self.kernel.assign(self.kernel_value)
        self.a = self.add_weight(shape=(d, self.rank), name="A",
                                 initializer="he_uniform")
        self.b = self.add_weight(shape=(self.rank, k), name="B",
                                 initializer="zeros")
        self.magnitude = self.add_weight(shape=(k,), name="magnitude",
                                         initializer="ones")
        self.magnitude.assign(np.linalg.norm(self.kernel_value, axis=0))

    def call(self, x):
        ops = keras.ops
        w = self.kernel + ops.matmul(self.a, self.b)  # the d×k temporary
        norm = ops.stop_gradient(ops.sqrt(ops.sum(ops.square(w), axis=0)))
        return ops.matmul(x, w * (self.magnitude / norm))


def build(case, dim, seed=0):
    rng = np.random.default_rng(seed)
    kernel = (rng.standard_normal((dim, dim)) / np.sqrt(dim)).astype("float32")
    if case == "dora_forming_w":
        layer = FormingDoRA(kernel, RANK, name="wide")
    else:
        layer = keras.layers.Dense(dim, use_bias=False, name="wide")
    model = keras.Sequential([keras.Input((dim,)), layer])
    if case != "dora_forming_w":
        layer.kernel.assign(kernel)
        keras_lowrank.adapt(model, rank=RANK, targets=["wide"],
                            method="dora" if case == "dora" else "lora")
    # Non-zero B, so every path does real work.
    for variable in model.trainable_variables:
        if "B" in variable.name:
            variable.assign(rng.normal(0, 0.01, variable.shape).astype("float32"))
    model.compile(optimizer=keras.optimizers.SGD(1e-3), loss="mse")
    return model


def saved_bytes(model, x, y):
    backend = keras.backend.backend()
    if backend not in ("jax", "torch"):
        return None
    if backend == "jax":
        return bench_remat._jax_saved_bytes(model, x, y)
    return bench_remat._torch_saved_bytes(model, x, y)


def _reset_peak():
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def _data(dim, tokens):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((tokens, dim)).astype("float32")
    y = rng.standard_normal((tokens, dim)).astype("float32")
    return x, y


def measure_memory(case, dim, tokens):
    """Peak RSS of one training step and the bytes kept for backward, for
    one case alone in this (fresh) process."""
    x, y = _data(dim, tokens)
    model = build(case, dim)
    for _ in range(2):  # compile / warm up
        model.train_on_batch(x, y)
    peak = None
    if _reset_peak():
        model.train_on_batch(x, y)
        peak = _peak_rss()
    return {"case": case, "saved_bytes": saved_bytes(model, x, y),
            "peak_rss_bytes": peak}


def measure_times(dim, tokens, rounds):
    """Median step time of every case, built in one process and run
    interleaved (a slow moment hits every case alike)."""
    x, y = _data(dim, tokens)
    models = {case: build(case, dim) for case in CASES}
    for model in models.values():
        for _ in range(2):
            model.train_on_batch(x, y)
    times = {case: [] for case in CASES}
    for _ in range(rounds):
        for case, model in models.items():
            start = time.perf_counter()
            model.train_on_batch(x, y)
            times[case].append((time.perf_counter() - start) * 1e3)
    return {case: statistics.median(t) for case, t in times.items()}


def run(backend, child, dim, tokens, steps):
    return bench_remat.run_child(
        __file__, backend,
        [child, "--dim", str(dim), "--tokens", str(tokens), "--steps", str(steps)],
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", nargs="+",
                        default=["jax", "torch", "tensorflow"])
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20,
                        help="interleaved timing rounds")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child == "times":
        row = measure_times(args.dim, args.tokens, args.steps)
        print("ROW " + json.dumps(row), flush=True)
        return
    if args.child:
        row = measure_memory(args.child, args.dim, args.tokens)
        print("ROW " + json.dumps(row), flush=True)
        return
    mib = 2**20
    print(f"Dense {args.dim} -> {args.dim} (d x k = "
          f"{args.dim * args.dim * 4 / mib:.0f} MiB float32), rank {RANK}, "
          f"batch {args.tokens} rows")
    print()
    print("| backend | case | kept for backward | peak RSS of a step |"
          " step time | x LoRA step |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for backend in args.backends:
        rows = [run(backend, case, args.dim, args.tokens, args.steps)
                for case in CASES]
        times = run(backend, "times", args.dim, args.tokens, args.steps)
        lora_ms = times["lora"]
        for row in rows:
            row["step_ms"] = times[row["case"]]
            kept = ("–" if row["saved_bytes"] is None
                    else f"{row['saved_bytes'] / mib:.2f} MiB")
            peak = ("–" if row["peak_rss_bytes"] is None
                    else f"{row['peak_rss_bytes'] / mib:,.0f} MiB")
            print(f"| {backend} | {row['case']} | {kept} | {peak}"
                  f" | {row['step_ms']:.1f} ms"
                  f" | {row['step_ms'] / lora_ms:.2f} |", flush=True)


if __name__ == "__main__":
    main()
