"""Adapted layers inside `keras.RematScope` (gradient checkpointing).

Rematerialisation is decided when a layer is created (Keras records the scope
on the layer), so the model is built inside the scope and adapted afterwards:
the adapter layers are the same objects and keep the mode. Training with and
without rematerialisation must give the same factors.
"""

import warnings

import keras
import numpy as np
import pytest
from keras import ops

import keras_lowrank

BACKEND = keras.backend.backend()


def _build(remat_mode):
    """Two layers to adapt, built in the scope; the head outside it (plain
    Keras layers under `RematScope` fail on TensorFlow: see below)."""

    def adapted_layers():
        return (
            keras.layers.Dense(32, activation="gelu", name="up"),
            keras.layers.EinsumDense(
                "abc,cd->abd", (None, 16), bias_axes="d", name="mix",
                activation="relu",
            ),
        )

    if remat_mode is None:
        up, mix = adapted_layers()
    else:
        with keras.RematScope(mode=remat_mode, output_size_threshold=64):
            up, mix = adapted_layers()
    inputs = keras.Input((6, 16))
    outputs = keras.layers.Dense(4, name="head")(mix(up(inputs)))
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(0)
    for w in model.weights:
        w.assign(0.3 * rng.normal(size=w.shape).astype("float32"))
    return model


def _adapt(model, **options):
    keras_lowrank.adapt(model, rank=2, targets=["up", "mix"], **options)
    rng = np.random.default_rng(1)
    for name in ("up", "mix"):
        layer = model.get_layer(name)
        for var in layer.adapter_variables("default").values():
            var.assign(0.2 * rng.normal(size=var.shape).astype("float32"))
    return model


def _data():
    rng = np.random.default_rng(2)
    return (
        rng.normal(size=(8, 6, 16)).astype("float32"),
        rng.normal(size=(8, 6, 4)).astype("float32"),
    )


def _fit(model):
    x, y = _data()
    model.compile(keras.optimizers.SGD(0.05), "mse")
    model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0)
    return {w.path: ops.convert_to_numpy(w) for w in model.trainable_weights}


@pytest.mark.parametrize("mode", ["full", "activations", "larger_than"])
def test_fit_under_remat_equals_fit_without(mode):
    reference = _fit(_adapt(_build(None)))
    model = _adapt(_build(mode))
    assert model.get_layer("up")._remat_mode is not None
    got = _fit(model)
    assert sorted(got) == sorted(reference)
    for path, value in reference.items():
        np.testing.assert_allclose(got[path], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_base_under_remat(quantize):
    def run(mode):
        model = _adapt(_build(mode))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.quantize(quantize)
        return _fit(model)

    reference, got = run(None), run("full")
    for path, value in reference.items():
        np.testing.assert_allclose(got[path], value, rtol=1e-5, atol=1e-6)


def test_adapter_dropout_under_remat_replays_the_same_masks():
    # The dropout seeds are drawn outside the rematerialised call, so the
    # forward pass and its recomputation use the same masks, and training
    # equals training without rematerialisation, seed for seed.
    reference = _fit(_adapt(_build(None), dropout=0.3, seed=3))
    got = _fit(_adapt(_build("full"), dropout=0.3, seed=3))
    for path, value in reference.items():
        np.testing.assert_allclose(got[path], value, rtol=1e-5, atol=1e-6)
    # Dropout did act: without it training goes elsewhere.
    plain = _fit(_adapt(_build("full")))
    assert max(np.abs(plain[p] - reference[p]).max() for p in plain) > 1e-4


@pytest.mark.skipif(BACKEND != "jax", reason="reads the JAX program")
def test_remat_is_in_the_compiled_step_and_saves_memory():
    import jax

    def step_memory(mode):
        model = _adapt(_build(mode))
        model.compile(keras.optimizers.SGD(0.05), "mse")
        x, y = _data()
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)
        state = (
            [v.value for v in model.trainable_variables],
            [v.value for v in model.non_trainable_variables],
            [v.value for v in model.optimizer.variables],
            [v.value for v in model.metrics_variables],
        )
        program = jax.make_jaxpr(model.train_step)(state, (x, y))
        return "checkpoint" in str(program) or "remat" in str(program)

    assert not step_memory(None)
    assert step_memory("full")
