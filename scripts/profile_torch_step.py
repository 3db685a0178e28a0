"""Where does the PyTorch all-linear step spend its time beyond the floor's?

    KERAS_BACKEND=torch python scripts/profile_torch_step.py [top]

Builds `keras-lowrank bench`'s MiniLM workload (batch 8 x 128) as the floor
(only a norm trains) and as keras_lowrank LoRA on every linear layer
(r = 8), runs three warm-up steps of each, profiles three `train_on_batch`
steps with `torch.profiler`, and prints per ATen op the self CPU time and
call count per step of both, sorted by what LoRA adds. On 2026-12-08
(2-core Xeon, two runs): 360-362 -> 411-423 ms per step; `aten::mm`
+35-41 ms (28 -> 214 calls: the thin `N x d x r` / `N x r x k` products
and their gradients), `aten::add` +12-13 ms (62 -> 186: the side path's
adds and the input gradient's two branches), everything else under 4 ms
each. Dropout's `aten::bernoulli_` is 83 ms of both steps.
"""

import sys

import keras
import torch

from keras_lowrank.bench import cases
from keras_lowrank.bench import workloads as wl

workload = wl.make_workload(wl.minilm_spec(8, 128))
x, y = workload.batch()
per_step = {}
for name in ("floor", "lowrank"):
    case = cases.get(name)
    model = workload.build()
    if case.adapted:
        case.prepare(model, workload, "all_linear", 8)
    else:
        case.prepare(model, workload)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    for _ in range(3):
        model.train_on_batch(x, y)
    with torch.profiler.profile() as profile:
        for _ in range(3):
            model.train_on_batch(x, y)
    per_step[name] = {
        event.key: (event.self_cpu_time_total / 3e3, event.count / 3)
        for event in profile.key_averages()
    }

floor, lora = per_step["floor"], per_step["lowrank"]
print(f"self CPU ms per step: floor {sum(v[0] for v in floor.values()):.0f}, "
      f"LoRA {sum(v[0] for v in lora.values()):.0f}")
none = (0.0, 0)
ops = sorted(set(floor) | set(lora),
             key=lambda op: floor.get(op, none)[0] - lora.get(op, none)[0])
for op in ops[: int(sys.argv[1]) if len(sys.argv) > 1 else 12]:
    (ft, fn), (lt, ln) = floor.get(op, none), lora.get(op, none)
    print(f"{op[:44]:44s} floor {ft:6.1f} ms x{fn:4.0f}   "
          f"LoRA {lt:6.1f} ms x{ln:4.0f}   +{lt - ft:5.1f} ms")
