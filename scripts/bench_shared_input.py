"""A/B: sibling adapters sharing one `x·[s₁A₁|s₂A₂|…]` product or not.

    KERAS_BACKEND=jax python scripts/bench_shared_input.py [rounds]

Builds `keras-lowrank bench`'s MiniLM workload (batch 8 x 128) four times:
the floor (backprop without weight gradients), LoRA r = 8 on every linear
layer as shipped (query/key/value share one product,
`keras_lowrank.layers.shared_input`), the same with the groups switched
off (every side path alone, as before), and Keras's `enable_lora`. Times
`train_on_batch` interleaved, rotating the order each round; prints medians,
ratios to the floor, and fused / plain.
"""

import statistics
import sys
import time

import keras

from keras_lowrank.bench import runner
from keras_lowrank.bench import workloads as wl
from keras_lowrank.layers import shared_input

workload = wl.make_workload(wl.minilm_spec(8, 128))
steps = {}
_, steps["floor"] = runner.prepare(workload, runner.entry("floor"))
_, steps["fused"] = runner.prepare(workload, runner.entry("lowrank", "all_linear", 8))
formed = shared_input.sync
# No groups: every refresh of the next model leaves each side path alone.
shared_input.sync = lambda model, visits: [
    setattr(v.layer._lowrank, "input_group", None) for v in visits
]
_, steps["plain"] = runner.prepare(workload, runner.entry("lowrank", "all_linear", 8))
shared_input.sync = formed
_, steps["builtin"] = runner.prepare(workload, runner.entry("builtin", "all_linear", 8))
for step in steps.values():
    step()
    step()
names = list(steps)
times = {name: [] for name in names}
for r in range(int(sys.argv[1]) if len(sys.argv) > 1 else 10):
    for name in names[r % len(names):] + names[: r % len(names)]:
        start = time.perf_counter()
        steps[name]()
        times[name].append(time.perf_counter() - start)
median = {name: statistics.median(t) for name, t in times.items()}
print(
    keras.backend.backend(),
    {n: f"{m * 1e3:.0f} ms ({m / median['floor']:.3f}x floor)" for n, m in median.items()},
    f"fused/plain {median['fused'] / median['plain']:.3f}",
    f"fused/builtin {median['fused'] / median['builtin']:.3f}",
    flush=True,
)
