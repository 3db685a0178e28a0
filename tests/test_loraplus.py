"""LoRA+: exact effective learning rates inside `model.fit`, every backend."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_lowrank
from keras_lowrank import LoraPlusOptimizer
from keras_lowrank.loraplus import is_fast_variable

from backend_gradients import gradients

RNG = np.random.default_rng(7)
LR = 0.05


def _np(x):
    if isinstance(x, keras.Variable):
        x = x.value
    return np.asarray(ops.convert_to_numpy(x), "float64")


def _model(method="dora"):
    """Input → LowRankDense (A, B, m, bias trainable) → plain Dense head."""
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras_lowrank.LowRankDense(
                5, rank=2, method=method, bias="all", name="adapted"
            ),
            keras.layers.Dense(3, name="head"),
        ]
    )
    layer = model.get_layer("adapted")
    for key, var in layer.adapter_variables("default").items():
        if key in ("A", "B"):
            var.assign(RNG.normal(size=var.shape).astype("float32"))
    return model


def _data():
    x = RNG.normal(size=(8, 6)).astype("float32")
    y = RNG.normal(size=(8, 3)).astype("float32")
    return x, y


def _named(model):
    return {v.path: v for v in model.trainable_variables}


def _one_fit_step(model, optimizer, x, y):
    """Gradients at the start, values before and after one `fit` step."""
    loss = keras.losses.MeanSquaredError()
    variables = model.trainable_variables
    grads = gradients(lambda: loss(y, model(x)), variables)
    before = [_np(v) for v in variables]
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0)
    after = [_np(v) for v in variables]
    return variables, grads, before, after


def test_fast_variables_are_b_and_magnitude():
    model = _model()
    def paths(fast):
        return sorted(
            "/".join(v.path.split("/")[-2:])
            for v in model.trainable_variables
            if is_fast_variable(v) == fast
        )

    assert paths(True) == [
        "adapted/lowrank_B_default",
        "adapted/lowrank_magnitude_default",
    ]
    assert paths(False) == [
        "adapted/bias",
        "adapted/lowrank_A_default",
        "head/bias",
        "head/kernel",
    ]


@pytest.mark.parametrize("ratio", [16, 2.5])
def test_one_sgd_step_has_the_exact_learning_rates(ratio):
    model = _model()
    x, y = _data()
    optimizer = LoraPlusOptimizer(keras.optimizers.SGD(LR), ratio=ratio)
    variables, grads, before, after = _one_fit_step(model, optimizer, x, y)
    for var, g, b, a in zip(variables, grads, before, after):
        rate = LR * ratio if is_fast_variable(var) else LR
        assert np.abs(g).max() > 1e-4, var.path
        np.testing.assert_allclose(a - b, -rate * g, rtol=1e-4, atol=1e-6)
    assert int(_np(optimizer.iterations)) == 1


def test_weight_decay_uses_the_fast_rate_too():
    model = _model("lora")
    x, y = _data()
    wd = 0.1
    optimizer = LoraPlusOptimizer(
        keras.optimizers.SGD(LR, weight_decay=wd), ratio=4
    )
    variables, grads, before, after = _one_fit_step(model, optimizer, x, y)
    for var, g, b, a in zip(variables, grads, before, after):
        rate = LR * 4 if is_fast_variable(var) else LR
        # Keras decays first (v·(1 − wd·lr)), then steps with the gradient.
        expected = b * (1 - wd * rate) - rate * g
        np.testing.assert_allclose(a, expected, rtol=1e-4, atol=1e-6)


def test_adam_with_a_schedule():
    model = _model()
    x, y = _data()
    schedule = keras.optimizers.schedules.ExponentialDecay(
        0.01, decay_steps=1, decay_rate=0.5
    )
    optimizer = LoraPlusOptimizer(
        keras.optimizers.Adam(schedule, epsilon=1e-12), ratio=16
    )
    variables, grads, before, after = _one_fit_step(model, optimizer, x, y)
    # Adam's first step is -lr·g/|g|: the rates show directly.
    for var, g, b, a in zip(variables, grads, before, after):
        rate = 0.01 * (16 if is_fast_variable(var) else 1)
        np.testing.assert_allclose(a - b, -rate * np.sign(g), rtol=1e-3)
    # The schedule moved on: the wrapper reports the wrapped optimizer's rate.
    assert float(_np(optimizer.learning_rate)) == pytest.approx(0.005)
    assert int(_np(optimizer.iterations)) == 1


def test_learning_rate_is_the_wrapped_optimizers():
    optimizer = LoraPlusOptimizer(keras.optimizers.SGD(0.1))
    assert float(_np(optimizer.learning_rate)) == pytest.approx(0.1)
    optimizer.learning_rate = 0.02  # what ReduceLROnPlateau does
    inner = optimizer.inner_optimizer
    assert float(_np(inner.learning_rate)) == pytest.approx(0.02)


def test_serialization_round_trip():
    optimizer = LoraPlusOptimizer(
        keras.optimizers.AdamW(3e-4, weight_decay=0.01), ratio=8
    )
    config = keras.optimizers.serialize(optimizer)
    restored = keras.optimizers.deserialize(config)
    assert isinstance(restored, LoraPlusOptimizer)
    assert restored.ratio == 8.0
    assert isinstance(restored.inner_optimizer, keras.optimizers.AdamW)
    assert restored.inner_optimizer.weight_decay == pytest.approx(0.01)


def test_saved_model_keeps_the_optimizer_and_its_state(tmp_path):
    model = _model()
    x, y = _data()
    model.compile(
        optimizer=LoraPlusOptimizer(keras.optimizers.Adam(1e-3), ratio=16),
        loss="mse",
    )
    model.fit(x, y, epochs=2, verbose=0)
    path = str(tmp_path / "loraplus.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.optimizer, LoraPlusOptimizer)
    assert loaded.optimizer.ratio == 16.0
    assert len(loaded.optimizer.variables) == len(model.optimizer.variables)
    pairs = zip(model.optimizer.variables, loaded.optimizer.variables)
    for mine, theirs in pairs:
        np.testing.assert_allclose(_np(theirs), _np(mine), rtol=1e-6)
    loaded.fit(x, y, epochs=1, verbose=0)
    assert int(_np(loaded.optimizer.iterations)) == 3


def test_works_under_mixed_float16_loss_scaling():
    keras.config.set_dtype_policy("mixed_float16")
    model = _model()
    x, y = _data()
    model.compile(optimizer=LoraPlusOptimizer(keras.optimizers.SGD(LR)))
    # compile() puts a LossScaleOptimizer around it, as for any optimizer.
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert isinstance(model.optimizer.inner_optimizer, LoraPlusOptimizer)

    model = _model()
    scaled = keras.optimizers.LossScaleOptimizer(
        LoraPlusOptimizer(keras.optimizers.SGD(LR), ratio=16),
        initial_scale=64.0,
    )
    variables, grads, before, after = _one_fit_step(model, scaled, x, y)
    for var, g, b, a in zip(variables, grads, before, after):
        rate = LR * 16 if is_fast_variable(var) else LR
        scale = max(1e-3, float(np.abs(rate * g).max()))
        np.testing.assert_allclose(a - b, -rate * g, atol=2e-2 * scale)


def test_errors():
    with pytest.raises(TypeError, match="LoraPlusOptimizer wraps a Keras "
                       "optimizer instance, got 'adam'"):
        LoraPlusOptimizer("adam")
    for bad in (0, -1, True, "16", float("inf"), float("nan"), -float("inf")):
        with pytest.raises(ValueError, match="ratio must be a finite positive "
                           "number, got .*Pass a number such as ratio=16 "
                           "\\(what LoRA\\+ recommends\\)."):
            LoraPlusOptimizer(keras.optimizers.SGD(), ratio=bad)
    inner = keras.optimizers.SGD()
    wrapped = LoraPlusOptimizer(inner)
    with pytest.raises(ValueError, match="already wrapped by a "
                       "LoraPlusOptimizer. Wrap a fresh optimizer instance."):
        LoraPlusOptimizer(inner)
    with pytest.raises(TypeError, match="wraps a Keras optimizer instance"):
        LoraPlusOptimizer(wrapped)
    with pytest.raises(ValueError, match=r"does not take \['weight_decay'\]; "
                       "set them on the wrapped optimizer"):
        LoraPlusOptimizer(keras.optimizers.SGD(), weight_decay=0.1)
