"""Adapters under `tf.distribute.MirroredStrategy` on 2 logical CPU devices.

Run as a script (logical devices must be configured before TensorFlow
starts):

    KERAS_BACKEND=tensorflow python tests/distributed/tf_mirrored_fit.py

Trains the same adapted model twice, a few `fit` steps each: on one device
and inside a 2-replica `MirroredStrategy` scope (model built, adapted and
compiled inside the scope). Prints one JSON object with the largest
difference between the two runs' factors.
"""

import json
import os

os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2
)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_lowrank  # noqa: E402


def build():
    inputs = keras.Input((16,))
    h = keras.layers.Dense(32, activation="relu", name="wide")(inputs)
    h = keras.layers.EinsumDense(
        "ab,bcd->acd", (4, 8), bias_axes="cd", name="heads"
    )(h)
    h = keras.layers.Flatten()(h)
    outputs = keras.layers.Dense(4, name="head")(h)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(0)
    for w in model.weights:
        w.assign(0.3 * rng.normal(size=w.shape).astype("float32"))
    keras_lowrank.adapt(model, rank=4, targets=["wide", "heads"])
    for layer in keras_lowrank.state.model_state.adapted_layers(model):
        for var in layer.adapter_variables("default").values():
            var.assign(0.2 * rng.normal(size=var.shape).astype("float32"))
    model.compile(keras.optimizers.SGD(0.05), "mse")
    return model


def train(model):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(32, 16)).astype("float32")
    y = rng.normal(size=(32, 4)).astype("float32")
    before = {w.path: w.numpy() for w in model.trainable_weights}
    model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
    after = {w.path: w.numpy() for w in model.trainable_weights}
    moved = max(float(np.abs(after[k] - before[k]).max()) for k in after)
    return after, moved


def main():
    reference, moved = train(build())
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = build()
        kinds = sorted(
            {type(w.value).__name__ for w in model.trainable_weights}
        )
        mirrored, _ = train(model)
    gap = max(
        float(np.abs(mirrored[k] - reference[k]).max()) for k in reference
    )
    print(
        "RESULT "
        + json.dumps(
            {
                "replicas": strategy.num_replicas_in_sync,
                "trainable": sorted(reference),
                "variable_kinds": kinds,
                "moved": moved,
                "mirrored_gap": gap,
            },
            sort_keys=True,
        )
    )


if __name__ == "__main__":
    main()
