"""Inference may add plain LoRA adapters to the kernel (`x·(W + s·A·B)`)
instead of computing them on the side: only for `training=False`, enough
input rows (`N·(d + k) >= c·d·k`, `c` per backend), float32 compute,
unquantized kernels and LoRA (not DoRA); the output equals the side
path's."""

import keras
import numpy as np
import pytest

import keras_lowrank
from keras_lowrank.layers import forward

D = 5  # input features of every layer here


def _layer(kind, **options):
    if kind == "dense":
        layer = keras_lowrank.LowRankDense(6, rank=2, **options)
    else:
        layer = keras_lowrank.LowRankEinsumDense(
            "abc,cde->abde", (None, 3, 2), rank=2, bias_axes="de", **options
        )
    layer.build((None, None, D))
    rng = np.random.default_rng(0)
    for name in layer.adapter_names:
        b = layer.adapter_variables(name)["B"]
        b.assign(rng.normal(0.0, 0.5, size=tuple(b.shape)).astype("float32"))
    return layer


@pytest.fixture
def folds(monkeypatch):
    """Counts the calls that took the folded path."""
    calls = []
    for cls in (keras_lowrank.LowRankDense, keras_lowrank.LowRankEinsumDense):
        original = cls._kernel_output

        def counted(self, inputs, kernel, original=original):
            calls.append(self.name)
            return original(self, inputs, kernel)

        monkeypatch.setattr(cls, "_kernel_output", counted)
    return calls


def _x(rows_per_batch, seed=1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(2, rows_per_batch, D)).astype("float32")


@pytest.mark.parametrize("kind", ["dense", "einsum"])
def test_inference_with_many_rows_folds_and_equals_the_side_path(kind, folds):
    layer = _layer(kind)
    x = _x(8)  # 16 rows: 16·(5 + 6) >= 4·5·6, every backend folds
    side = keras.ops.convert_to_numpy(layer(x))  # training=None: side path
    assert folds == []
    folded = keras.ops.convert_to_numpy(layer(x, training=False))
    assert folds == [layer.name]
    np.testing.assert_allclose(folded, side, rtol=1e-5, atol=1e-6)
    # The adapter really contributes, so equal outputs mean something.
    layer.set_active_adapters([])
    base = keras.ops.convert_to_numpy(layer(x, training=False))
    assert np.max(np.abs(base - side)) > 1e-2


@pytest.mark.parametrize("kind", ["dense", "einsum"])
def test_several_active_adapters_fold_together(kind, folds):
    layer = _layer(kind)
    layer.add_adapter("second", keras_lowrank.AdapterSpec(rank=3, alpha=6))
    b = layer.adapter_variables("second")["B"]
    b.assign(np.full(tuple(b.shape), 0.3, "float32"))
    layer.set_active_adapters(["default", "second"])
    x = _x(8)
    side = keras.ops.convert_to_numpy(layer(x))
    folded = keras.ops.convert_to_numpy(layer(x, training=False))
    assert folds == [layer.name]
    np.testing.assert_allclose(folded, side, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "why, make, rows, training",
    [
        # 2 rows: 2·(5 + 6) < 5·6, the side path moves less.
        ("too few rows", lambda: _layer("dense"), 1, False),
        ("training", lambda: _layer("dense"), 8, True),
        ("training unspecified", lambda: _layer("dense"), 8, None),
        ("DoRA", lambda: _layer("dense", method="dora"), 8, False),
        (
            "bfloat16 compute",
            lambda: _layer("dense", dtype="mixed_bfloat16"),
            8,
            False,
        ),
    ],
)
def test_side_path_where_folding_does_not_apply(why, make, rows, training, folds):
    layer = make()
    layer(_x(rows), training=training)
    assert folds == [], why


def test_quantized_kernel_keeps_the_side_path(folds):
    layer = _layer("dense")
    layer.quantize("int8")
    layer(_x(8), training=False)
    assert folds == []


@pytest.mark.parametrize("kind", ["dense", "einsum"])
def test_the_fold_threshold_is_the_backends(kind, folds):
    """8 rows: 8·(5 + 6) = 88 values of side-path traffic against 30 of
    folding. PyTorch and TensorFlow fold from 30 on, JAX from 4·30 = 120
    (measured: on JAX the side path costs less than its traffic says)."""
    backend = keras.config.backend()
    assert forward.FOLD_THRESHOLDS == {"jax": 4.0}
    layer = _layer(kind)
    x = _x(4)
    side = keras.ops.convert_to_numpy(layer(x))
    got = keras.ops.convert_to_numpy(layer(x, training=False))
    assert folds == ([] if backend == "jax" else [layer.name])
    np.testing.assert_allclose(got, side, rtol=1e-5, atol=1e-6)
    folds.clear()
    layer(_x(6), training=False)  # 12·11 = 132 >= 120: JAX folds too
    assert folds == [layer.name]
