"""Adapters under keras.distribution on 8 virtual CPU devices (JAX).

Run as a script (the device count must be set before JAX starts):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 KERAS_BACKEND=jax \
        python tests/distributed/jax_sharded_fit.py

Trains the same adapted model three times, a few `fit` steps each: on one
device, under `DataParallel` over 8 devices, and under `ModelParallel` on a
2×4 ("batch", "model") mesh with a LayoutMap written for the base model only.
Prints one JSON object: the largest difference of every run's factors from
the single-device run, and each variable's sharding.
"""

import json
import os

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=8"
)

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_lowrank  # noqa: E402

TARGETS = ["wide", "heads", "narrow"]


def build():
    inputs = keras.Input((16,))
    h = keras.layers.Dense(32, use_bias=False, activation="relu", name="wide")(
        inputs
    )
    h = keras.layers.EinsumDense(
        "ab,bcd->acd", (4, 8), bias_axes="cd", name="heads"
    )(h)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(16, activation="relu", name="narrow")(h)
    outputs = keras.layers.Dense(4, name="head")(h)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(0)
    for w in model.weights:
        w.assign(0.3 * rng.normal(size=w.shape).astype("float32"))
    keras_lowrank.adapt(model, rank=4, targets=TARGETS)
    for layer in keras_lowrank.state.model_state.adapted_layers(model):
        for key, var in layer.adapter_variables("default").items():
            var.assign(0.2 * rng.normal(size=var.shape).astype("float32"))
    return model


def data():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(32, 16)).astype("float32")
    y = rng.normal(size=(32, 4)).astype("float32")
    return x, y


def train():
    model = build()
    initial = {
        w.path: np.asarray(w.value) for w in model.weights if "lowrank_" in w.path
    }
    model.compile(keras.optimizers.SGD(0.05), "mse")
    x, y = data()
    model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
    factors = {
        w.path: np.asarray(w.value)
        for w in model.weights
        if "lowrank_" in w.path
    }
    moved = max(float(np.max(np.abs(factors[k] - initial[k]))) for k in factors)
    shardings = {
        w.path: str(tuple(w.value.sharding.spec))
        if hasattr(w.value.sharding, "spec")
        else "single device"
        for w in model.weights
    }
    return factors, shardings, moved


def main():
    assert len(jax.devices()) == 8, jax.devices()
    reference, _, moved = train()

    devices = keras.distribution.list_devices()
    data_parallel = keras.distribution.DataParallel(devices=devices)
    with data_parallel.scope():
        dp_factors, dp_shardings, _ = train()

    mesh = keras.distribution.DeviceMesh(
        shape=(2, 4), axis_names=("batch", "model"), devices=devices
    )
    layout_map = keras.distribution.LayoutMap(mesh)
    # Rules written for the base model. The first one is deliberately broad:
    # it also matches the adapters' paths ("wide/lowrank_A_default"), and
    # would shard A's rank axis if Keras looked adapters up in the map.
    layout_map[".*wide/.*"] = (None, "model")
    layout_map[".*heads.*kernel"] = (None, "model", None)
    layout_map[".*heads.*bias"] = ("model", None)
    layout_map[".*narrow.*kernel"] = ("model", None)
    model_parallel = keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="batch"
    )
    with model_parallel.scope():
        mp_factors, mp_shardings, _ = train()

    # For comparison: what Keras alone would do with the same LayoutMap (each
    # adapter variable looked up by its path).
    from keras_lowrank.layers import sharding

    derive = sharding.adapter_layout
    sharding.adapter_layout = lambda *args: None
    try:
        with model_parallel.scope():
            _, naive_shardings, _ = train()
    finally:
        sharding.adapter_layout = derive

    def gap(factors):
        return max(
            float(np.max(np.abs(factors[k] - reference[k]))) for k in reference
        )

    print(
        "RESULT "
        + json.dumps(
            {
                "factors": sorted(reference),
                "moved": moved,
                "data_parallel_gap": gap(dp_factors),
                "model_parallel_gap": gap(mp_factors),
                "data_parallel_shardings": dp_shardings,
                "model_parallel_shardings": mp_shardings,
                "keras_lookup_shardings": {
                    k: v for k, v in naive_shardings.items() if "lowrank_" in k
                },
            },
            sort_keys=True,
        )
    )


if __name__ == "__main__":
    main()
