"""Named adapters: adding, switching, disabling, deleting, merging, owned
values (heads, biases) and training after a switch, on the current backend.
Outputs are checked against NumPy closed forms `x·(W + Σ s·A·B) + b`."""

import re

import keras
import numpy as np
import pytest
from _lifecycle_helpers import assert_same_snapshot
from _lifecycle_helpers import bert_inputs
from _lifecycle_helpers import delta
from _lifecycle_helpers import mlp
from _lifecycle_helpers import model_snapshot
from _lifecycle_helpers import randomize
from _lifecycle_helpers import reference_mlp
from _lifecycle_helpers import tiny_bert
from _lifecycle_helpers import to_np

import keras_lowrank as kl

X = np.random.default_rng(1).normal(size=(6, 8)).astype("float32")


def two_adapter_mlp():
    model = mlp(outputs=4)
    kl.adapt(model, rank=2, alpha=4, name="a", targets=["d1", "d2"], seed=1)
    kl.adapt(model, rank=3, name="b", targets=["d2", "out"], seed=2)
    randomize(model)
    return model


def predict(model, x=X):
    return to_np(model(x, training=False))


# --- named adapters and switching ---------------------------------------------


def test_adapt_with_a_name_adds_an_adapter_that_becomes_the_only_active():
    model = two_adapter_mlp()
    d1, d2, out = (model.get_layer(n) for n in ("d1", "d2", "out"))
    assert d1.adapter_names == ["a"] and d2.adapter_names == ["a", "b"]
    assert out.adapter_names == ["b"]
    assert d1.active_adapters == [] and d2.active_adapters == ["b"]
    assert model._keras_lowrank.active == ["b"]
    np.testing.assert_allclose(predict(model), reference_mlp(model, X, ["b"]), atol=1e-5)


@pytest.mark.parametrize("names", ["a", "b", ["a", "b"], ["b", "a"]])
def test_set_adapter_matches_the_closed_form(names):
    model = two_adapter_mlp()
    kl.set_adapter(model, names)
    active = [names] if isinstance(names, str) else names
    assert model._keras_lowrank.active == active
    np.testing.assert_allclose(predict(model), reference_mlp(model, X, active), atol=1e-5)
    trainable = {v.path.split("/", 1)[-1] for v in model.trainable_variables}
    expected = {
        f"{layer.name}/lowrank_{k}_{n}"
        for layer in model.layers
        for n in active
        if n in getattr(layer, "adapter_names", [])
        for k in "AB"
    }
    assert trainable == expected


def test_set_adapter_errors():
    model = two_adapter_mlp()
    with pytest.raises(ValueError, match=r"has no adapter named 'c'; it has \['a', 'b'\]"):
        kl.set_adapter(model, "c")
    with pytest.raises(ValueError, match="adapter 'a' is listed twice; each active adapter counts once"):
        kl.set_adapter(model, ["a", "a"])
    with pytest.raises(ValueError, match=r"needs at least one adapter name.*disable_adapters"):
        kl.set_adapter(model, [])
    kl.merge(model)  # b merged
    with pytest.raises(ValueError, match=r"adapter 'b' is merged into layer 'd2'; call keras_lowrank.unmerge\(model\)"):
        kl.set_adapter(model, "a")
    assert model._keras_lowrank.active == ["b"]


def test_disable_adapters_runs_the_base_model_and_restores_everything():
    model = two_adapter_mlp()
    kl.set_adapter(model, ["a", "b"])
    expected = predict(model)
    kl.merge(model)
    kernels = [to_np(layer.kernel).copy() for layer in model.layers]
    with kl.disable_adapters(model):
        np.testing.assert_allclose(predict(model), reference_mlp(model, X, []), atol=1e-5)
        assert model.trainable_variables == []
        with kl.disable_adapters(model):  # nesting is harmless
            pass
        assert model.get_layer("d2").merged_adapters == []
    assert model.get_layer("d2").merged_adapters == ["a", "b"]
    for layer, kernel in zip(model.layers, kernels):  # put back bit for bit
        np.testing.assert_array_equal(to_np(layer.kernel), kernel)
    np.testing.assert_allclose(predict(model), expected, atol=1e-5)
    with pytest.raises(RuntimeError, match="boom"):
        with kl.disable_adapters(model):
            raise RuntimeError("boom")
    assert model._keras_lowrank.active == ["a", "b"]
    np.testing.assert_allclose(predict(model), expected, atol=1e-5)


INSIDE_DISABLE = {
    "delete_adapter": lambda m: kl.delete_adapter(m, "b"),
    "unload": lambda m: kl.unload(m),
    "set_adapter": lambda m: kl.set_adapter(m, "a"),
    "merge": lambda m: kl.merge(m),
    "unmerge": lambda m: kl.unmerge(m),
    "adapt": lambda m: kl.adapt(m, rank=2, name="c", targets=["d1"]),
    "combine": lambda m: kl.combine(m, ["a", "b"], [1, 1], "mix", how="cat"),
}


@pytest.mark.parametrize("verb", list(INSIDE_DISABLE))
def test_verbs_that_change_adapters_are_refused_inside_disable_adapters(verb):
    model = two_adapter_mlp()
    expected = predict(model)
    before = model_snapshot(model)
    with kl.disable_adapters(model):
        with pytest.raises(ValueError, match=re.escape(
            f"keras_lowrank: {verb}() was called inside "
            "`keras_lowrank.disable_adapters(model)` on model 'mlp'. The "
            "context switches every adapter off for its duration and puts "
            f"them back on exit; leave the context first, then call {verb}()."
        )):
            INSIDE_DISABLE[verb](model)
    assert_same_snapshot(before, model_snapshot(model))
    np.testing.assert_array_equal(predict(model), expected)
    # Not stuck: the next context disables again, and the verb works outside.
    with kl.disable_adapters(model):
        np.testing.assert_allclose(predict(model), reference_mlp(model, X, []), atol=1e-5)
    INSIDE_DISABLE[verb](model)


def test_saving_inside_disable_adapters_is_refused_and_works_outside(tmp_path):
    model = two_adapter_mlp()
    kl.merge(model)
    expected = predict(model)
    path = str(tmp_path / "m.keras")
    with kl.disable_adapters(model):
        with pytest.raises(ValueError, match=re.escape(
            "model 'mlp' is inside `keras_lowrank.disable_adapters(model)`, "
            "where its adapters are switched off; a file saved now would "
            "reload as the base model. Save it outside the context"
        )):
            model.save(path)
    model.save(path)
    loaded = kl.load_model(path, compile=False)
    np.testing.assert_allclose(predict(loaded), expected, atol=1e-5)
    assert loaded.get_layer("d2").active_adapters == ["b"]


def test_deleting_a_pissa_adapter_refused_at_a_later_layer_changes_nothing():
    # Issue 12, fix 1: d1 used to be reverted before d2 refused.
    model = mlp()
    kl.adapt(model, rank=2, name="p", targets=["d1", "d2"], init="pissa", seed=1)
    kl.adapt(model, rank=2, name="q", targets=["d2"], method="dora", seed=2)
    randomize(model)
    kl.set_adapter(model, ["p", "q"])
    expected = predict(model)
    before = model_snapshot(model)
    with pytest.raises(ValueError, match=(
        r"layer '(mlp/)?d2': deleting the init='pissa' adapter 'p' restores "
        r"the kernel, which would change the DoRA adapter 'q'"
    )):
        kl.delete_adapter(model, "p")
    assert_same_snapshot(before, model_snapshot(model))
    np.testing.assert_array_equal(predict(model), expected)
    kl.delete_adapter(model, "q")
    kl.delete_adapter(model, "p")
    assert type(model) is keras.Sequential


def test_adapting_a_model_that_holds_an_adapted_model_is_refused():
    # Issue 12, fix 6: the inner adapter used to be switched off silently.
    inner = mlp(name="inner")
    kl.adapt(inner, rank=2, targets=["d1"], seed=1)
    randomize(inner)
    outer = keras.Sequential(
        [keras.Input((8,)), inner, keras.layers.Dense(3, name="head")],
        name="outer",
    )
    expected = predict(outer)
    with pytest.raises(ValueError, match=re.escape(
        "layer 'inner' of model 'outer' is an adapted model itself; adapters "
        "of nested models cannot be managed from the outer model."
    )):
        kl.adapt(outer, rank=2, targets=["head"])
    assert not hasattr(outer, "_keras_lowrank") and type(outer) is keras.Sequential
    assert inner.get_layer("d1").active_adapters == ["default"]
    np.testing.assert_array_equal(predict(outer), expected)
    kl.unload(inner)  # the way the message offers
    kl.adapt(outer, rank=2, targets=["head"])
    assert type(inner) is keras.Sequential


def test_bad_argument_types_name_the_argument():
    model = two_adapter_mlp()
    with pytest.raises(TypeError, match=re.escape(
        "set_adapter() takes `names` as an adapter name or a list of names, "
        "got NoneType (None). Pass one of ['a', 'b']; to run the base model, "
        "use `with keras_lowrank.disable_adapters(model):`."
    )):
        kl.set_adapter(model, None)
    with pytest.raises(TypeError, match=re.escape(
        "set_adapter() takes adapter names as strings, got int (1) in `names`"
    )):
        kl.set_adapter(model, ["a", 1])
    with pytest.raises(TypeError, match=re.escape(
        "delete_adapter() takes adapter names as strings, got list (['a']) in `name`"
    )):
        kl.delete_adapter(model, ["a"])
    with pytest.raises(TypeError, match=re.escape(
        "save_adapter() takes adapter names as strings, got int (3) in `name`"
    )):
        kl.save_adapter(model, "unused.safetensors", 3)
    with pytest.raises(TypeError, match=re.escape(
        "combine() takes `weights` as 2 number(s), one per adapter in "
        "['a', 'b'], got NoneType (None). Pass e.g. weights=[1.0, 1.0]."
    )):
        kl.combine(model, ["a", "b"], None, "mix", how="cat")
    with pytest.raises(TypeError, match=re.escape(
        "combine() takes `names` as an adapter name or a list of names, got "
        "NoneType (None)"
    )):
        kl.combine(model, None, [1], "mix", how="cat")
    with pytest.raises(TypeError, match=re.escape(
        "combine() takes adapter names as strings, got int (3) in `names`"
    )):
        kl.combine(model, ["a", 3], [1, 1], "mix", how="cat")
    with pytest.raises(ValueError, match=r"unknown combination how=None"):
        kl.combine(model, ["a", "b"], [1, 1], "mix", how=None)
    with pytest.raises(ValueError, match=re.escape(
        "model 'mlp' has no adapter named 'z'; it has ['a', 'b']. Use one of "
        "those names."
    )):
        kl.delete_adapter(model, "z")


def test_the_model_state_is_the_one_record_of_the_active_set():
    from keras_lowrank.state.refresh import refresh

    model = two_adapter_mlp()
    model._keras_lowrank.active = ["a", "b"]
    refresh(model)
    assert [model.get_layer(n).active_adapters for n in ("d1", "d2", "out")] == [
        ["a"], ["a", "b"], ["b"]
    ]
    np.testing.assert_allclose(predict(model), reference_mlp(model, X, ["a", "b"]), atol=1e-5)


def test_delete_adapter_removes_variables_and_matches_the_closed_form():
    model = two_adapter_mlp()
    kl.set_adapter(model, ["a", "b"])
    kl.delete_adapter(model, "a")
    assert all("lowrank_A_a" not in w.path for w in model.weights)
    assert type(model.get_layer("d1")) is keras.layers.Dense
    assert model._keras_lowrank.active == ["b"]
    np.testing.assert_allclose(predict(model), reference_mlp(model, X, ["b"]), atol=1e-5)
    kl.delete_adapter(model, "b")
    assert not hasattr(model, "_keras_lowrank")
    assert type(model) is keras.Sequential
    assert all(type(layer) is keras.layers.Dense for layer in model.layers)
    np.testing.assert_allclose(predict(model), reference_mlp(model, X, []), atol=1e-5)
    with pytest.raises(ValueError, match="has no adapters. Call keras_lowrank.adapt"):
        kl.delete_adapter(model, "b")


def test_delete_the_active_adapter_leaves_the_others_inactive():
    model = two_adapter_mlp()
    kl.delete_adapter(model, "b")
    assert model._keras_lowrank.active == []
    np.testing.assert_allclose(predict(model), reference_mlp(model, X, []), atol=1e-5)
    with pytest.raises(ValueError, match=r"has no adapter named 'b'; it has \['a'\]"):
        kl.delete_adapter(model, "b")


def test_merge_unmerge_and_unload_act_on_the_active_adapters():
    model = two_adapter_mlp()
    d2 = model.get_layer("d2")
    w0 = to_np(d2.kernel).astype("float64")
    kl.set_adapter(model, ["a", "b"])
    expected = predict(model)
    kl.merge(model)
    np.testing.assert_allclose(
        to_np(d2.kernel), w0 + delta(d2, "a") + delta(d2, "b"), atol=1e-5
    )
    np.testing.assert_allclose(predict(model), expected, atol=1e-5)
    assert model.trainable_variables == []  # merged factors do not train
    kl.unmerge(model)
    np.testing.assert_allclose(to_np(d2.kernel), w0, atol=1e-5)
    kl.set_adapter(model, "a")
    expected_a = reference_mlp(model, X, ["a"])
    kl.unload(model)
    assert type(d2) is keras.layers.Dense and not hasattr(model, "_keras_lowrank")
    np.testing.assert_allclose(predict(model), expected_a, atol=1e-5)


def test_a_failing_adapt_leaves_every_layer_as_it_was(monkeypatch):
    model = two_adapter_mlp()
    kl.set_adapter(model, ["a", "b"])
    before = model_snapshot(model)
    original = kl.LowRankDense.add_adapter
    calls = []

    def failing(self, name, spec, **kwargs):
        calls.append(self.name)
        if len(calls) == 2:
            raise RuntimeError("disk on fire")
        return original(self, name, spec, **kwargs)

    monkeypatch.setattr(kl.LowRankDense, "add_adapter", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        kl.adapt(model, rank=2, name="c", targets=["d1", "d2"])
    assert_same_snapshot(before, model_snapshot(model))


# --- training follows the active adapters ---------------------------------------


def compiled(model, lr=0.05):
    model.compile(optimizer=keras.optimizers.Adam(lr), loss="mse")
    return model


def test_training_after_a_switch_trains_only_the_new_adapter():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(6, 4)).astype("float32")
    model = compiled(two_adapter_mlp())
    kl.set_adapter(model, "a")
    model.fit(X, y, epochs=2, batch_size=6, verbose=0)
    optimizer_a = model.optimizer
    assert optimizer_a.built
    a_values = [to_np(v).copy() for v in model.trainable_variables]
    kl.set_adapter(model, "b")
    # The optimizer was built for a's variables: a fresh one of the same kind.
    assert model.optimizer is not optimizer_a
    assert type(model.optimizer) is type(optimizer_a)
    assert float(model.optimizer.learning_rate) == pytest.approx(0.05)
    b_before = [to_np(v).copy() for v in model.trainable_variables]
    model.fit(X, y, epochs=2, batch_size=6, verbose=0)
    b_after = [to_np(v) for v in model.trainable_variables]
    assert any(not np.allclose(p, q) for p, q in zip(b_before, b_after))
    kl.set_adapter(model, "a")
    for value, variable in zip(a_values, model.trainable_variables):
        np.testing.assert_array_equal(to_np(variable), value)
    # Switching to the same set keeps the optimizer (and its state).
    model.fit(X, y, epochs=1, batch_size=6, verbose=0)
    optimizer = model.optimizer
    kl.set_adapter(model, "a")
    with kl.disable_adapters(model):
        model.predict(X, verbose=0)
    assert model.optimizer is optimizer


def test_two_adapters_trained_on_different_data_give_different_outputs():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 8)).astype("float32")
    y1 = x[:, :2] * 2.0
    y2 = -x[:, 2:4]
    model = mlp()
    # Each adapter also trains its own copy of the output layer.
    kl.adapt(model, rank=2, name="a", targets=["d1", "d2"], trainable=["out"], seed=1)
    compiled(model, lr=0.02).fit(x, y1, epochs=20, batch_size=32, verbose=0)
    out_a = predict(model, x)
    # PEFT's name for the same option.
    kl.adapt(model, rank=2, name="b", targets=["d1", "d2"], modules_to_save=["out"],
             seed=2)
    assert model._keras_lowrank.options["b"]["kept"] == ["out"]
    np.testing.assert_allclose(predict(model, x), reference_mlp(model, x, []), atol=1e-5)
    model.fit(x, y2, epochs=20, batch_size=32, verbose=0)
    out_b = predict(model, x)
    assert np.abs(out_a - out_b).max() > 0.1
    assert np.mean((out_a - y1) ** 2) < np.mean((out_b - y1) ** 2)
    assert np.mean((out_b - y2) ** 2) < np.mean((out_a - y2) ** 2)
    kl.set_adapter(model, "a")
    np.testing.assert_allclose(predict(model, x), out_a, atol=1e-6)
    kl.set_adapter(model, "b")
    np.testing.assert_allclose(predict(model, x), out_b, atol=1e-6)


# --- owned values: task heads, kept layers, biases -------------------------------


def test_each_adapter_owns_its_copy_of_the_task_head(tmp_path):
    x = bert_inputs()
    model = tiny_bert()
    logits = model.get_layer("logits")
    base_out = predict(model, x)
    base_head = to_np(logits.kernel).copy()
    kl.adapt(model, rank=2, name="a", seed=1)
    assert model._keras_lowrank.options["a"]["owned"] == ["logits/kernel", "logits/bias"]
    logits.kernel.assign(base_head + 1.0)  # "training" a's head
    randomize(model, ["a"], scale=0.3)
    out_a = predict(model, x)
    kl.adapt(model, rank=2, name="b", seed=2)
    np.testing.assert_array_equal(to_np(logits.kernel), base_head)  # b starts from the base
    logits.kernel.assign(base_head - 1.0)
    randomize(model, ["b"], scale=0.3, seed=5)
    out_b = predict(model, x)
    kl.set_adapter(model, "a")
    np.testing.assert_allclose(to_np(logits.kernel), base_head + 1.0)
    np.testing.assert_allclose(predict(model, x), out_a, atol=1e-6)
    with pytest.raises(ValueError, match=re.escape(
        "adapters 'a' and 'b' both own their copy of 'logits/kernel' (layer "
        "'logits', kept trainable or a bias they train), so they cannot be "
        "active together"
    )):
        kl.set_adapter(model, ["a", "b"])
    with kl.disable_adapters(model):
        np.testing.assert_allclose(to_np(logits.kernel), base_head)
        np.testing.assert_allclose(predict(model, x), base_out, atol=1e-6)
    np.testing.assert_allclose(to_np(logits.kernel), base_head + 1.0)

    # The copies travel with .keras files.
    path = str(tmp_path / "two.keras")
    model.save(path)
    loaded = kl.load_model(path, compile=False)
    np.testing.assert_allclose(predict(loaded, x), out_a, atol=1e-6)
    kl.set_adapter(loaded, "b")
    np.testing.assert_allclose(predict(loaded, x), out_b, atol=1e-6)
    with kl.disable_adapters(loaded):
        np.testing.assert_allclose(predict(loaded, x), base_out, atol=1e-6)

    # Deleting the holder puts the base head back; unload keeps the active one's.
    kl.delete_adapter(loaded, "b")
    np.testing.assert_allclose(to_np(loaded.get_layer("logits").kernel), base_head)
    assert set(loaded._keras_lowrank.stash) == {"a"}
    kl.set_adapter(loaded, "a")
    kl.unload(loaded)
    np.testing.assert_allclose(to_np(loaded.get_layer("logits").kernel), base_head + 1.0)
    np.testing.assert_allclose(predict(loaded, x), out_a, atol=1e-5)


def test_bias_policies_give_each_adapter_its_own_biases():
    model = mlp()
    d1, out = model.get_layer("d1"), model.get_layer("out")
    base_bias = to_np(out.bias).copy()
    kl.adapt(model, rank=2, name="a", targets=["d1"], bias="lora_only")
    assert model._keras_lowrank.options["a"]["owned"] == ["d1/bias"]
    assert d1.bias.trainable and not out.bias.trainable
    d1.bias.assign(np.full(d1.bias.shape, 3.0, "float32"))
    kl.adapt(model, rank=2, name="b", targets=["d1"], bias="all")
    assert model._keras_lowrank.options["b"]["owned"] == ["d1/bias", "d2/bias", "out/bias"]
    assert all(layer.bias.trainable for layer in model.layers)
    np.testing.assert_array_equal(to_np(d1.bias), np.zeros(d1.bias.shape))
    out.bias.assign(base_bias + 2.0)
    kl.set_adapter(model, "a")
    np.testing.assert_array_equal(to_np(d1.bias), np.full(d1.bias.shape, 3.0))
    np.testing.assert_array_equal(to_np(out.bias), base_bias)
    kl.adapt(model, rank=2, name="c", targets=["d2"])
    assert model._keras_lowrank.options["c"]["owned"] == []
    kl.set_adapter(model, ["a", "c"])
    np.testing.assert_array_equal(to_np(d1.bias), np.full(d1.bias.shape, 3.0))
    with pytest.raises(ValueError, match="adapters 'a' and 'b' both own their copy of 'd1/bias'"):
        kl.set_adapter(model, ["a", "b"])


def test_owned_values_survive_keras_and_weights_files(tmp_path):
    model = mlp()
    kl.adapt(model, rank=2, name="a", targets=["d1"], bias="all", trainable=["out"])
    randomize(model)
    model.get_layer("out").kernel.assign(to_np(model.get_layer("out").kernel) + 1)
    kl.adapt(model, rank=2, name="b", targets=["d1", "d2"], bias="lora_only")
    randomize(model, seed=3)
    model.get_layer("d2").bias.assign(np.full((16,), 0.5, "float32"))
    expected = {}
    for name in ("a", "b"):
        kl.set_adapter(model, name)
        expected[name] = predict(model)
    model.save(str(tmp_path / "m.keras"))  # saved with "b" active
    model.save_weights(str(tmp_path / "m.weights.h5"))
    loaded = kl.load_model(str(tmp_path / "m.keras"))
    for name in ("b", "a"):
        kl.set_adapter(loaded, name)
        np.testing.assert_allclose(predict(loaded), expected[name], atol=1e-6)
    # load_weights while another adapter is active: the values follow.
    loaded.load_weights(str(tmp_path / "m.weights.h5"))
    assert loaded._keras_lowrank.active == ["a"]
    np.testing.assert_allclose(predict(loaded), expected["a"], atol=1e-6)
    kl.set_adapter(loaded, "b")
    np.testing.assert_allclose(predict(loaded), expected["b"], atol=1e-6)
    # A weights file from a model adapted otherwise is refused.
    other = mlp()
    kl.adapt(other, rank=2, name="a", targets=["d1"], bias="all", trainable=["out"])
    kl.adapt(other, rank=2, name="b", targets=["d1", "d2"])
    with pytest.raises(ValueError, match=re.escape(
        "the weights file holds a copy of 'd1/bias' for each of its owners "
        "here (['(base)', 'a']), so its variable holds the value of an adapter "
        "this model does not have; it was saved from a model with other "
        "adapters than model 'mlp'"
    )):
        other.load_weights(str(tmp_path / "m.weights.h5"))
    kl.delete_adapter(other, "a")
    with pytest.raises(ValueError, match=re.escape(
        "the weights file holds '(base)''s copy of 'd1/bias', which model "
        "'mlp' has no use for; it was saved from a model with other adapters"
    )):
        other.load_weights(str(tmp_path / "m.weights.h5"))


def test_trainable_layers_and_adapted_layers_do_not_overlap():
    model = mlp()
    with pytest.raises(ValueError, match=re.escape(
        "layer 'd1' is listed in `trainable`, but it holds or contains the "
        "adapted layer 'd1'. A layer either trains fully or gets an adapter"
    )):
        kl.adapt(model, rank=2, name="a", targets=["d1"], trainable=["d1"])
    assert not hasattr(model, "_keras_lowrank")
    kl.adapt(model, rank=2, name="a", targets=["d1"], trainable=["out"])
    assert model._keras_lowrank.options["a"]["owned"] == ["out/kernel", "out/bias"]
    with pytest.raises(ValueError, match=re.escape(
        "layer 'out' is kept fully trainable by adapter 'a' (layer 'out'), so "
        "it cannot also get an adapter"
    )):
        kl.adapt(model, rank=2, name="b", targets=["out"])
    with pytest.raises(ValueError, match="already has an adapter named 'a'"):
        kl.adapt(model, rank=2, name="a", targets=["d2"])


# --- combine ---------------------------------------------------------------------


def combine_model(rank_b=2):
    """d1: a only; e (EinsumDense with a batch axis): a and b; out: b only."""
    model = keras.Sequential(
        [
            keras.Input((3, 8)),
            keras.layers.Dense(6, name="d1"),
            keras.layers.EinsumDense("abc,bcd->abd", (3, 5), name="e"),
            keras.layers.Flatten(name="flat"),
            keras.layers.Dense(4, name="out"),
        ],
        name="combine_model",
    )
    kl.adapt(model, rank=2, alpha=4, name="a", targets=["d1", "e"], seed=1)
    kl.adapt(model, rank=rank_b, name="b", targets=["e", "out"], seed=2)
    randomize(model)
    return model


WEIGHTS = {"a": 0.7, "b": -0.4}


def weighted_target(layer):
    return sum(
        w * delta(layer, n) for n, w in WEIGHTS.items() if n in layer.adapter_names
    )


def linear_closed_form(layer):
    a_side, b_side = 0, 0
    layout = layer.lowrank_layout
    for name, weight in WEIGHTS.items():
        if name not in layer.adapter_names:
            continue
        spec = layer.adapter_spec(name)
        c = weight * spec.scale
        variables = layer.adapter_variables(name)
        a = to_np(variables["A"]).reshape(layout.batch_shape + (layout.d, spec.rank))
        b = to_np(variables["B"]).reshape(layout.batch_shape + (spec.rank, layout.k))
        a_side = a_side + np.sign(c) * np.sqrt(abs(c)) * a
        b_side = b_side + np.sqrt(abs(c)) * b
    return a_side.astype("float64") @ b_side.astype("float64")


def relative(x, y):
    return np.linalg.norm(x - y) / np.linalg.norm(y)


@pytest.mark.parametrize("how", ["linear", "cat", "svd"])
def test_combine_matches_the_closed_form(how):
    model = combine_model()
    names, weights = list(WEIGHTS), list(WEIGHTS.values())
    result = kl.combine(model, names, weights, "mix", how=how, rank=1 if how == "svd" else None)
    assert isinstance(result, kl.Combination)
    assert model._keras_lowrank.active == ["mix"]
    assert result.name == "mix" and result.sources == ("a", "b")
    assert list(result.ranks) == ["d1", "e", "out"]
    for path in ("d1", "e", "out"):
        layer = model.get_layer(path)
        spec = layer.adapter_spec("mix")
        assert (spec.alpha, spec.scaling, spec.method) == (spec.rank, "standard", "lora")
        got = delta(layer, "mix")
        target = weighted_target(layer)
        if how == "linear":
            expected = linear_closed_form(layer)
            assert spec.rank == 2
        elif how == "cat":
            expected = target
            assert spec.rank == {"d1": 2, "e": 4, "out": 2}[path]
        else:
            # Eckart–Young, per batch entry of the kernel's matrix form.
            u, s, vt = np.linalg.svd(target, full_matrices=False)
            expected = (u[..., :, :1] * s[..., None, :1]) @ vt[..., :1, :]
            assert spec.rank == 1
        np.testing.assert_allclose(got, expected, atol=2e-5)
        assert result.errors[path] == pytest.approx(relative(got, target), abs=1e-5)
    # A layer holding a single adapter: linear and cat are exact there.
    if how != "svd":
        assert result.errors["d1"] < 1e-6 and result.errors["out"] < 1e-6
    if how == "linear":
        assert result.errors["e"] > 0.1  # the cross terms
    if how == "svd":
        assert 0.05 < result.errors["e"] < 1.0
    assert "relative error" in str(result) and result.max_error == max(result.errors.values())


def test_combine_cat_with_unit_weights_equals_both_adapters_active():
    model = combine_model(rank_b=3)
    x = np.random.default_rng(3).normal(size=(5, 3, 8)).astype("float32")
    kl.set_adapter(model, ["a", "b"])
    both = predict(model, x)
    kl.combine(model, ["a", "b"], [1.0, 1.0], "sum", how="cat")
    np.testing.assert_allclose(predict(model, x), both, atol=1e-5)
    assert {v.path.split("/")[-1] for v in model.trainable_variables} == {
        "lowrank_A_sum",
        "lowrank_B_sum",
    }


def test_combine_errors():
    model = combine_model(rank_b=3)
    with pytest.raises(ValueError, match=re.escape(
        "layer 'e': how='linear' needs adapters of the same rank, but 'a' has "
        "rank 2, 'b' has rank 3. Use how='cat' (exact) or how='svd' (any rank)."
    )):
        kl.combine(model, ["a", "b"], [1, 1], "mix")
    with pytest.raises(ValueError, match=r"has no adapter named 'z'; it has \['a', 'b'\]"):
        kl.combine(model, ["a", "z"], [1, 1], "mix")
    with pytest.raises(ValueError, match="repeated adapter name"):
        kl.combine(model, ["a", "a"], [1, 1], "mix", how="cat")
    with pytest.raises(ValueError, match=re.escape("weights must be 2 finite number(s), one per adapter")):
        kl.combine(model, ["a", "b"], [1], "mix", how="cat")
    with pytest.raises(ValueError, match="weights must be 2 finite number"):
        kl.combine(model, ["a", "b"], [1, float("nan")], "mix", how="cat")
    with pytest.raises(ValueError, match=r"rank=4 only applies to how='svd'"):
        kl.combine(model, ["a", "b"], [1, 1], "mix", how="cat", rank=4)
    with pytest.raises(ValueError, match="rank must be a positive integer, got 0"):
        kl.combine(model, ["a", "b"], [1, 1], "mix", how="svd", rank=0)
    with pytest.raises(ValueError, match=r"unknown combination how='ties'"):
        kl.combine(model, ["a", "b"], [1, 1], "mix", how="ties")
    with pytest.raises(ValueError, match="already has an adapter named 'a'. Choose another name"):
        kl.combine(model, ["a", "b"], [1, 1], "a", how="cat")
    with pytest.raises(ValueError, match="adapter name 'm/x' is not valid"):
        kl.combine(model, ["a", "b"], [1, 1], "m/x", how="cat")
    kl.set_adapter(model, "a")
    kl.merge(model)
    before = model_snapshot(model)
    with pytest.raises(ValueError, match=r"adapter 'a' is merged into layer 'd1'; call keras_lowrank.unmerge"):
        kl.combine(model, ["a", "b"], [1, 1], "mix", how="cat")
    assert_same_snapshot(before, model_snapshot(model))
    kl.unmerge(model)
    kl.adapt(model, rank=2, name="d", targets=["d1"], method="dora")
    with pytest.raises(ValueError, match=re.escape(
        "layer 'd1': adapter 'd' uses method='dora'; its update is not a "
        "low-rank product A·B, so it cannot be combined"
    )):
        kl.combine(model, ["a", "d"], [1, 1], "mix", how="cat")


def test_a_combination_owns_the_first_adapters_head_values():
    model = mlp()
    out = model.get_layer("out")
    kl.adapt(model, rank=2, name="a", targets=["d1"], trainable=["out"])
    out.kernel.assign(to_np(out.kernel) + 1.0)
    head_a = to_np(out.kernel).copy()
    kl.adapt(model, rank=2, name="b", targets=["d1"], trainable=["out"])
    kl.combine(model, ["a", "b"], [0.5, 0.5], "mix")
    assert model._keras_lowrank.options["mix"]["owned"] == ["out/kernel", "out/bias"]
    np.testing.assert_array_equal(to_np(out.kernel), head_a)
    assert model._keras_lowrank.options["mix"]["combined"] == {
        "from": ["a", "b"], "weights": [0.5, 0.5], "how": "linear", "rank": None
    }
