"""`delta_spectrum` and `extract` against NumPy's SVD, over the model kinds.

The reference is always the documented matrix form of ΔW (input-side axes ×
output-side axes, conv window × input channels → filters), built here
independently of the package with `numpy.transpose`/`reshape`.
"""

import os

import keras
import numpy as np
import pytest

import keras_lowrank
from keras_lowrank.analysis import delta_spectrum
from keras_lowrank.analysis import extract

import model_kinds
from test_einsum_factorization import EQUATIONS
from test_einsum_factorization import _shape
from test_einsum_factorization import _split


def _matrix(kernel, batch, inputs, outputs):
    """ΔW as (*batch, d, k): the reference matrix form, by axis letters."""
    kernel = np.asarray(kernel, np.float64)
    perm = list(batch) + list(inputs) + list(outputs)
    moved = np.transpose(kernel, perm)
    lead = moved.shape[: len(batch)]
    d = int(np.prod([kernel.shape[i] for i in inputs]))
    return moved.reshape(lead + (d, -1))


def _roundtrip(model, tmp_path):
    """A second model object of the same architecture (same layer paths)."""
    path = os.path.join(tmp_path, "copy.keras")
    model.save(path)
    return keras_lowrank.load_model(path)


def _kernel(layer):
    return keras.ops.convert_to_numpy(layer.kernel)


def _perturb(layer, rng, rank=None):
    """Adds to `layer`'s kernel a random update (of rank `rank` in the
    layer's matrix form, if given) and returns that update."""
    kernel = _kernel(layer)
    delta = rng.normal(size=kernel.shape).astype("float32")
    layer.kernel.assign(kernel + delta)
    return delta


def _einsum_layer(equation):
    inputs, _, output = _split(equation)
    out_shape = _shape(output[3:]) if output.startswith("...") else _shape(output)[1:]
    layer = keras.layers.EinsumDense(equation, out_shape, name="einsum")
    layer.build(_shape(inputs))
    return layer


@pytest.mark.parametrize(
    "equation,batch,inputs,outputs", EQUATIONS, ids=[e[0] for e in EQUATIONS]
)
def test_einsum_spectrum_is_numpy_svd_of_the_documented_matrix(
    equation, batch, inputs, outputs
):
    layers = [_einsum_layer(equation) for _ in range(2)]
    layers[1].set_weights(layers[0].get_weights())
    delta = _perturb(layers[1], np.random.default_rng(0))
    spectrum = delta_spectrum(keras.Sequential([layers[0]]),
                              keras.Sequential([layers[1]]))["einsum"]
    kernel = _split(equation)[1]
    axes = lambda letters: [kernel.index(c) for c in letters]  # noqa: E731
    ref = _matrix(delta, axes(batch), axes(inputs), axes(outputs))
    expected = np.linalg.svd(ref, compute_uv=False)
    np.testing.assert_allclose(spectrum.singular_values, expected, rtol=1e-5, atol=1e-6)
    assert (spectrum.d, spectrum.k) == ref.shape[-2:]
    assert not spectrum.exact


@pytest.mark.parametrize("cls,shape", [
    (keras.layers.Conv2D, (None, 6, 6, 3)),
    (keras.layers.Conv1D, (None, 7, 4)),
    (keras.layers.Dense, (None, 5)),
])
def test_conv_and_dense_spectrum_is_numpy_svd(cls, shape):
    kwargs = {"filters": 6, "kernel_size": 3} if cls is not keras.layers.Dense else {"units": 6}
    layers = []
    for _ in range(2):
        layer = cls(**kwargs, name="layer")
        layer.build(shape)
        layers.append(layer)
    base, tuned = keras.Sequential([layers[0]]), keras.Sequential([layers[1]])
    layers[1].set_weights(layers[0].get_weights())
    delta = _perturb(layers[1], np.random.default_rng(1))
    spectrum = delta_spectrum(base, tuned)["layer"]
    ref = delta.reshape(-1, delta.shape[-1])  # (kh·kw·c_in) × c_out
    np.testing.assert_allclose(
        spectrum.singular_values, np.linalg.svd(ref, compute_uv=False), rtol=1e-5
    )
    assert (spectrum.d, spectrum.k) == ref.shape


def _adapted_pair(rank=3, **adapt_kwargs):
    """A Dense+EinsumDense model and an adapted copy with non-zero factors."""
    def build():
        return keras.Sequential([
            keras.Input((4, 12)),
            keras.layers.Dense(10, name="dense"),
            keras.layers.EinsumDense("abc,cde->abde", (4, 2, 5), name="proj"),
        ], name="pair")
    base = build()
    tuned = build()
    tuned.set_weights(base.get_weights())
    keras_lowrank.adapt(tuned, rank=rank, targets=["dense", "proj"], **adapt_kwargs)
    rng = np.random.default_rng(2)
    for layer in tuned.layers:
        for v in layer.adapter_variables("default").values():
            v.assign(rng.normal(size=v.shape).astype("float32"))
    return base, tuned


def _sab(layer, name="default"):
    layout = layer.lowrank_layout
    spec = layer.adapter_spec(name)
    v = layer.adapter_variables(name)
    a = keras.ops.convert_to_numpy(v["A"]).reshape(layout.d, -1).astype(np.float64)
    b = keras.ops.convert_to_numpy(v["B"]).reshape(-1, layout.k).astype(np.float64)
    return spec.scale * a @ b


@pytest.mark.parametrize("scaling", ["standard", "rslora"])
def test_adapted_spectrum_is_exact_svd_of_sab(scaling):
    base, tuned = _adapted_pair(alpha=6, scaling=scaling)
    for result in (delta_spectrum(base, tuned), delta_spectrum(tuned)):
        for layer in tuned.layers:
            spectrum = result[layer.name]
            assert spectrum.exact
            expected = np.linalg.svd(_sab(layer), compute_uv=False)
            np.testing.assert_allclose(
                spectrum.singular_values, expected, rtol=1e-5, atol=1e-5
            )
            # rank 3: all the energy at rank 3, none past it.
            assert spectrum.rank_for(0.999999) == 3
            assert spectrum.energy(3) == pytest.approx(1.0)
    assert delta_spectrum(base, tuned).changed_weights == []


def test_two_adapters_of_one_base_compare_exactly(tmp_path):
    base, tuned = _adapted_pair()
    other = _roundtrip(tuned, tmp_path)
    for layer in other.layers:
        v = layer.adapter_variables("default")["B"]
        v.assign(keras.ops.convert_to_numpy(v) * 2.0)
    result = delta_spectrum(tuned, other)
    for layer in tuned.layers:
        expected = np.linalg.svd(_sab(layer), compute_uv=False)  # 2·sAB − sAB
        np.testing.assert_allclose(result[layer.name].singular_values, expected, rtol=1e-5, atol=1e-5)
        assert result[layer.name].exact


def test_spectrum_statistics_and_outputs(tmp_path):
    base, tuned = _adapted_pair()
    result = delta_spectrum(base, tuned)
    layer = result["dense"]
    s = layer.singular_values
    assert layer.stable_rank == pytest.approx((s**2).sum() / s[0] ** 2)
    p = s[s > 0] / s.sum()
    assert layer.effective_rank == pytest.approx(np.exp(-(p * np.log(p)).sum()))
    assert layer.parameters(3) == (12 * 10, 3 * 22)
    table = result.table(ranks=(1, 3))
    assert "dense" in table and "r=3" in table and "100.0%" in table and "median" in table
    import json

    data = json.loads(result.to_json())
    assert [entry["path"] for entry in data["layers"]] == ["dense", "proj"]
    assert data["layers"][0]["rank_for_energy"]["0.99"] == layer.rank_for(0.99)
    pytest.importorskip("matplotlib")
    out = os.path.join(tmp_path, "spectrum.png")
    result.plot(out)
    assert os.path.getsize(out) > 1000


def test_spectrum_refusals(tmp_path):
    base, tuned = _adapted_pair()
    with pytest.raises(ValueError, match="has no adapters, so with tuned=None"):
        delta_spectrum(base)
    other = keras.Sequential([keras.Input((4, 12)), keras.layers.Dense(10, name="other")])
    with pytest.raises(ValueError, match="layer 'dense' of the base model 'pair' has no counterpart"):
        delta_spectrum(base, other)
    wide = keras.Sequential([
        keras.Input((4, 12)), keras.layers.Dense(11, name="dense"),
        keras.layers.EinsumDense("abc,cde->abde", (4, 2, 5), name="proj"),
    ])
    with pytest.raises(ValueError, match=r"layer 'dense' has kernel shape \(12, 10\) in the base model but \(12, 11\)"):
        delta_spectrum(base, wide)
    with pytest.raises(KeyError, match="no changed layer 'nope'"):
        delta_spectrum(base, tuned)["nope"]


# --- extract ------------------------------------------------------------------


def _full_finetune(kind, tmp_path, rank=None):
    base = kind.build()
    tuned = _roundtrip(base, tmp_path)
    rng = np.random.default_rng(3)
    for visit in keras_lowrank.surgery.walk.walk(tuned):
        layer = visit.layer
        if isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense,
                              keras.layers.Conv1D)):
            layer.kernel.assign(_kernel(layer) + 0.1 * rng.normal(size=layer.kernel.shape))
            if layer.bias is not None:
                layer.bias.assign(keras.ops.convert_to_numpy(layer.bias) + 0.1)
    return base, tuned


KINDS = ["sequential", "functional", "subclassed", "bert_classifier"]


@pytest.mark.parametrize("kind", KINDS)
def test_extract_reaches_eckart_young_and_merges_to_truncated_update(kind, tmp_path):
    kind = model_kinds.KINDS[kind]
    if kind.hub:
        pytest.importorskip("keras_hub")
    base, tuned = _full_finetune(kind, tmp_path)
    before = {v.path: _kernel(v.layer) for v in keras_lowrank.surgery.walk.walk(base)
              if hasattr(v.layer, "kernel") and v.layer.weights}
    spectrum = delta_spectrum(base, tuned)
    result = extract(base, tuned, rank=2, name="x")
    assert result.layers, "nothing extracted"
    for row in result.layers:
        s = spectrum[row.path].singular_values
        bound = np.sqrt((s[..., 2:] ** 2).sum() / (s**2).sum())
        assert row.bound == pytest.approx(bound, rel=1e-9)
        assert row.error == pytest.approx(bound, abs=1e-5)
    x = kind.inputs()
    adapted = keras.ops.convert_to_numpy(base(x))
    keras_lowrank.merge(base)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(base(x)), adapted, atol=1e-4)
    for row in result.layers:
        layer = keras_lowrank.surgery.walk.find_layer(base, row.path)
        layout = layer.lowrank_layout
        from keras_lowrank.analysis.deltas import to_matrix
        full = to_matrix(layout, _kernel(keras_lowrank.surgery.walk.find_layer(tuned, row.path)) - before[row.path])
        u, s, vt = np.linalg.svd(full, full_matrices=False)
        truncated = (u[..., :, :2] * s[..., None, :2]) @ vt[..., :2, :]
        merged = to_matrix(layout, _kernel(layer)) - to_matrix(layout, before[row.path])
        np.testing.assert_allclose(merged, truncated, atol=1e-5)


def test_extract_energy_picks_the_smallest_rank_and_records_it(tmp_path):
    base, tuned = _full_finetune(model_kinds.KINDS["sequential"], tmp_path)
    spectrum = delta_spectrum(base, tuned)
    result = extract(base, tuned, energy=0.8)
    for row in result.layers:
        assert row.rank == spectrum[row.path].rank_for(0.8)
        assert row.energy >= 0.8 > spectrum[row.path].energy(row.rank - 1)
    path = os.path.join(tmp_path, "x.safetensors")
    keras_lowrank.save_adapter(base, path)
    config = keras_lowrank.read_adapter_config(path)
    assert config["adapter"]["rank_pattern"] == {r.path: r.rank for r in result.layers}


def test_extract_keeps_changed_weights_and_round_trips_as_a_file(tmp_path):
    """At full rank with the changed biases and head kept, the adapter file
    on a fresh base reproduces the tuned model."""
    kind = model_kinds.KINDS["sequential"]
    base, tuned = _full_finetune(kind, tmp_path)
    fresh = _roundtrip(base, tmp_path)
    result = extract(base, tuned, rank=16, keep_changed=True, name="full")
    assert set(result.kept) == set(result.changed_weights)
    # Outside KerasHub every Dense is a target, the output layer too; the
    # rank is capped at each kernel's min(d, k).
    assert [(r.path, r.rank) for r in result.layers] == [("hidden", 8), ("hidden2", 16), ("out", 3)]
    x = kind.inputs()
    want = keras.ops.convert_to_numpy(tuned(x))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(base(x)), want, atol=1e-4)
    path = os.path.join(tmp_path, "full.safetensors")
    keras_lowrank.save_adapter(base, path)
    keras_lowrank.load_adapter(fresh, path)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(fresh(x)), want, atol=1e-4)
    # The file reloads in a .keras round trip of the adapted model too.
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(_roundtrip(fresh, tmp_path)(x)), want, atol=1e-4
    )


def test_extract_keep_changed_by_layer_and_false(tmp_path):
    base, tuned = _full_finetune(model_kinds.KINDS["sequential"], tmp_path)
    other = _roundtrip(base, tmp_path)
    result = extract(base, tuned, rank=1, keep_changed=["hidden"], name="some")
    assert result.kept == ("hidden/bias",)
    result = extract(other, tuned, rank=1)
    assert result.kept == () and "hidden/bias" in result.changed_weights


def _state(model):
    return [keras.ops.convert_to_numpy(w).copy() for w in model.weights], [
        getattr(layer, "adapter_names", None) for layer in model.layers
    ]


def _same(a, b):
    assert a[1] == b[1]
    assert len(a[0]) == len(b[0])
    for x, y in zip(*[s[0] for s in (a, b)]):
        np.testing.assert_array_equal(x, y)


def test_extract_refusals_leave_the_base_unchanged(tmp_path, monkeypatch):
    base, tuned = _full_finetune(model_kinds.KINDS["sequential"], tmp_path)
    before = _state(base)
    cases = [
        ({}, "exactly one of rank= .* or energy="),
        ({"rank": 2, "energy": 0.9}, "exactly one of rank="),
        ({"rank": 0}, "rank must be a positive int; got 0"),
        ({"rank": 2.5}, "rank must be a positive int; got 2.5"),
        ({"energy": 1.5}, r"energy must be a fraction in \(0, 1\]"),
        ({"energy": 0}, r"energy must be a fraction in \(0, 1\]"),
        ({"rank": 2, "name": "bad name"}, "adapter name"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            extract(base, tuned, **kwargs)
        _same(_state(base), before)
    with pytest.raises(ValueError, match="nothing to extract"):
        extract(base, _roundtrip(base, tmp_path), rank=2)
    _same(_state(base), before)
    # A failure half-way through installing rolls everything back.
    from keras_lowrank.layers import base as layer_base

    calls = []
    original = layer_base.LowRankLayer.add_adapter

    def failing(self, *args, **kwargs):
        calls.append(self.name)
        if len(calls) == 2:
            raise MemoryError("out of memory")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(layer_base.LowRankLayer, "add_adapter", failing)
    with pytest.raises(MemoryError):
        extract(base, tuned, rank=2, keep_changed=True)
    monkeypatch.undo()
    assert not hasattr(base, "_keras_lowrank") or not base._keras_lowrank.options
    _same(_state(base), before)
    extract(base, tuned, rank=2, name="first")
    with pytest.raises(ValueError, match="has active adapters \\['first'\\]"):
        extract(base, tuned, rank=2, name="second")


def test_extract_from_an_adapted_model_is_exact_without_a_dense_svd(tmp_path):
    base, tuned = _adapted_pair(rank=3)
    result = extract(base, tuned, rank=3)
    x = np.random.default_rng(0).normal(size=(2, 4, 12)).astype("float32")
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(base(x)), keras.ops.convert_to_numpy(tuned(x)), atol=1e-4
    )
    assert all(row.bound == pytest.approx(0.0, abs=1e-7) for row in result.layers)


def test_dora_update_is_measured_densely_and_equals_the_merge_delta():
    base, tuned = _adapted_pair(method="dora")
    result = delta_spectrum(base, tuned)
    for layer in tuned.layers:
        spectrum = result[layer.name]
        assert not spectrum.exact  # DoRA's ΔW is not a product A·B
        from keras_lowrank.analysis.deltas import to_matrix

        delta = to_matrix(layer.lowrank_layout, keras.ops.convert_to_numpy(layer.delta("default")))
        np.testing.assert_allclose(
            spectrum.singular_values, np.linalg.svd(delta, compute_uv=False),
            rtol=1e-4, atol=1e-5,
        )


def test_quantized_base_shared_is_exact_and_differing_is_refused(tmp_path):
    def build():
        return keras.Sequential([keras.Input((12,)), keras.layers.Dense(10, name="dense")],
                                name="q")
    base = build()
    base.quantize("int8")
    tuned = _roundtrip(base, tmp_path)
    keras_lowrank.adapt(tuned, rank=2, targets=["dense"])
    b = tuned.layers[0].adapter_variables("default")["B"]
    b.assign(np.ones(b.shape, "float32"))
    spectrum = delta_spectrum(base, tuned)["dense"]
    assert spectrum.exact and spectrum.rank_for(0.999) <= 2
    other = build()
    other.quantize("int8")
    with pytest.raises(ValueError, match="layer 'dense' has a quantized kernel that differs"):
        delta_spectrum(base, other)


def test_load_model_or_preset_reads_both_kinds(tmp_path):
    from keras_lowrank.analysis import load_model_or_preset

    pytest.importorskip("keras_hub")
    import keras_hub

    task = model_kinds.KINDS["llama_causal_lm"].build()
    task.save_to_preset(str(tmp_path / "task"))
    assert isinstance(load_model_or_preset(str(tmp_path / "task")), keras_hub.models.CausalLM)
    task.backbone.save_to_preset(str(tmp_path / "backbone"))
    assert isinstance(load_model_or_preset(str(tmp_path / "backbone")), keras_hub.models.Backbone)
    path = str(tmp_path / "m.keras")
    keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]).save(path)
    assert isinstance(load_model_or_preset(path), keras.Sequential)
    with pytest.raises(FileNotFoundError, match="no such file or folder: 'nope'"):
        load_model_or_preset("nope")
    open(tmp_path / "weights.h5", "w").close()
    with pytest.raises(ValueError, match="is not a .keras file or a preset folder"):
        load_model_or_preset(str(tmp_path / "weights.h5"))


def test_a_preset_naming_an_unknown_task_is_refused(tmp_path):
    from keras_lowrank.analysis import load_model_or_preset

    pytest.importorskip("keras_hub")
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "task.json").write_text('{"registered_name": "nowhere>Nothing"}')
    with pytest.raises(ValueError, match=(
        "names task 'nowhere>Nothing', which is not a KerasHub task class")):
        load_model_or_preset(str(folder))
