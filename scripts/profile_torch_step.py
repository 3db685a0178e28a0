"""Where does PyTorch spend its time beyond the reference, per ATen op?

    KERAS_BACKEND=torch python scripts/profile_torch_step.py [top] [infer]

Builds `keras-lowrank bench`'s MiniLM workload (batch 8 x 128) twice and
profiles three `train_on_batch` steps of each with `torch.profiler` after
three warm-up steps: the floor (only a norm trains) and keras_lowrank LoRA
on every linear layer (r = 8). With `infer`, five `predict_on_batch` calls
of the base model and of the adapted, unmerged one (`B` non-zero, as the
benchmark's "unmerged" case) instead. Prints per ATen op the self CPU time
and call count per step of both, sorted by what LoRA adds.

On 2026-12-08 (2-core Xeon; per-op times vary from run to run), training
(three runs): 327-362 -> 369-423 ms per step; `aten::mm` +29-41 ms (28 ->
214 calls: the thin `N x d x r` / `N x r x k` products and their
gradients), `aten::add` +12-13 ms (62 -> 186: the side path's adds and
the input gradient's two branches), everything else under 4 ms each.
Dropout's `aten::bernoulli_` is 83 ms of both steps. Inference (two
runs): 96-108 -> 110 ms; `aten::add` +3.3-3.6 ms (54 -> 91: the fold's
`W + s·A·B` per layer), `aten::mm` +0.8-6.5 ms (14 -> 52 calls: its
`A·B`), nothing else over 1 ms.
"""

import sys

import torch

from keras_lowrank.bench import runner
from keras_lowrank.bench import workloads as wl

workload = wl.make_workload(wl.minilm_spec(8, 128))
inference = "infer" in sys.argv[1:]
calls = 5 if inference else 3
per_step = {}
for name in ("base", "unmerged") if inference else ("floor", "lowrank"):
    # `entry` drops the targets of a case that does not adapt (floor, base).
    _, step = runner.prepare(workload, runner.entry(name, "all_linear", 8))
    for _ in range(3):
        step()
    with torch.profiler.profile() as profile:
        for _ in range(calls):
            step()
    per_step[name] = {
        event.key: (event.self_cpu_time_total / calls / 1e3, event.count / calls)
        for event in profile.key_averages()
    }

floor, lora = per_step.values()  # the reference, then LoRA
print(f"self CPU ms per call: {' / '.join(per_step)}: "
      f"{sum(v[0] for v in floor.values()):.0f} / "
      f"{sum(v[0] for v in lora.values()):.0f}")
none = (0.0, 0)
ops = sorted(set(floor) | set(lora),
             key=lambda op: floor.get(op, none)[0] - lora.get(op, none)[0])
top = [int(a) for a in sys.argv[1:] if a.isdigit()]
for op in ops[: top[0] if top else 12]:
    (ft, fn), (lt, ln) = floor.get(op, none), lora.get(op, none)
    print(f"{op[:44]:44s} {ft:6.1f} ms x{fn:4.0f}   "
          f"LoRA {lt:6.1f} ms x{ln:4.0f}   +{lt - ft:5.1f} ms")
