"""Does compiling the step close the all-linear gap where Keras does not?

    KERAS_BACKEND=torch python scripts/bench_jit_compile.py [rounds]

`keras-lowrank bench` keeps every backend's Keras default: eager on
PyTorch, `tf.function` without XLA on a CPU-only TensorFlow (Keras turns
XLA off there), XLA on JAX. This builds its MiniLM workload (batch 8 x 128)
as the floor, Keras `enable_lora` and keras_lowrank LoRA on every linear
layer (r = 8), each compiled once with `jit_compile=False` and once with
`jit_compile=True` (`torch.compile` on PyTorch, XLA on TensorFlow), times
`train_on_batch` interleaved with the order rotating between rounds, and
prints the first step of each model, the ratios to the floor of the same
mode and the compiled floor against the uncompiled one. On 2026-12-08
(2-core Xeon, 8 rounds): PyTorch (two runs) LoRA 1.20-1.22x the floor
eager, 1.22-1.25x compiled, `enable_lora` 1.29x / 1.26-1.27x, the
compiled floor 1.08-1.10x the eager one, first steps 8-38 s against
0.4-0.6 s; TensorFlow LoRA 1.21x / 1.20x, `enable_lora` 1.28x / 1.31x,
the XLA floor 0.98x the graph one.
"""

import statistics
import sys
import time

from keras_lowrank.bench import runner
from keras_lowrank.bench import workloads as wl

workload = wl.make_workload(wl.minilm_spec(8, 128))
steps = {}
for jit in (False, True):
    for name in ("floor", "builtin", "lowrank"):
        # `entry` drops the targets of a case that does not adapt (floor).
        model, step = runner.prepare(
            workload, runner.entry(name, "all_linear", 8)
        )
        model.jit_compile = jit  # read when the first step builds the function
        start = time.perf_counter()
        step()
        print(f"{name}, jit_compile={jit}: first step "
              f"{time.perf_counter() - start:.1f} s", flush=True)
        step()
        steps[(name, jit)] = step

times = {key: [] for key in steps}
keys = list(steps)
for r in range(int(sys.argv[1]) if len(sys.argv) > 1 else 8):
    for key in keys[r % len(keys):] + keys[:r % len(keys)]:
        start = time.perf_counter()
        steps[key]()
        times[key].append((time.perf_counter() - start) * 1e3)
median = {key: statistics.median(v) for key, v in times.items()}
for jit in (False, True):
    floor = median[("floor", jit)]
    print(f"jit_compile={jit}: floor {floor:.0f} ms; enable_lora "
          f"{median[('builtin', jit)] / floor:.2f}x the floor; LoRA "
          f"{median[('lowrank', jit)] / floor:.2f}x the floor, "
          f"{median[('lowrank', jit)] / median[('builtin', jit)]:.2f}x "
          "enable_lora")
print(f"compiled floor / uncompiled floor: "
      f"{median[('floor', True)] / median[('floor', False)]:.2f}")
