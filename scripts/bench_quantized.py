"""Benchmark: the same adapter on float32, bfloat16, int8 and int4 bases.

    KERAS_BACKEND=jax python scripts/bench_quantized.py [--quick]

For each base, the script builds the same MLP stack (d=512, 2048 hidden,
4 blocks; every Dense adapted at rank 16), then measures, for a batch of
8×128 tokens (activations dominate) and of 1×16 tokens (weights dominate)

- frozen-weight bytes: every non-trainable variable (kernels, scales, biases);
- adapter bytes: the trainable factors (float32 in every case);
- peak step memory: XLA's own accounting of Keras's compiled `train_step`
  (arguments + outputs + temporaries − donated buffers), from
  `jax.jit(...).lower(...).compile().memory_analysis()`;
- step time: median wall time of that compiled step.

It also measures what a `.keras` round trip does to outputs, for Keras's
built-in LoRA (which merges and re-quantizes on save) and for keras_lowrank
(which keeps the integer kernel and the factors as they are), and what
`unload(model, quantized="requantize"|"dequantize")` does to them.

JAX only: it reads XLA's memory accounting. Numbers are for the CPU it runs
on; the memory columns do not depend on the machine's load, the times do.
"""

import argparse
import os
import statistics
import tempfile
import time
import warnings

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_lowrank  # noqa: E402

BASES = ("float32", "bfloat16", "int8", "int4")


def build(dim=512, hidden=2048, blocks=4, dtype="float32", seed=0):
    """An MLP stack (the shape of a transformer's feed-forward layers)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((None, dim))
    h = inputs
    for i in range(blocks):
        up = keras.layers.Dense(hidden, activation="gelu", name=f"up_{i}",
                                dtype=dtype)(h)
        h = keras.layers.Add(dtype=dtype)(
            [h, keras.layers.Dense(dim, name=f"down_{i}", dtype=dtype)(up)]
        )
    outputs = keras.layers.Dense(dim, name="head", dtype=dtype)(h)
    return keras.Model(inputs, outputs)


def _quantize(model, mode):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the InputLayer/Add "cannot quantize"
        model.quantize(mode)


def adapted_model(base, rank=16, **shape):
    dtype = "bfloat16" if base == "bfloat16" else "float32"
    model = build(dtype=dtype, **shape)
    keras_lowrank.adapt(model, rank=rank, targets=["up_*", "down_*"])
    if base in ("int8", "int4"):
        _quantize(model, base)
    return model


def _bytes(variables):
    return sum(
        int(np.prod(v.shape)) * np.dtype(keras.backend.standardize_dtype(
            v.dtype)).itemsize
        for v in variables
    )


def measure(base, batch=8, seq=128, steps=10, rank=16, **shape):
    """One row of the table for `base`."""
    model = adapted_model(base, rank=rank, **shape)
    dim = model.input_shape[-1]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, seq, dim)).astype("float32")
    y = rng.normal(size=(batch, seq, dim)).astype("float32")
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    model.fit(x, y, batch_size=batch, epochs=1, verbose=0)  # builds it all

    state = (
        [v.value for v in model.trainable_variables],
        [v.value for v in model.non_trainable_variables],
        [v.value for v in model.optimizer.variables],
        [v.value for v in model.metrics_variables],
    )
    step = jax.jit(model.train_step, donate_argnums=0)
    compiled = step.lower(state, (x, y)).compile()
    memory = compiled.memory_analysis()
    peak = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        + memory.temp_size_in_bytes
        - memory.alias_size_in_bytes
    )
    times = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        logs, state = compiled(state, (x, y))
        jax.block_until_ready(logs)
        times.append(time.perf_counter() - start)
    return {
        "base": base,
        "frozen_bytes": _bytes(model.non_trainable_variables),
        "adapter_bytes": _bytes(model.trainable_variables),
        "step_temp_bytes": int(memory.temp_size_in_bytes),
        "step_peak_bytes": int(peak),
        "step_ms": 1000 * statistics.median(times[2:]),
    }


# --- .keras round trip: Keras's built-in LoRA vs keras_lowrank ------------------------


def round_trip_change(mode, how, rank=8, seed=0):
    """Largest output change a `.keras` save + load makes to an adapted,
    quantized model whose adapter has been trained (random factors)."""
    model = build(dim=64, hidden=256, blocks=2, seed=seed)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(4, 16, 64)).astype("float32")
    dense = [layer for layer in model.layers
             if isinstance(layer, keras.layers.Dense)
             and layer.name != "head"]
    if how == "keras":
        _quantize(model, mode)
        for layer in dense:
            layer.enable_lora(rank)
            layer.lora_kernel_a.assign(
                rng.normal(size=layer.lora_kernel_a.shape).astype("float32")
                * 0.1
            )
            layer.lora_kernel_b.assign(
                rng.normal(size=layer.lora_kernel_b.shape).astype("float32")
                * 0.1
            )
    else:
        keras_lowrank.adapt(model, rank=rank, targets=["up_*", "down_*"])
        _quantize(model, mode)
        for layer in dense:
            for var in layer.adapter_variables("default").values():
                var.assign(
                    rng.normal(size=var.shape).astype("float32") * 0.1
                )
    before = keras.ops.convert_to_numpy(model(x))
    path = os.path.join(tempfile.mkdtemp(), "m.keras")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save(path)
        loaded = keras_lowrank.load_model(path)
    after = keras.ops.convert_to_numpy(loaded(x))
    return float(np.abs(after - before).max()), float(np.abs(before).max())


def unload_change(mode, quantized, rank=8, seed=0):
    """Largest output change `unload(model, quantized=...)` makes to the same
    adapted, quantized model as `round_trip_change`."""
    model = build(dim=64, hidden=256, blocks=2, seed=seed)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(4, 16, 64)).astype("float32")
    keras_lowrank.adapt(model, rank=rank, targets=["up_*", "down_*"])
    _quantize(model, mode)
    for layer in keras_lowrank.state.model_state.adapted_layers(model):
        for var in layer.adapter_variables("default").values():
            var.assign(rng.normal(size=var.shape).astype("float32") * 0.1)
    before = keras.ops.convert_to_numpy(model(x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        keras_lowrank.unload(model, quantized=quantized)
    after = keras.ops.convert_to_numpy(model(x))
    return float(np.abs(after - before).max())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a smaller model (for a smoke run)")
    args = parser.parse_args(argv)
    shape = dict(dim=128, hidden=512, blocks=2) if args.quick else {}
    print(f"backend {keras.backend.backend()}, devices {jax.devices()}")
    print()
    workloads = ((8, 128), (1, 16))  # activations dominate / weights do
    header = "| base | frozen weights | adapters |"
    for batch, seq in workloads:
        header += f" step peak, {batch}×{seq} | step temp | step time |"
    print(header)
    print("| --- " + "| ---: " * (2 + 3 * len(workloads)) + "|")
    for base in BASES:
        cells = []
        for batch, seq in workloads:
            row = measure(base, batch=batch, seq=seq, **shape)
            cells.append(
                f" {row['step_peak_bytes'] / 2**20:.1f} MiB"
                f" | {row['step_temp_bytes'] / 2**20:.1f} MiB"
                f" | {row['step_ms']:.1f} ms |"
            )
        print(
            f"| {base} | {row['frozen_bytes'] / 2**20:.2f} MiB"
            f" | {row['adapter_bytes'] / 2**20:.2f} MiB |" + "".join(cells),
            flush=True,
        )
    print()
    print("| base | `.keras` round trip, Keras built-in LoRA |"
          " keras_lowrank | max abs output |")
    print("| --- | ---: | ---: | ---: |")
    for mode in ("int8", "int4"):
        keras_change, top = round_trip_change(mode, "keras")
        ours, _ = round_trip_change(mode, "keras_lowrank")
        print(f"| {mode} | {keras_change:.4f} | {ours:.4f} | {top:.2f} |",
              flush=True)
    print()
    print("| base | unload(quantized='requantize') |"
          " unload(quantized='dequantize') |")
    print("| --- | ---: | ---: |")
    for mode in ("int8", "int4"):
        print(f"| {mode} | {unload_change(mode, 'requantize'):.4f}"
              f" | {unload_change(mode, 'dequantize'):.4f} |", flush=True)


if __name__ == "__main__":
    main()
