"""Running a plan: blocks of cases, timed side by side, memory per process.

A *block* is one workload and the entries measured on it. All entries of a
block are built in one process and timed **interleaved**: in each round,
every entry runs `steps` steps (the order rotates between rounds), so slow
drifts of a shared machine hit every entry alike; the reported figure is the
median over all rounds. Peak memory is measured per entry in a fresh worker
process (`python -m keras_lowrank.bench.worker`), so each entry's peak is its
own: the kernel's RSS high-water mark over its training steps on CPU, the
device's peak on a GPU.
"""

import json

from keras_lowrank.bench import cases
from keras_lowrank.bench import measure
from keras_lowrank.bench.workloads import make_workload

LEARNING_RATE = 1e-4


def entry(case, targets=None, rank=None, **options):
    """One measurement of a block: a case, and its target set and rank."""
    spec = cases.get(case)
    if not spec.adapted:
        targets, rank = None, None
    return {"case": case, "targets": targets, "rank": rank, "options": options}


def entry_key(item):
    return json.dumps(
        [item["case"], item["targets"], item["rank"], item.get("options") or {}],
        sort_keys=True,
    )


def block(name, workload_spec, entries, role="compare", sweep=None,
          memory=True):
    """A block: `entries` measured on one workload, timed together; with
    `memory=False` its peak memory is not measured (sweeps, by default)."""
    return {
        "name": name,
        "workload": workload_spec,
        "entries": entries,
        "role": role,
        "sweep": sweep or {},
        "memory": memory,
    }


def prepare(workload, item):
    """A fresh model prepared for `item`, and its step function."""
    import keras

    case = cases.get(item["case"])
    model = workload.build()
    options = dict(item.get("options") or {})
    if case.adapted:
        case.prepare(model, workload, item["targets"], item["rank"], **options)
    else:
        case.prepare(model, workload, **options)
    x, y = workload.batch()
    if case.kind == "train":
        model.compile(
            optimizer=keras.optimizers.Adam(LEARNING_RATE),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )

        def step():
            return model.train_on_batch(x, y)

    else:

        def step():
            return model.predict_on_batch(x)

    return model, step


def static_figures(model, item):
    """Sizes that do not need a clock: parameters and optimizer state."""
    case = cases.get(item["case"])
    figures = {
        "trainable_params": measure.count_params(model.trainable_weights),
        "total_params": measure.count_params(model.weights),
    }
    if case.kind == "train" and model.optimizer is not None:
        figures["optimizer_state_bytes"] = measure.optimizer_state_bytes(
            model.optimizer
        )
    return figures


def time_block(spec, rounds, steps, warmup, log=print):
    """Times every entry of block `spec`, interleaved; returns
    `{entry_key: {"time": ..., **static figures}}`."""
    workload = make_workload(spec["workload"])
    items = spec["entries"]
    steppers, results = [], {}
    for item in items:
        model, step = prepare(workload, item)
        for _ in range(warmup):
            step()
        results[entry_key(item)] = {**static_figures(model, item), "_model": model}
        steppers.append((item, step))
        log(f"  built {_describe(item)}")
    times = {entry_key(item): [] for item in items}
    for round_index in range(rounds):
        shift = round_index % len(steppers)
        for item, step in steppers[shift:] + steppers[:shift]:
            times[entry_key(item)].extend(measure.time_calls(step, steps))
        log(f"  round {round_index + 1}/{rounds} done")
    for key, result in results.items():
        result.pop("_model")
        result["time"] = measure.summarize(times[key])
    return results


def memory_entry(spec, item, steps, warmup):
    """Peak memory of one entry, measured in *this* process: call it in a
    fresh process (see `worker.py`) for a figure that is the entry's own."""
    workload = make_workload(spec["workload"])
    model, step = prepare(workload, item)
    for _ in range(warmup):
        step()
    result = {"rss_loaded_bytes": measure.rss_bytes()}
    result.update(measure.peak_memory(step, steps))
    return result


def memory_in_worker(spec, item, steps, warmup, timeout=1800):
    """Runs `memory_entry` in a fresh Python process; returns its result."""
    request = {"workload": "compare", "block": spec, "entry": item,
               "steps": steps, "warmup": warmup}
    return measure.in_fresh_process(request, _describe(item), timeout)


def run_plan(plan, rounds, steps, warmup, memory="subprocess", memory_steps=3,
             log=print):
    """Measures every block of `plan`; returns a list of result records."""
    records = []
    for spec in plan:
        workload = make_workload(spec["workload"])
        log(f"[{spec['name']}] {workload.describe()}: timing "
            f"{len(spec['entries'])} entries")
        timed = time_block(spec, rounds, steps, warmup, log=log)
        for item in spec["entries"]:
            case = cases.get(item["case"])
            record = {
                "block": spec["name"],
                "role": spec["role"],
                "sweep": spec["sweep"],
                "workload": workload.describe(),
                "case": item["case"],
                "label": case.label,
                "kind": case.kind,
                "targets": item["targets"],
                "rank": item["rank"],
                "options": item.get("options") or {},
                **timed[entry_key(item)],
            }
            if not spec.get("memory", True):
                pass
            elif memory == "subprocess":
                log(f"  memory: {_describe(item)}")
                record.update(memory_in_worker(spec, item, memory_steps, warmup))
            elif memory == "inprocess":
                record.update(memory_entry(spec, item, memory_steps, warmup))
                record["memory_method"] += " (in-process: not per entry)"
            records.append(record)
    return records


def _describe(item):
    parts = [item["case"]]
    if item["targets"]:
        parts.append(item["targets"])
    if item["rank"]:
        parts.append(f"r={item['rank']}")
    if item.get("options"):
        parts.append(json.dumps(item["options"], sort_keys=True))
    return " ".join(parts)
