"""The verbs as a table: model kinds × behaviours, through the public API.

Kinds (tests/model_kinds.py): Sequential, Functional, subclassed (a custom
block), subclassed with Dense/EinsumDense layers two custom layers deep (two
blocks with the same leaf names), and a KerasHub BertTextClassifier built
small from its config with random weights. Behaviours: adapter files into a
fresh copy of the base, set/disable/delete, combine, an int8-quantized base,
merge with two active adapters, `.keras` files with two adapters.

Only public names are used (`keras_lowrank.*`, the Keras model API and the
adapter variables' names), so the table holds whatever the internals become.
The single-adapter merge, unload and error cases per kind are in
tests/test_adapt.py; closed-form checks on an MLP in tests/test_lifecycle.py
and tests/test_adapter_files.py.
"""

import re
import warnings

import keras
import numpy as np
import pytest

import keras_lowrank as kl
import model_kinds
from model_kinds import KINDS

TABLE = ("sequential", "functional", "subclassed", "subclassed_nested", "bert_classifier")


@pytest.fixture(params=TABLE)
def kind(request):
    return KINDS[request.param]


def build(kind, seed=0):
    """The base model; the same seed gives the same weights."""
    keras.utils.set_random_seed(seed)
    return kind.build()


def run(model, x):
    return model_kinds.outputs(model, x)


def adapter_paths(model):
    return {w.path for w in model.weights if "/lowrank_" in w.path}


def weights_snapshot(model):
    """Paths, dtypes, trainable flags and exact values of every weight."""
    return [
        (w.path, str(w.dtype), w.trainable, keras.ops.convert_to_numpy(w).tobytes())
        for w in model.weights
    ]


def assert_differs(a, b, what):
    """So that the equalities below could fail: the two outputs are apart
    by more than 1% of their size (BERT's logits are small)."""
    gap = np.abs(a - b).max()
    assert gap > 0.01 * np.abs(b).max(), f"{what}: the adapter changed nothing"


def halves(kind):
    """The default targets split in two disjoint, non-empty lists."""
    targets = list(kind.default_targets)
    cut = len(targets) // 2
    return targets[:cut], targets[cut:]


# --- adapter files --------------------------------------------------------------


def test_adapter_file_loads_into_a_fresh_copy_of_the_base(kind, tmp_path):
    model = build(kind)
    x = kind.inputs()
    base = run(model, x)
    kl.adapt(model, rank=2, name="task")
    model_kinds.randomize_adapter(model, "task")
    tuned = run(model, x)
    assert_differs(tuned, base, kind.name)
    path = str(tmp_path / "task.safetensors")
    kl.save_adapter(model, path)

    fresh = build(kind)
    np.testing.assert_array_equal(run(fresh, x), base)
    assert kl.load_adapter(fresh, path) is fresh
    np.testing.assert_allclose(run(fresh, x), tuned, atol=1e-5)
    assert len(kl.report(fresh).rows) == len(kind.default_targets)
    with kl.disable_adapters(fresh):
        np.testing.assert_allclose(run(fresh, x), base, atol=1e-5)
    np.testing.assert_allclose(run(fresh, x), tuned, atol=1e-5)


# --- set_adapter / disable_adapters / delete_adapter -------------------------------


def test_switch_disable_and_delete_follow_the_active_adapter(kind):
    model = build(kind)
    base_class = type(model)
    x = kind.inputs()
    base = run(model, x)
    base_weights = {w.path for w in model.weights}
    kl.adapt(model, rank=2, name="a", seed=1)
    model_kinds.randomize_adapter(model, "a", seed=1)
    out_a = run(model, x)
    kl.adapt(model, rank=2, name="b", seed=2)  # the new one is the only active
    model_kinds.randomize_adapter(model, "b", seed=2)
    out_b = run(model, x)
    assert_differs(out_a, base, kind.name)
    assert_differs(out_b, out_a, kind.name)

    kl.set_adapter(model, "a")
    np.testing.assert_allclose(run(model, x), out_a, atol=1e-5)
    kl.set_adapter(model, "b")
    np.testing.assert_allclose(run(model, x), out_b, atol=1e-5)
    with kl.disable_adapters(model):
        np.testing.assert_allclose(run(model, x), base, atol=1e-5)
    np.testing.assert_allclose(run(model, x), out_b, atol=1e-5)

    kl.delete_adapter(model, "a")  # inactive: the output stays b's
    np.testing.assert_allclose(run(model, x), out_b, atol=1e-5)
    assert not any(p.endswith("_a") for p in adapter_paths(model))
    kl.delete_adapter(model, "b")  # the last one: a plain model again
    assert type(model) is base_class
    assert {w.path for w in model.weights} == base_weights
    assert not any(isinstance(layer, kl.LowRankLayer) for layer in _layers(model))
    np.testing.assert_allclose(run(model, x), base, atol=1e-5)


def _layers(model):
    """Every layer of the model, nested ones too (Keras's public walk)."""
    found, stack = [], [model]
    while stack:
        layer = stack.pop()
        found.append(layer)
        for attr in vars(layer).values():
            items = attr if isinstance(attr, (list, tuple)) else [attr]
            stack.extend(
                i for i in items if isinstance(i, keras.layers.Layer) and i not in found
            )
    return found


# --- combine ------------------------------------------------------------------------


def test_combine_equals_both_adapters_active(kind):
    """LoRA adapters with weights (1, 1): `linear` on disjoint layers and
    `cat` on shared layers both give what the two adapters active give.
    (`linear` on shared layers multiplies summed factors: cross terms.)"""
    model = build(kind)
    x = kind.inputs()
    first, second = halves(kind)
    # trainable=[]: the KerasHub head stays frozen, so no two adapters own a
    # copy of it and both can be active.
    kl.adapt(model, rank=2, name="a", targets=first, trainable=[], seed=1)
    kl.adapt(model, rank=2, name="b", targets=second, trainable=[], seed=2)
    model_kinds.randomize_adapter(model, "a", seed=1)
    model_kinds.randomize_adapter(model, "b", seed=2)
    kl.set_adapter(model, ["a", "b"])
    both = run(model, x)
    kl.set_adapter(model, "a")
    assert_differs(both, run(model, x), kind.name)

    result = kl.combine(model, ["a", "b"], [1.0, 1.0], "sum", how="linear")
    assert result.max_error < 1e-5, str(result)
    np.testing.assert_allclose(run(model, x), both, atol=1e-5)

    kl.adapt(model, rank=2, name="c", trainable=[], seed=3)
    kl.adapt(model, rank=2, name="d", trainable=[], seed=4)
    model_kinds.randomize_adapter(model, "c", seed=3)
    model_kinds.randomize_adapter(model, "d", seed=4)
    kl.set_adapter(model, ["c", "d"])
    shared = run(model, x)
    result = kl.combine(model, ["c", "d"], [1.0, 1.0], "cat_sum", how="cat")
    assert result.max_error < 1e-5, str(result)
    np.testing.assert_allclose(run(model, x), shared, atol=1e-5)


# --- quantized base -------------------------------------------------------------------


def _quantize_int8(model):
    with warnings.catch_warnings():
        # Keras warns for each layer it does not quantize (Conv1D here).
        warnings.simplefilter("ignore")
        model.quantize("int8")


def test_int8_base_trains_only_adapters_and_refuses_to_merge(kind):
    model = build(kind)
    _quantize_int8(model)
    int8 = [w.path for w in model.weights if "int8" in str(w.dtype)]
    assert int8, f"{kind.name}: model.quantize('int8') quantized nothing"
    kl.adapt(model, rank=2, seed=1)
    x = kind.inputs()
    adapters = adapter_paths(model)
    assert len(adapters) == 2 * len(kind.default_targets)
    kept = {w.path for w in model.trainable_weights} - adapters
    assert {p.split("/")[-2] for p in kept} == set(kind.kept)

    before = {w.path: keras.ops.convert_to_numpy(w).copy() for w in model.weights}
    # Eager: one step of a tiny model; compiling it would cost 10x the step.
    model.compile(
        optimizer=keras.optimizers.SGD(0.05),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        run_eagerly=True,
    )
    y = model_kinds.labels_for(kind, model, x)
    model.fit(x, y, epochs=1, batch_size=len(y), verbose=0)  # one step
    changed = {
        w.path
        for w in model.weights
        if not np.array_equal(keras.ops.convert_to_numpy(w), before[w.path])
    }
    assert changed <= adapters | kept, sorted(changed - adapters - kept)
    # B starts at zero, so the first step moves every B (A follows later).
    assert {p for p in adapters if "/lowrank_B_" in p} <= changed
    assert [w.path for w in model.weights if "int8" in str(w.dtype)] == int8

    snapshot = weights_snapshot(model)
    with pytest.raises(ValueError, match=re.escape(
        "the kernel is quantized ('int8'); merging adapters into it would be lossy"
    )):
        kl.merge(model)
    assert weights_snapshot(model) == snapshot


# --- merge ------------------------------------------------------------------------------


def test_merge_of_two_active_adapters_equals_unmerged_and_unmerges(kind):
    model = build(kind)
    x = kind.inputs()
    kl.adapt(model, rank=2, name="a", trainable=[], seed=1)
    kl.adapt(model, rank=3, name="b", trainable=[], seed=2)
    model_kinds.randomize_adapter(model, "a", seed=1)
    model_kinds.randomize_adapter(model, "b", seed=2)
    kl.set_adapter(model, ["a", "b"])
    unmerged = run(model, x)
    values = {w.path: keras.ops.convert_to_numpy(w).copy() for w in model.weights}
    kl.merge(model)
    kernels = [p for p, v in values.items()
               if not np.array_equal(v, keras.ops.convert_to_numpy(_weight(model, p)))]
    assert len(kernels) == len(kind.default_targets)  # one kernel per adapted layer
    np.testing.assert_allclose(run(model, x), unmerged, atol=1e-5)
    kl.unmerge(model)
    np.testing.assert_allclose(run(model, x), unmerged, atol=1e-5)
    for w in model.weights:
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(w), values[w.path], atol=1e-6, err_msg=w.path
        )


def _weight(model, path):
    return next(w for w in model.weights if w.path == path)


# --- .keras files -----------------------------------------------------------------------


def test_keras_file_keeps_both_adapters_switchable(kind, tmp_path):
    model = build(kind)
    x = kind.inputs()
    base = run(model, x)
    kl.adapt(model, rank=2, name="a", seed=1)
    model_kinds.randomize_adapter(model, "a", seed=1)
    out_a = run(model, x)
    kl.adapt(model, rank=2, name="b", seed=2)
    model_kinds.randomize_adapter(model, "b", seed=2)
    out_b = run(model, x)
    path = str(tmp_path / "two.keras")
    model.save(path)

    loaded = kl.load_model(path, compile=False)
    np.testing.assert_allclose(run(loaded, x), out_b, atol=1e-5)
    kl.set_adapter(loaded, "a")
    np.testing.assert_allclose(run(loaded, x), out_a, atol=1e-5)
    with kl.disable_adapters(loaded):
        np.testing.assert_allclose(run(loaded, x), base, atol=1e-5)
