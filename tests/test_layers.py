"""The layer harness (`tests/layer_harness.py`) over every adapter layer.

Each test crosses the layer cases (Dense, EinsumDense, Embedding,
Conv1D/2D/3D) with one behaviour, for both ways of making an adapted layer
(standalone and `from_layer`). The suite runs once per backend.
"""

import pytest

import layer_harness as harness
from layer_harness import CASE_IDS
from layer_harness import CASES
from layer_harness import CONSTRUCTIONS
from layer_harness import POLICIES

cases = pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
constructions = pytest.mark.parametrize("construction", CONSTRUCTIONS)
with_bias = [case for case in CASES if case.has_bias]
with_dropout = [case for case in CASES if case.allows_dropout]
# One case per layer class, for the slower checks.
PER_CLASS = ["dense", "einsum_mha_query", "embedding", "conv2d"]
per_class = pytest.mark.parametrize(
    "case", [c for c in CASES if c.id in PER_CLASS], ids=PER_CLASS
)


@cases
@constructions
def test_weights(case, construction):
    harness.check_weights(case, construction)


@cases
def test_from_layer_keeps_identity(case):
    harness.check_from_layer_keeps_identity(case)


@cases
@constructions
@pytest.mark.parametrize("scaling", ["standard", "rslora"])
def test_matches_plain_layer_with_merged_kernel(case, construction, scaling):
    harness.check_matches_merged_plain_layer(case, construction, scaling)


@cases
@constructions
def test_merge_unmerge(case, construction):
    harness.check_merge_unmerge(case, construction)


@cases
@constructions
def test_config_round_trip(case, construction):
    harness.check_config_round_trip(case, construction)


@cases
@constructions
def test_save_and_load_model(case, construction, tmp_path):
    # Every case checks the reloaded factors' values and trainable flags;
    # a `fit` after the reload runs once per layer class.
    retrain = construction == "from_layer" and case.id in PER_CLASS
    harness.check_save_and_load(case, construction, tmp_path, retrain)


@per_class
def test_save_and_load_merged_model(case, tmp_path):
    harness.check_save_merged(case, tmp_path)


# from_layer with bias="none" (the bias must stay bit-for-bit frozen, like
# the kernel), standalone with bias="all" (the bias must move).
@cases
@pytest.mark.parametrize(
    "construction, bias", [("from_layer", "none"), ("standalone", "all")]
)
def test_fit_moves_factors_only(case, construction, bias):
    harness.check_fit(case, construction, bias=bias)


@cases
@constructions
def test_trainable_toggle_keeps_kernel_frozen(case, construction):
    harness.check_trainable_toggle(case, construction)


@pytest.mark.parametrize("case", with_bias, ids=[c.id for c in with_bias])
@constructions
def test_bias_policy(case, construction):
    harness.check_bias_policy(case, construction)


# from_layer: an Embedding or Conv layer only takes `training` once
# converted, so that is the construction to prove; standalone once.
@pytest.mark.parametrize("case", with_dropout, ids=[c.id for c in with_dropout])
def test_dropout_on_adapter_path_only(case):
    harness.check_dropout(case, "from_layer")


def test_dropout_standalone():
    harness.check_dropout(CASES[0], "standalone")


# Every policy on the from_layer path (what `adapt()` uses); the standalone
# constructor takes its policy from `dtype=`, checked with one policy.
@cases
@pytest.mark.parametrize(
    "construction, policy",
    [("from_layer", p) for p in POLICIES] + [("standalone", "mixed_float16")],
)
def test_mixed_precision(case, construction, policy):
    harness.check_mixed_precision(case, construction, policy)


# One case per layer class is enough for a training step under each policy.
@per_class
@pytest.mark.parametrize("policy", POLICIES)
def test_mixed_precision_fit(case, policy):
    harness.check_mixed_precision_fit(case, policy)


@per_class
@constructions
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_merge_unmerge_is_exact(case, construction, dtype, tmp_path):
    harness.check_low_precision_merge(case, construction, dtype, tmp_path)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_model_merge_unmerge_is_exact(dtype, tmp_path):
    """The same through keras_lowrank.merge/unmerge on a small model, and
    after a `.keras` round trip while merged."""
    import keras
    import numpy as np

    import keras_lowrank

    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, dtype=dtype, name="hidden"),
            keras.layers.Dense(2, dtype=dtype, name="out"),
        ]
    )
    keras_lowrank.adapt(model, rank=4, seed=3)
    layer = model.get_layer("hidden")
    layer.lowrank_B_default.assign(
        np.random.default_rng(0).normal(size=(4, 16)).astype("float32")
    )
    original = harness.snapshot([layer.kernel])[0]
    keras_lowrank.merge(model)
    assert (harness.to_numpy(layer.kernel) != original).any()
    path = str(tmp_path / "merged.keras")
    model.save(path)
    keras_lowrank.unmerge(model)
    np.testing.assert_array_equal(harness.to_numpy(layer.kernel), original)
    loaded = keras_lowrank.load_model(path)
    keras_lowrank.unmerge(loaded)
    np.testing.assert_array_equal(
        harness.to_numpy(loaded.get_layer("hidden").kernel), original
    )


def test_low_precision_merged_file_without_backup_still_loads():
    """A bfloat16 layer saved merged by an earlier version (no
    `lowrank_unmerged_kernel` in the file) loads, and unmerges to rounding
    as it always did."""
    import numpy as np

    from keras_lowrank import LowRankDense

    layer = LowRankDense(6, rank=2, dtype="bfloat16", name="d")
    layer.build((None, 4))
    harness.randomize_factors(layer)
    original = harness.snapshot([layer.kernel])[0].astype("float32")
    layer.merge()
    store = {}
    layer.save_own_variables(store)
    assert "lowrank_unmerged_kernel" in store
    del store["lowrank_unmerged_kernel"]
    twin = LowRankDense.from_config(layer.get_config())
    twin.build((None, 4))
    twin.load_own_variables(store)
    assert twin.merged_adapters == ["default"]
    twin.unmerge()
    np.testing.assert_allclose(
        harness.to_numpy(twin.kernel).astype("float32"), original, atol=0.05
    )
