"""Check: is an int8 base slow because of Keras's int8 `Dense` or the adapter?

    KERAS_BACKEND=torch python scripts/bench_int8_dense.py [rounds]

Four pairs of frozen 576->1536->576 `Dense` layers (SmolLM2-135M's MLP
widths), `mixed_bfloat16`, batch 4 x 256, a trainable norm and head on top:
the float model and the int8-quantized one (`model.quantize("int8")`), each
with and without keras_lowrank LoRA (rank 8) on every Dense. Train steps
run interleaved; prints medians and ratios to the float model without
adapters. On 2026-12-07 (2 CPU cores, two runs each): int8 without any
adapter 14.2-17.4x the float step on PyTorch, 8.7-8.8x on TensorFlow; with
LoRA 15.5-17.8x and 9.9-10.2x. (Float with LoRA is about 2x float without:
on this toy nothing but the adapters needs a backward pass through the
Dense stack; that ratio says nothing about the adapter's cost.)
"""

import statistics
import sys
import time

import keras
import numpy as np

import keras_lowrank

keras.config.set_dtype_policy("mixed_bfloat16")
DENSE = [f"{kind}{i}" for i in range(4) for kind in ("up", "down")]


def build(mode, adapted):
    inputs = keras.Input((256, 576))
    h = inputs
    for i in range(4):
        h = keras.layers.Dense(1536, use_bias=False, name=f"up{i}")(h)
        h = keras.layers.Dense(576, use_bias=False, name=f"down{i}")(h)
    h = keras.layers.LayerNormalization(name="ln")(h)
    model = keras.Model(inputs, keras.layers.Dense(1, name="head")(h))
    if adapted:
        keras_lowrank.adapt(model, rank=8, targets=DENSE)
    else:
        for name in DENSE:
            model.get_layer(name).trainable = False
    if mode:
        model.quantize(mode)
    model.compile(optimizer="adam", loss="mse")
    return model


x = np.random.rand(4, 256, 576).astype("float32")
y = np.random.rand(4, 256, 1).astype("float32")
models = {(mode or "float", adapted): build(mode, adapted)
          for mode in (None, "int8") for adapted in (False, True)}
for model in models.values():
    model.train_on_batch(x, y)
    model.train_on_batch(x, y)
times = {key: [] for key in models}
for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 5):
    for key, model in models.items():
        start = time.perf_counter()
        model.train_on_batch(x, y)
        times[key].append(time.perf_counter() - start)
base = statistics.median(times[("float", False)])
for (mode, adapted), found in times.items():
    median = statistics.median(found)
    print(f"{keras.backend.backend()} {mode}{' + LoRA' if adapted else ''}: "
          f"{median * 1e3:.1f} ms ({median / base:.2f}x float)")
