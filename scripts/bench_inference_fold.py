"""A/B: unmerged inference with and without folding LoRA into the kernel.

    KERAS_BACKEND=torch python scripts/bench_inference_fold.py [rounds]

Builds five MiniLM classifiers (`keras-lowrank bench`'s workload, batch
8 x 128): the base model, and four copies adapted on every linear layer at
r = 8 with non-zero `B`: one as shipped (an inference call computes
`x·(W + s·A·B)` when `N·(d + k) >= c·d·k` for its N rows, `c` from
`forward.FOLD_THRESHOLDS`), one folding every layer (`c = 0` while it
runs), one with the fold switched off per layer (`_folds_in_inference =
False`: the side path `x·W + s·(x·A)·B`), and one merged
(`keras_lowrank.merge`: the same computation as the base, so its ratio
shows how fair the base's figure is). `predict_on_batch` runs interleaved,
the order rotating between rounds; prints medians and ratios to the base
model.
"""

import statistics
import sys
import time

import keras

import keras_lowrank
from keras_lowrank.bench import cases
from keras_lowrank.bench import workloads as wl
from keras_lowrank.layers import forward
from keras_lowrank.layers.base import LowRankLayer

spec = wl.minilm_spec(8, 128)
workload = wl.make_workload(spec)
models = {"base": workload.build()}
for name in ("shipped", "fold", "side", "merged"):
    m = workload.build()
    cases.get("unmerged").prepare(m, workload, "all_linear", 8)
    models[name] = m
keras_lowrank.merge(models["merged"])
for layer in models["side"]._flatten_layers():
    if isinstance(layer, LowRankLayer):
        layer._folds_in_inference = False
x = workload.batch()[0]


def run(model):
    thresholds = dict(forward.FOLD_THRESHOLDS)
    if model is models["fold"]:  # every layer folds
        forward.FOLD_THRESHOLDS[keras.backend.backend()] = 0.0
    try:
        start = time.perf_counter()
        model.predict_on_batch(x)
        return (time.perf_counter() - start) * 1e3
    finally:
        forward.FOLD_THRESHOLDS.clear()
        forward.FOLD_THRESHOLDS.update(thresholds)


for m in models.values():
    run(m); run(m)
times = {k: [] for k in models}
names = list(models)
for r in range(int(sys.argv[1]) if len(sys.argv) > 1 else 10):
    for k in names[r % len(names):] + names[:r % len(names)]:
        times[k].append(run(models[k]))
b = statistics.median(times["base"])
print(keras.backend.backend(), {k: f"{statistics.median(v):.1f} ms ({statistics.median(v)/b:.2f}x)" for k, v in times.items()}, flush=True)
