"""`GradientSubspace` and its per-backend gradients, against closed forms.

For `L = mean((x·W_eff + b − y)²)` over all n·k entries the kernel gradient
is `G = 2/(n·k)·xᵀ·(x·W_eff + b − y)`, where `W_eff = W + s·A·B` for an
adapted layer; the fractions are then plain NumPy on G.
"""

import keras
import numpy as np
import pytest

import keras_lowrank
from keras_lowrank.analysis import GradientSubspace
from keras_lowrank.analysis import autodiff

import model_kinds

D, K, N = 12, 7, 16


def _data(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(N, D)).astype("float32"),
            rng.normal(size=(N, K)).astype("float32"))


def _model(adapted):
    model = keras.Sequential([keras.Input((D,)), keras.layers.Dense(K, name="dense")])
    if adapted:
        keras_lowrank.adapt(model, rank=2, alpha=4, targets=["dense"])
        rng = np.random.default_rng(5)
        for v in model.layers[0].adapter_variables("default").values():
            v.assign(rng.normal(size=v.shape).astype("float32"))
    model.compile(keras.optimizers.SGD(0.01), "mse")
    return model


def _closed_form(model, x, y):
    layer = model.layers[0]
    w = keras.ops.convert_to_numpy(layer.kernel).astype(np.float64)
    a = b = None
    if isinstance(layer, keras_lowrank.LowRankLayer):
        v = layer.adapter_variables("default")
        a = keras.ops.convert_to_numpy(v["A"]).astype(np.float64)
        b = keras.ops.convert_to_numpy(v["B"]).astype(np.float64)
        w = w + layer.adapter_spec("default").scale * a @ b
    bias = keras.ops.convert_to_numpy(layer.bias).astype(np.float64)
    residual = x @ w + bias - y
    return 2.0 / residual.size * x.T @ residual, a, b


@pytest.mark.parametrize("adapted", [False, True], ids=["plain", "adapted"])
def test_gradients_equal_the_closed_form_frozen_kernels_included(adapted):
    model = _model(adapted)
    x, y = _data()
    kernel = keras_lowrank.LowRankDense.kernel_variable(model.layers[0])
    assert kernel.trainable is not adapted  # an adapted kernel is frozen
    grad = autodiff.gradient_function(model, [kernel], keras.losses.MeanSquaredError())
    expected, _, _ = _closed_form(model, x, y)
    np.testing.assert_allclose(grad(x, y)[0], expected, rtol=1e-4, atol=1e-6)


def _projection(m):
    u, s, _ = np.linalg.svd(m, full_matrices=False)
    u = u[:, s > 1e-10 * s.max()]
    return u @ u.T


def test_fractions_equal_numpy_on_the_closed_form_gradient():
    model = _model(adapted=True)
    x, y = _data()
    probe = GradientSubspace((x, y), rank=3, every=1000)
    probe.set_model(model)
    probe.on_train_begin()
    row = probe.history[0]["layers"]["dense"]
    g, a, b = _closed_form(model, x, y)
    s = np.linalg.svd(g, compute_uv=False)
    assert row["top_r"] == pytest.approx((s[:3] ** 2).sum() / (s**2).sum(), rel=1e-4)
    p_a, p_b = _projection(a), _projection(b.T)
    tangent = (np.sum((p_a @ g) ** 2) + np.sum((g @ p_b) ** 2)
               - np.sum((p_a @ g @ p_b) ** 2)) / np.sum(g**2)
    assert row["factor_span"] == pytest.approx(tangent, rel=1e-4)
    # A generic rank-2 tangent space holds a share, never all of it.
    assert 0.0 < row["factor_span"] < 1.0
    assert probe.history[0]["mean"] == {"top_r": row["top_r"], "factor_span": row["factor_span"]}


def test_measures_every_n_steps_during_fit(tmp_path):
    model = _model(adapted=True)
    x, y = _data()
    probe = GradientSubspace((x, y), rank=1, every=3)
    model.fit(x, y, batch_size=2, epochs=1, verbose=0, callbacks=[probe])  # 8 steps
    assert [row["step"] for row in probe.history] == [0, 3, 6]
    before = probe.history[0]["layers"]["dense"]["top_r"]
    after = probe.history[-1]["layers"]["dense"]["top_r"]
    assert before != after  # the measurement follows the training weights
    pytest.importorskip("matplotlib")
    path = tmp_path / "gs.png"
    probe.plot(str(path))
    assert path.stat().st_size > 1000


def test_full_fine_tune_of_a_kerashub_classifier():
    pytest.importorskip("keras_hub")
    kind = model_kinds.KINDS["bert_classifier"]
    model = kind.build()
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = kind.inputs(), np.array([0, 1, 2, 0])
    probe = GradientSubspace((x, y), rank=2, every=1)
    model.fit(x, y, epochs=1, verbose=0, callbacks=[probe])
    layers = probe.history[-1]["layers"]
    assert len(layers) == 2 * 6 + 1  # q/k/v/o + 2 MLP per layer, and the pooler
    assert all(0.0 < row["top_r"] <= 1.0 + 1e-9 and "factor_span" not in row
               for row in layers.values())


def test_refusals():
    x, y = _data()
    with pytest.raises(TypeError, match=r"needs a probe batch `data=\(x, y\)`; got ndarray"):
        GradientSubspace(x)
    with pytest.raises(ValueError, match="rank must be a positive int; got 0"):
        GradientSubspace((x, y), rank=0)
    with pytest.raises(ValueError, match="every must be a positive int; got 2.5"):
        GradientSubspace((x, y), every=2.5)
    model = keras.Sequential([keras.Input((D,)), keras.layers.Dense(K, name="dense")])
    probe = GradientSubspace((x, y))
    probe.set_model(model)
    with pytest.raises(ValueError, match="needs one loss: compile the model with a single loss"):
        probe.on_train_begin()
    probe = GradientSubspace((x, y), targets=["nope"], loss="mse")
    probe.set_model(model)
    with pytest.raises(ValueError, match="targets entry 'nope' matched no layer"):
        probe.on_train_begin()


def test_a_model_without_float_kernels_is_refused():
    model = keras.Sequential([keras.Input((D,)), keras.layers.Dense(K, name="dense")])
    model.quantize("int8")
    probe = GradientSubspace(_data(), loss="mse")
    probe.set_model(model)
    with pytest.raises(ValueError, match="found no float kernel to measure in model"):
        probe.on_train_begin()
