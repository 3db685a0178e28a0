"""Adapters over int8/int4 frozen bases (QLoRA-style), on every backend.

The reference for the forward pass is Keras's own quantized layer: an adapted
quantized layer must equal `activation(plain_quantized(x) + s·(x·A)·B)`, where
`plain_quantized` is a plain Keras layer with the same weights, quantized the
same way, without activation.
"""

import os
import re
import warnings

import keras
import numpy as np
import pytest
from keras import ops

import keras_lowrank
from keras_lowrank import LowRankDense
from keras_lowrank import LowRankEinsumDense
from keras_lowrank import LowRankEmbedding
from keras_lowrank.layers import quantized as quantization

CONFIGS = {
    "int8": ("int8", None),
    "int4-channel": ("int4", keras.quantizers.Int4QuantizationConfig(block_size=-1)),
    "int4-block8": ("int4", keras.quantizers.Int4QuantizationConfig(block_size=8)),
}


def _np(x):
    return ops.convert_to_numpy(x)


def _quantize(layer, name):
    mode, config = CONFIGS[name]
    if config is None:
        layer.quantize(mode)
    else:
        layer.quantize(mode, config=config)


def _twin_layers(kind):
    """A layer with activation, its twin without, same weights; and input."""
    rng = np.random.default_rng(0)
    if kind == "dense":
        make = lambda act: keras.layers.Dense(24, activation=act)  # noqa: E731
        shape, x = (None, 20), rng.normal(size=(3, 20)).astype("float32")
    elif kind == "einsum":
        make = lambda act: keras.layers.EinsumDense(  # noqa: E731
            "abc,cde->abde", (None, 3, 8), bias_axes="de", activation=act
        )
        shape, x = (None, 5, 20), rng.normal(size=(2, 5, 20)).astype("float32")
    else:
        make = lambda act: keras.layers.Embedding(30, 16)  # noqa: E731
        shape, x = (None, 4), rng.integers(0, 30, size=(2, 4)).astype("int32")
    adapted, plain = make("relu"), make(None)
    adapted.build(shape)
    plain.build(shape)
    for target, source in zip(plain.weights, adapted.weights):
        value = rng.normal(size=target.shape).astype("float32")
        target.assign(value)
        source.assign(value)
    return adapted, plain, x


ADAPTER_CLASS = {
    "dense": LowRankDense,
    "einsum": LowRankEinsumDense,
    "embedding": LowRankEmbedding,
}


@pytest.mark.parametrize("kind", ["dense", "einsum", "embedding"])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("order", ["quantize-then-adapt", "adapt-then-quantize"])
def test_forward_is_keras_quantized_matmul_plus_lowrank(kind, config, order):
    layer, plain, x = _twin_layers(kind)
    cls = ADAPTER_CLASS[kind]
    if order == "quantize-then-adapt":
        _quantize(layer, config)
        cls.from_layer(layer, rank=2, alpha=4)
    else:
        cls.from_layer(layer, rank=2, alpha=4)
        _quantize(layer, config)
    _quantize(plain, config)
    assert layer.quantization_mode == CONFIGS[config][0]
    assert type(layer) is cls
    rng = np.random.default_rng(1)
    a, b = layer.lowrank_A_default, layer.lowrank_B_default
    a.assign(rng.normal(size=a.shape).astype("float32"))
    b.assign(rng.normal(size=b.shape).astype("float32"))
    assert str(a.dtype) == "float32" and str(b.dtype) == "float32"

    if kind == "embedding":
        lowrank = _np(a)[x] @ _np(b)
        expected = _np(plain(x)) + 2.0 * lowrank
    elif kind == "dense":
        expected = np.maximum(_np(plain(x)) + 2.0 * (x @ _np(a) @ _np(b)), 0)
    else:
        lowrank = np.einsum("abr,rde->abde", x @ _np(a), _np(b))
        expected = np.maximum(_np(plain(x)) + 2.0 * lowrank, 0)
    np.testing.assert_allclose(_np(layer(x)), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kind", ["dense", "einsum", "embedding"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_dequantized_kernel_is_what_keras_multiplies_by(kind, config):
    layer, _, x = _twin_layers(kind)
    cls = ADAPTER_CLASS[kind]
    float_kernel = _np(cls.kernel_variable(layer)).copy()
    _quantize(layer, config)
    cls.from_layer(layer, rank=2)
    w = _np(quantization.dequantized_kernel(layer))
    assert w.shape == float_kernel.shape and w.dtype == np.float32
    # Within one quantization step of the float kernel it came from.
    levels = 127 if config == "int8" else 7
    assert np.abs(w - float_kernel).max() <= np.abs(float_kernel).max() / levels
    if CONFIGS[config][0] == "int4":
        # int4 is weight-only: Keras's output is exactly x·W_deq.
        base = _np(layer._base_output(x))
        if kind == "dense":
            reference = x @ w
        elif kind == "einsum":
            reference = np.einsum("abc,cde->abde", x, w)
        else:
            reference = w[x]
        np.testing.assert_allclose(base, reference, rtol=1e-5, atol=1e-5)


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((12,))
    hidden = keras.layers.Dense(16, activation="relu", name="hidden")(inputs)
    outputs = keras.layers.Dense(4, name="out")(hidden)
    return keras.Model(inputs, outputs)


def _data():
    rng = np.random.default_rng(3)
    return (
        rng.normal(size=(16, 12)).astype("float32"),
        rng.normal(size=(16, 4)).astype("float32"),
    )


def _quiet_quantize(model, mode, **kwargs):
    with warnings.catch_warnings():
        # Keras warns about layers it cannot quantize (the InputLayer).
        warnings.simplefilter("ignore")
        model.quantize(mode, **kwargs)


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("order", ["quantize-then-adapt", "adapt-then-quantize"])
def test_training_moves_only_the_factors(mode, order):
    model = _model()
    if order == "quantize-then-adapt":
        _quiet_quantize(model, mode)
    keras_lowrank.adapt(model, rank=2, targets=["hidden", "out"])
    if order == "adapt-then-quantize":
        _quiet_quantize(model, mode)
    names = sorted(w.path for w in model.trainable_weights)
    assert [n.rsplit("/", 2)[-2:] for n in names] == [
        ["hidden", "lowrank_A_default"],
        ["hidden", "lowrank_B_default"],
        ["out", "lowrank_A_default"],
        ["out", "lowrank_B_default"],
    ]
    kernels = [model.get_layer(n)._kernel for n in ("hidden", "out")]
    assert all(str(k.dtype) == "int8" for k in kernels)
    before = {w.path: _np(w).copy() for w in model.weights}
    x, y = _data()
    model.compile(keras.optimizers.Adam(0.01), "mse")
    model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    changed = sorted(w.path for w in model.weights
                     if not np.array_equal(_np(w), before[w.path]))
    assert changed == sorted(names)
    assert all(str(k.dtype) == "int8" for k in kernels)


def _tiny_bert():
    keras_hub = pytest.importorskip("keras_hub")
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=50,
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=8,
    )
    inputs = {
        "token_ids": np.arange(16).reshape(2, 8).astype("int32"),
        "segment_ids": np.zeros((2, 8), "int32"),
        "padding_mask": np.ones((2, 8), "int32"),
    }
    return backbone, inputs


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("kind", ["functional", "keras_hub"])
def test_keras_file_keeps_quantized_kernel_and_factors_bit_for_bit(
    mode, kind, tmp_path
):
    # (A quantized *subclassed* model does not reload in plain Keras either:
    # its config does not carry its layers' quantized dtype policies.)
    if kind == "functional":
        model, targets = _model(), ["hidden", "out"]
        x, y = _data()
    else:
        (model, x), targets = _tiny_bert(), ["query", "value", "segment_embedding"]
    keras_lowrank.adapt(model, rank=2, targets=targets)
    _quiet_quantize(model, mode)
    if kind == "functional":
        model.compile(keras.optimizers.Adam(0.01), "mse")
        model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    rng = np.random.default_rng(2)
    for layer in keras_lowrank.state.model_state.adapted_layers(model):
        b = layer.lowrank_B_default
        b.assign(rng.normal(size=b.shape).astype("float32"))
    path = os.path.join(tmp_path, "q.keras")
    model.save(path)
    loaded = keras_lowrank.load_model(path)
    saved = {w.path.split("/", 1)[-1]: _np(w) for w in model.weights}
    again = {w.path.split("/", 1)[-1]: _np(w) for w in loaded.weights}
    assert sorted(saved) == sorted(again)
    for key, value in saved.items():
        assert again[key].dtype == value.dtype, key
        np.testing.assert_array_equal(again[key], value, err_msg=key)
    layers = keras_lowrank.state.model_state.adapted_layers(loaded)
    assert len(layers) == len(targets) if kind == "keras_hub" else 2
    assert all(layer.quantization_mode == mode for layer in layers)
    assert sorted(w.name for w in loaded.trainable_weights) == sorted(
        w.name for w in model.trainable_weights
    )
    assert all("lowrank_" in w.name for w in loaded.trainable_weights)
    out, out_again = model(x), loaded(x)
    if kind == "keras_hub":
        out, out_again = out["sequence_output"], out_again["sequence_output"]
    np.testing.assert_array_equal(_np(out_again), _np(out))


# --- merge / unload -------------------------------------------------------------


def _adapted_quantized(mode):
    model = _model()
    keras_lowrank.adapt(model, rank=2, targets=["hidden", "out"])
    _quiet_quantize(model, mode)
    rng = np.random.default_rng(5)
    for name in ("hidden", "out"):
        b = model.get_layer(name).lowrank_B_default
        b.assign(0.1 * rng.normal(size=b.shape).astype("float32"))
    return model


MERGE_REFUSED = (
    "keras_lowrank: layer '{path}': the kernel is quantized ('{mode}'); "
    "merging adapters into it would be lossy and could not be undone. Use "
    "keras_lowrank.merge(model, quantized='dequantize') (float kernel, exact)"
    " or keras_lowrank.unload(model, quantized='requantize') (merged, then "
    "quantized again; the error is reported)."
)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_merge_and_unload_refuse_quantized_kernels_by_default(mode):
    model = _adapted_quantized(mode)
    path = model.get_layer("hidden").path
    message = re.escape(MERGE_REFUSED.format(path=path, mode=mode))
    with pytest.raises(ValueError, match=message):
        keras_lowrank.merge(model)
    with pytest.raises(ValueError, match=message):
        keras_lowrank.unload(model)
    # Nothing changed.
    assert all(
        model.get_layer(n).quantization_mode == mode for n in ("hidden", "out")
    )
    assert model.get_layer("hidden").merged_adapters == []
    with pytest.raises(ValueError, match=re.escape(
        "keras_lowrank: merge(quantized='requantize') is not a valid choice; "
        "use one of 'error', 'dequantize'. Re-quantizing is offered by "
        "unload() only: a re-quantized merge cannot be undone."
    )):
        keras_lowrank.merge(model, quantized="requantize")
    with pytest.raises(ValueError, match=re.escape(
        "keras_lowrank: unload(quantized='sometimes') is not a valid choice; "
        "use one of 'error', 'dequantize', 'requantize'."
    )):
        keras_lowrank.unload(model, quantized="sometimes")


def test_merge_dequantize_is_exact_and_reversible():
    # int4 is weight-only, so the dequantized float layer computes exactly
    # what the quantized one did.
    model = _adapted_quantized("int4")
    x, _ = _data()
    before = _np(model(x))
    dequantized = _np(quantization.dequantized_kernel(model.get_layer("out")))
    keras_lowrank.merge(model, quantized="dequantize")
    layer = model.get_layer("out")
    assert layer.quantization_mode is None
    assert str(layer._kernel.dtype) == "float32"
    assert layer.merged_adapters == ["default"]
    np.testing.assert_allclose(_np(model(x)), before, rtol=1e-5, atol=1e-5)
    keras_lowrank.unmerge(model)
    np.testing.assert_allclose(_np(layer._kernel), dequantized, atol=1e-6)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_unload_requantize_reports_the_merge_error(mode):
    model = _adapted_quantized(mode)
    x, _ = _data()
    before = _np(model(x))
    with pytest.warns(UserWarning, match=(
        r"keras_lowrank: re-quantized 2 merged kernel\(s\); the largest change"
        r" is [0-9.e-]+ \([0-9.]+% of the largest \|W\|\) in layer '.+' "
        rf"\({mode}\). Outputs change accordingly; use quantized='dequantize'"
        " to keep exact float kernels."
    )):
        keras_lowrank.unload(model, quantized="requantize")
    for name in ("hidden", "out"):
        layer = model.get_layer(name)
        assert type(layer) is keras.layers.Dense
        assert layer.quantization_mode == mode
    error = np.abs(_np(model(x)) - before).max()
    assert 0 < error < (0.1 if mode == "int8" else 0.5)


def test_unload_dequantize_gives_plain_float_layers():
    model = _adapted_quantized("int4")
    x, _ = _data()
    before = _np(model(x))
    keras_lowrank.unload(model, quantized="dequantize")
    layer = model.get_layer("hidden")
    assert type(layer) is keras.layers.Dense
    assert layer.quantization_mode is None
    np.testing.assert_allclose(_np(model(x)), before, rtol=1e-5, atol=1e-5)


# --- refused modes and states ---------------------------------------------------


REFUSED = (
    "keras_lowrank: layer '{path}': cannot {action} '{mode}': {reason}. "
    "Adapters support 'int8' and 'int4' bases. Use one of those, or leave "
    "this layer out (`exclude=` in adapt(), `filters=` in model.quantize())."
)


@pytest.mark.parametrize("mode", ["float8", "gptq/4/-1", "awq/4/-1"])
def test_adapting_float8_gptq_awq_layers_is_refused(mode):
    layer = keras.layers.Dense(8, dtype=f"{mode}_from_float32", name="q")
    model = keras.Sequential([keras.Input((16,)), layer, keras.layers.Dense(2)])
    short = mode.split("/")[0]
    message = REFUSED.format(
        path="q",
        action="adapt a layer quantized with",
        mode=short,
        reason=quantization.REFUSED_MODES[short],
    )
    with pytest.raises(TypeError, match=re.escape(message)):
        keras_lowrank.adapt(model, rank=2, targets=["q"])
    assert type(layer) is keras.layers.Dense


def test_quantizing_an_adapted_model_to_float8_is_refused_whole():
    model = _model()
    keras_lowrank.adapt(model, rank=2, targets=["hidden"])
    message = REFUSED.format(
        path=model.get_layer("hidden").path,
        action="quantize an adapted layer to",
        mode="float8",
        reason=quantization.REFUSED_MODES["float8"],
    )
    with pytest.raises(TypeError, match=re.escape(message)):
        model.quantize("float8")
    # All or nothing: the plain layer was not quantized either.
    assert model.get_layer("out").quantization_mode is None
    with pytest.raises(TypeError, match=re.escape(message)):
        model.get_layer("hidden").quantize("float8")
    # Filters that leave the adapted layer out are fine.
    model.quantize("float8", filters="out")
    assert model.get_layer("out").quantization_mode == "float8"
    assert model.get_layer("hidden").quantization_mode is None


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantizing_an_adapted_model_frees_its_float_kernels(mode):
    """After `model.quantize`, nothing of keras_lowrank's keeps the replaced
    float kernels alive (the compiled-function record held every variable:
    an int8 SmolLM2 base kept a second float copy of the model in memory)."""
    import gc
    import weakref

    model = _model()
    keras_lowrank.adapt(model, rank=2, targets=["hidden"])
    model.compile(optimizer="sgd", loss="mse")
    x, y = _data()
    model.predict_on_batch(x)  # traced functions for this graph exist
    model.train_on_batch(x, y)
    kernels = [weakref.ref(keras_lowrank.keras_private.kernel_of(model.get_layer(n)))
               for n in ("hidden", "out")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.quantize(mode)
    gc.collect()
    assert [k() is None for k in kernels] == [True, True]
    # The model still trains and predicts with its new integer kernels.
    model.compile(optimizer="sgd", loss="mse")
    assert np.isfinite(model.train_on_batch(x, y))
    assert model.predict_on_batch(x).shape == (16, 4)


def test_quantizing_merged_adapters_is_refused():
    model = _model()
    keras_lowrank.adapt(model, rank=2, targets=["hidden"])
    keras_lowrank.merge(model)
    path = model.get_layer("hidden").path
    with pytest.raises(ValueError, match=re.escape(
        f"keras_lowrank: layer '{path}': adapters ['default'] are merged into "
        "the kernel; quantizing now would bake them into the integer kernel "
        "for good. Call keras_lowrank.unmerge(model) first, then quantize."
    )):
        model.quantize("int8")
    assert model.get_layer("out").quantization_mode is None


def test_pissa_on_a_quantized_kernel_is_refused():
    model = _model()
    _quiet_quantize(model, "int8")
    path = model.get_layer("hidden").path
    with pytest.raises(ValueError, match=re.escape(
        f"keras_lowrank: layer '{path}': init='pissa' rewrites the kernel, "
        "which is quantized ('int8') and cannot be rewritten. Adapt the float "
        "model first, then `model.quantize(...)`: the residual kernel gets "
        "quantized."
    )):
        keras_lowrank.adapt(model, rank=2, targets=["hidden"], init="pissa")
    assert type(model.get_layer("hidden")) is keras.layers.Dense


def test_pissa_then_quantize_quantizes_the_residual():
    model = _model()
    keras_lowrank.adapt(model, rank=2, targets=["hidden"], init="pissa")
    _quiet_quantize(model, "int8")
    x, y = _data()
    model.compile("adam", "mse")
    model.fit(x, y, epochs=1, verbose=0)
    assert model.get_layer("hidden").quantization_mode == "int8"


def test_dora_on_a_quantized_base_trains():
    model = _model()
    keras_lowrank.adapt(model, rank=2, targets=["hidden"], method="dora")
    _quiet_quantize(model, "int4")
    x, y = _data()
    model.compile(keras.optimizers.Adam(0.01), "mse")
    history = model.fit(x, y, epochs=3, batch_size=16, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_unloading_restores_keras_quantize():
    model = _model()
    keras_lowrank.adapt(model, rank=2, targets=["hidden"])
    keras_lowrank.unload(model)
    # The plain layer and model quantize as Keras does, without our hooks.
    assert not hasattr(model.__dict__["quantize"], "_keras_lowrank")
    assert not hasattr(model.get_layer("hidden").__dict__["quantize"],
                       "_keras_lowrank")
    _quiet_quantize(model, "int8")
    assert model.get_layer("hidden").quantization_mode == "int8"


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("verb", ["merge", "unload"])
def test_a_fault_after_dequantizing_gives_back_the_exact_quantized_model(
    mode, verb, monkeypatch
):
    # merge(quantized="dequantize") and unload(quantized="requantize") swap
    # the integer kernels for float ones first; a fault at the second
    # layer's merge must leave both layers quantized, bit for bit.
    from _lifecycle_helpers import assert_same_snapshot
    from _lifecycle_helpers import model_snapshot

    from keras_lowrank.layers import LowRankLayer

    model = _adapted_quantized(mode)
    x, _ = _data()
    expected = _np(model(x))
    before = model_snapshot(model)
    original = LowRankLayer.merge
    calls = []

    def faulty(self, *args, **kwargs):
        calls.append(self.path)
        if len(calls) == 2:
            raise MemoryError("injected: merge")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LowRankLayer, "merge", faulty)
    policy = "dequantize" if verb == "merge" else "requantize"
    with pytest.raises(MemoryError, match="injected"):
        getattr(keras_lowrank, verb)(model, quantized=policy)
    monkeypatch.undo()
    assert len(calls) == 2
    assert [model.get_layer(n).quantization_mode for n in ("hidden", "out")] == [mode, mode]
    assert_same_snapshot(before, model_snapshot(model))
    np.testing.assert_array_equal(_np(model(x)), expected)
