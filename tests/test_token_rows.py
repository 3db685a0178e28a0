"""Trainable token rows (issue 15): `adapt(..., trainable_tokens=...)`.

A token-rows adapter is `ΔW = A·B` with `A` the frozen one-hot selection of
the rows and `B` their change, so the reference is the closed form
`W[ids] += B` (float64), on a plain Embedding, on a tied and an untied
`ReversibleEmbedding` (logits `h·(W + ΔW)ᵀ` before the soft cap), and on a
tiny tied KerasHub Gemma: only the rows and the adapters train, the rows
switch with their adapter, merge exactly, and round-trip in adapter files and
in `.keras` files loaded in a fresh process on another backend.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from keras import ops

import keras_lowrank
from keras_lowrank import AdapterSpec
from keras_lowrank import LowRankEmbedding
from keras_lowrank import LowRankReversibleEmbedding
from keras_lowrank.layers import LowRankDense

import model_kinds

HERE = os.path.dirname(os.path.abspath(__file__))
IDS = [45, 3]


def _np(x):
    return np.asarray(ops.convert_to_numpy(x), "float64")


def _random_rows(layer, name="default", seed=0):
    b = layer.adapter_variables(name)["B"]
    value = np.random.default_rng(seed).normal(size=b.shape).astype("float32")
    b.assign(value)
    return value.astype("float64")


def _with_rows(table, ids, rows):
    out = np.array(table, "float64")
    out[list(ids)] += rows
    return out


# --- the spec -------------------------------------------------------------------

SPEC_REFUSALS = [
    (lambda: AdapterSpec.for_tokens([]), ValueError,
     "keras_lowrank: token_ids is empty. List the ids of the rows to train."),
    (lambda: AdapterSpec.for_tokens([4, 4]), ValueError,
     "keras_lowrank: token id 4 is listed twice in token_ids [4, 4]. List "
     "each embedding row once."),
    (lambda: AdapterSpec.for_tokens([-1]), ValueError,
     "keras_lowrank: token id -1 is negative, in token_ids [-1]. Ids count "
     "embedding rows from 0."),
    (lambda: AdapterSpec.for_tokens([1.5]), TypeError,
     "keras_lowrank: token id 1.5 (float) is not an int, in token_ids [1.5]. "
     "Pass integer ids; tokenizer.token_to_id(token) gives a token's id."),
    (lambda: AdapterSpec.for_tokens("<tool>"), TypeError,
     "keras_lowrank: token_ids must be a list of token ids (ints), got "
     "'<tool>' (str). Pass ids such as [49152, 49153]; "
     "tokenizer.token_to_id(token) gives a token's id."),
    (lambda: AdapterSpec(rank=2, token_ids=[1]), ValueError,
     "keras_lowrank: a token-rows adapter has rank = the number of its token "
     "ids (1), got rank=2. Build it with AdapterSpec.for_tokens(token_ids)."),
    (lambda: AdapterSpec(rank=1, token_ids=[1], method="dora"), ValueError,
     "keras_lowrank: a token-rows adapter trains the rows themselves, so "
     "method='dora' does not apply (it must be 'lora'). Build it with "
     "AdapterSpec.for_tokens(token_ids)."),
    (lambda: AdapterSpec(rank=1, token_ids=[1], alpha=4), ValueError,
     "keras_lowrank: a token-rows adapter trains the rows themselves, so "
     "alpha=4 does not apply (it must be 1). Build it with "
     "AdapterSpec.for_tokens(token_ids)."),
]


@pytest.mark.parametrize("make,error,message", SPEC_REFUSALS)
def test_bad_token_specs_are_refused_with_the_fix(make, error, message):
    with pytest.raises(error) as caught:
        make()
    assert str(caught.value) == message


def test_ids_may_come_as_a_numpy_row_or_a_range():
    assert AdapterSpec.for_tokens(np.array([9, 2])).token_ids == (9, 2)
    assert AdapterSpec.for_tokens(range(3, 5)).token_ids == (3, 4)
    model = _model("sequential")
    keras_lowrank.adapt(model, rank=2, targets=["hidden"],
                        trainable_tokens=np.array([45, 3], "int64"))
    assert model.get_layer("embedding").adapter_spec("default").token_ids == (45, 3)
    with pytest.raises(TypeError, match="token_ids must be a list of token ids"):
        AdapterSpec.for_tokens(np.array([[1, 2]]))


def test_spec_config_round_trips_and_plain_specs_keep_their_config():
    spec = AdapterSpec.for_tokens([9, 2])
    config = spec.get_config()
    assert config["token_ids"] == [9, 2] and config["rank"] == 2
    assert AdapterSpec.from_config(config) == spec
    assert spec.trainable_keys == ("B",) and spec.scale == 1.0
    assert "token_ids" not in AdapterSpec(rank=4).get_config()
    assert AdapterSpec(rank=4).trainable_keys == ("A", "B", "magnitude")


# --- the layers -----------------------------------------------------------------


def test_token_rows_on_an_embedding_equal_the_closed_form_and_merge_exactly():
    layer = keras.layers.Embedding(50, 8)
    layer.build((None,))
    table = _np(layer.embeddings)
    LowRankEmbedding.from_layer(layer, adapter=AdapterSpec.for_tokens(IDS))
    assert [w.name for w in layer.trainable_weights] == ["lowrank_B_default"]
    rows = _random_rows(layer)
    expected = _with_rows(table, IDS, rows)
    ids = np.array([[45, 3, 7, 0]])
    np.testing.assert_array_equal(_np(layer(ids)), expected[ids].astype("float32"))
    layer.merge()
    merged = _np(layer.embeddings)
    np.testing.assert_array_equal(merged, expected.astype("float32"))
    untouched = [i for i in range(50) if i not in IDS]
    np.testing.assert_array_equal(merged[untouched], table[untouched])
    layer.unmerge()
    np.testing.assert_array_equal(_np(layer.embeddings)[untouched], table[untouched])
    np.testing.assert_allclose(_np(layer.embeddings), table, atol=1e-6)


def test_token_rows_on_a_dense_layer_are_refused():
    dense = keras.layers.Dense(4)
    dense.build((None, 8))
    with pytest.raises(ValueError) as caught:
        LowRankDense.from_layer(dense, adapter=AdapterSpec.for_tokens([1]))
    assert str(caught.value) == (
        "keras_lowrank: layer 'dense': trainable token rows change rows of an "
        "embedding table, and this layer is a Dense. Name an Embedding (or "
        "KerasHub ReversibleEmbedding) layer in trainable_tokens."
    ).replace("'dense'", f"'{dense.name}'")
    assert type(dense) is keras.layers.Dense


@pytest.mark.parametrize("soft_cap", [None, 3.0])
def test_tied_logits_see_the_rows_before_the_soft_cap(soft_cap):
    layer = keras.layers.ReversibleEmbedding(50, 8, logit_soft_cap=soft_cap)
    layer.build((None,))
    table = _np(layer.embeddings)
    LowRankReversibleEmbedding.from_layer(layer, adapter=AdapterSpec.for_tokens(IDS))
    expected = _with_rows(table, IDS, _random_rows(layer))
    h = np.random.default_rng(1).normal(size=(2, 3, 8)).astype("float32")
    logits = h.astype("float64") @ expected.T
    if soft_cap:
        logits = np.tanh(logits / soft_cap) * soft_cap
    np.testing.assert_allclose(_np(layer(h, reverse=True)), logits, atol=1e-5)
    ids = np.array([[3, 45, 1]])
    np.testing.assert_allclose(_np(layer(ids)), expected[ids], atol=1e-6)


def test_untied_output_table_stays_as_it_is():
    layer = keras.layers.ReversibleEmbedding(50, 8, tie_weights=False)
    layer.build((None,))
    table = _np(layer.embeddings)
    LowRankReversibleEmbedding.from_layer(layer, adapter=AdapterSpec.for_tokens(IDS))
    expected = _with_rows(table, IDS, _random_rows(layer))
    h = np.ones((1, 2, 8), "float32")
    reverse = h.astype("float64") @ _np(layer.reverse_embeddings)
    np.testing.assert_allclose(_np(layer(h, reverse=True)), reverse, atol=1e-5)
    np.testing.assert_allclose(_np(layer(np.array([[45]]))), expected[[[45]]], atol=1e-6)
    assert "reverse_embeddings" not in [w.name for w in layer.trainable_weights]


def test_lora_on_a_tied_table_reaches_the_logits_and_dora_is_refused():
    layer = keras.layers.ReversibleEmbedding(50, 8)
    layer.build((None,))
    table = _np(layer.embeddings)
    LowRankReversibleEmbedding.from_layer(layer, rank=2, alpha=4)
    variables = layer.adapter_variables("default")
    rng = np.random.default_rng(2)
    for key in ("A", "B"):
        variables[key].assign(rng.normal(size=variables[key].shape).astype("float32"))
    delta = 2.0 * _np(variables["A"]) @ _np(variables["B"])
    h = rng.normal(size=(2, 8)).astype("float32")
    np.testing.assert_allclose(
        _np(layer(h, reverse=True)), h @ (table + delta).T, atol=1e-4
    )
    other = keras.layers.ReversibleEmbedding(50, 8, name="tied")
    other.build((None,))
    with pytest.raises(ValueError) as caught:
        LowRankReversibleEmbedding.from_layer(other, rank=2, method="dora")
    assert str(caught.value) == (
        "keras_lowrank: layer 'tied': DoRA on a ReversibleEmbedding is not "
        "supported: its norm would rescale the logits too. Use method='lora' "
        "for this layer, or exclude it."
    )
    assert type(other) is keras.layers.ReversibleEmbedding


def test_keras_hub_alias_is_adapted_and_comes_back_on_unload():
    keras_hub = pytest.importorskip("keras_hub")
    ids = keras.Input((4,), dtype="int32")
    table = keras_hub.layers.ReversibleEmbedding(50, 8, name="tokens")
    hidden = keras.layers.Dense(8, name="mix")(table(ids))
    model = keras.Model(ids, table(hidden, reverse=True))
    x = np.array([[45, 3, 1, 2]], "int32")
    keras_lowrank.adapt(model, rank=2, targets=["mix"], trainable_tokens=IDS)
    assert isinstance(table, LowRankReversibleEmbedding)
    _random_rows(table)
    model_kinds.randomize_adapter(model, "default")
    adapted = model_kinds.outputs(model, x)
    keras_lowrank.unload(model)
    assert type(table) is keras_hub.layers.ReversibleEmbedding
    np.testing.assert_allclose(model_kinds.outputs(model, x), adapted, atol=1e-5)


# --- adapt ---------------------------------------------------------------------------


def _two_tables():
    ids = keras.Input((4,), dtype="int32")
    a = keras.layers.Embedding(50, 8, name="words")(ids)
    b = keras.layers.Embedding(10, 8, name="positions")(ids)
    out = keras.layers.Dense(3, name="head")(keras.layers.Add()([a, b]))
    return keras.Model(ids, out)


ADAPT_REFUSALS = [
    ({"trainable_tokens": [50]}, "sequential", ValueError,
     "keras_lowrank: layer 'embedding': token id 50 is out of range: the "
     "embedding has 50 rows (ids 0 to 49). Add the token to the tokenizer and "
     "grow the table first, or train a row the vocabulary already has (a "
     "reserved or unused token)."),
    # The LoRA part refused: the rows' layer is left alone too.
    ({"trainable_tokens": [1], "targets": ["hidden"],
      "rank_pattern": {"hidden": 9}}, "sequential", ValueError,
     "keras_lowrank: layer 'hidden': rank 9 is larger than min(d, k) = "
     "min(8, 8) = 8 for this kernel (8, 8), so it is not low-rank. Use a rank "
     "of at most 8, or a rank_pattern for this layer."),
    ({"trainable_tokens": list(range(9))}, "sequential", ValueError,
     "keras_lowrank: layer 'embedding': 9 trainable token rows are more than "
     "the embedding width 8, so they are no cheaper than the whole table. "
     "Train the whole table instead: modules_to_save=['embedding']."),
    ({"trainable_tokens": [1], "targets": []}, "two_tables", ValueError,
     "keras_lowrank: trainable_tokens=[...] trains rows of the model's token "
     "embedding, but model 'two' has 2 embedding layers ('words', "
     "'positions'). Name the layer: trainable_tokens={'<layer path>': [ids]}."),
    ({"trainable_tokens": {"head": [1]}, "targets": ["words"]}, "two_tables",
     ValueError,
     "keras_lowrank: trainable_tokens names layer 'head', a Dense; token rows "
     "belong to an Embedding (or KerasHub ReversibleEmbedding) layer. Name "
     "the token embedding."),
    ({"trainable_tokens": {"words": [1]}, "targets": ["words", "head"]},
     "two_tables", ValueError,
     "keras_lowrank: layer 'words' is in `targets` and in `trainable_tokens`; "
     "one adapter holds one update per layer. Leave it out of the targets "
     "(exclude=['words']), or train its rows in a separate adapter."),
    ({"trainable_tokens": {"word": [1]}, "targets": []}, "two_tables",
     ValueError,
     "keras_lowrank: trainable_tokens entry 'word' matched no layer in model "
     "'two'. Closest layer names: 'words'. Fix the spelling, or remove it "
     "from `trainable_tokens`."),
    ({"trainable_tokens": {"words": [1, 1]}, "targets": []}, "two_tables",
     ValueError,
     "keras_lowrank: token id 1 is listed twice in token_ids [1, 1]. List "
     "each embedding row once."),
]


def _model(kind):
    if kind == "two_tables":
        model = _two_tables()
        model.name = "two"
        return model
    return keras.Sequential([
        keras.Input((4,), dtype="int32"),
        keras.layers.Embedding(50, 8, name="embedding"),
        keras.layers.Dense(8, name="hidden"),
        keras.layers.Dense(3, name="head"),
    ])


@pytest.mark.parametrize("options,kind,error,message", ADAPT_REFUSALS)
def test_adapt_refusals_name_the_fix_and_leave_the_model_unchanged(
    options, kind, error, message
):
    model = _model(kind)
    before = model_kinds.fingerprint(model)
    with pytest.raises(error) as caught:
        keras_lowrank.adapt(model, rank=2, **options)
    assert str(caught.value) == message
    assert model_kinds.fingerprint(model) == before


def test_rows_switch_with_their_adapter_and_are_recorded():
    model = _model("sequential")
    table = model.get_layer("embedding")
    x = np.array([[45, 3, 7, 7]])
    base = model_kinds.outputs(model, x)
    keras_lowrank.adapt(model, rank=2, targets=["hidden"], trainable_tokens=[45], name="a")
    keras_lowrank.adapt(model, rank=2, targets=["hidden"], trainable_tokens=[3], name="b")
    _random_rows(table, "a", seed=1)
    _random_rows(table, "b", seed=2)
    assert table.adapter_spec("a").token_ids == (45,)
    keras_lowrank.set_adapter(model, "a")
    out_a = model_kinds.outputs(model, x)
    trainable = sorted(
        "/".join(w.path.split("/")[-2:]) for w in model.trainable_weights
    )
    assert trainable == [
        "embedding/lowrank_B_a", "hidden/lowrank_A_a", "hidden/lowrank_B_a",
    ]
    keras_lowrank.set_adapter(model, "b")
    assert not np.allclose(model_kinds.outputs(model, x), out_a)
    with keras_lowrank.disable_adapters(model):
        np.testing.assert_allclose(model_kinds.outputs(model, x), base, atol=1e-6)
    state = model._keras_lowrank
    assert state.options["a"]["trainable_tokens"] == {"embedding": [45]}
    report = keras_lowrank.report(model)
    row = [r for r in report.rows if r.path == "embedding" and r.adapter == "b"][0]
    assert (row.method, row.params, row.rdk) == ("tokens", 8, 8)


def test_targets_empty_trains_the_rows_alone():
    model = _model("two_tables")
    keras_lowrank.adapt(model, targets=[], trainable_tokens={"words": [7]})
    assert [w.path.split("/")[-2:] for w in model.trainable_weights] == [
        ["words", "lowrank_B_default"]
    ]
    assert type(model.get_layer("head")) is keras.layers.Dense
    with pytest.raises(ValueError, match="targets=\\[\\] matched no adaptable"):
        keras_lowrank.adapt(_model("two_tables"), targets=[])


@keras.saving.register_keras_serializable(package="test_token_rows")
class _Tagger(keras.Model):
    """A subclassed model whose embedding sits inside it."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.table = keras.layers.Embedding(50, 8, name="table")
        self.hidden = keras.layers.Dense(8, name="hidden")
        self.head = keras.layers.Dense(3, name="head")

    def call(self, ids):
        return self.head(self.hidden(self.table(ids)))


def _kind(kind):
    if kind == "subclassed":
        model = _Tagger()
        model(np.zeros((1, 4), "int32"))
        return model
    if kind == "functional":
        ids = keras.Input((4,), dtype="int32")
        hidden = keras.layers.Dense(8, name="hidden")(
            keras.layers.Embedding(50, 8, name="table")(ids)
        )
        return keras.Model(ids, keras.layers.Dense(3, name="head")(hidden))
    return keras.Sequential([
        keras.Input((4,), dtype="int32"),
        keras.layers.Embedding(50, 8, name="table"),
        keras.layers.Dense(8, name="hidden"),
        keras.layers.Dense(3, name="head"),
    ])


@pytest.mark.parametrize("kind", ["sequential", "functional", "subclassed"])
def test_rows_merge_exactly_and_round_trip_in_adapter_files(kind, tmp_path):
    x = np.array([[45, 3, 7, 7], [1, 2, 3, 45]], "int32")
    keras.utils.set_random_seed(1)
    model = _kind(kind)
    keras_lowrank.adapt(model, rank=2, targets=["hidden"], trainable_tokens=IDS)
    table = [l for l in model._flatten_layers() if l.name == "table"][0]
    _random_rows(table)
    expected = model_kinds.outputs(model, x)
    keras_lowrank.save_adapter(model, str(tmp_path / "rows.safetensors"))
    keras_lowrank.merge(model)
    assert max_diff(model_kinds.outputs(model, x), expected) <= 1e-5
    keras.utils.set_random_seed(1)
    fresh = _kind(kind)
    keras_lowrank.load_adapter(fresh, str(tmp_path / "rows.safetensors"))
    assert max_diff(model_kinds.outputs(fresh, x), expected) <= 1e-5


# --- a tied KerasHub model ----------------------------------------------------------


def _gemma():
    pytest.importorskip("keras_hub")
    keras.utils.set_random_seed(0)
    return model_kinds.build_gemma_causal_lm()


def _lm_batch():
    rng = np.random.default_rng(0)
    token_ids = rng.integers(1, 40, size=(2, 6)).astype("int32")
    token_ids[:, 2] = IDS[0]
    return {"token_ids": token_ids, "padding_mask": np.ones((2, 6), "int32")}


def test_fit_trains_only_the_rows_and_the_adapters_on_a_tied_keras_hub_model():
    model = _gemma()
    table = model.backbone.token_embedding
    before = _np(table.embeddings)
    x = _lm_batch()
    keras_lowrank.adapt(model, rank=2, trainable_tokens=IDS)
    assert isinstance(table, LowRankReversibleEmbedding)
    trainable = {w.path.rsplit("/", 1)[-1] for w in model.trainable_weights}
    assert trainable == {"lowrank_A_default", "lowrank_B_default"}
    assert [w.name for w in table.trainable_weights] == ["lowrank_B_default"]
    model.compile(
        optimizer=keras.optimizers.Adam(0.05),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x, np.full((2, 6), IDS[0]), epochs=2, verbose=0)
    assert np.abs(_np(table.adapter_variables("default")["B"])).max() > 0
    out = model_kinds.outputs(model, x)
    keras_lowrank.merge(model)
    merged = _np(table.embeddings)
    changed = np.flatnonzero(np.abs(merged - before).max(axis=1))
    assert sorted(changed.tolist()) == sorted(IDS)
    np.testing.assert_allclose(model_kinds.outputs(model, x), out, atol=1e-5)


def test_adapter_file_round_trip_into_a_fresh_model(tmp_path):
    model = _gemma()
    x = _lm_batch()
    keras_lowrank.adapt(model, rank=2, trainable_tokens=IDS)
    _random_rows(model.backbone.token_embedding)
    model_kinds.randomize_adapter(model, "default")
    expected = model_kinds.outputs(model, x)
    path = str(tmp_path / "tokens.safetensors")
    keras_lowrank.save_adapter(model, path)
    fresh = _gemma()
    keras_lowrank.load_adapter(fresh, path)
    np.testing.assert_allclose(model_kinds.outputs(fresh, x), expected, atol=1e-5)
    assert fresh.backbone.token_embedding.adapter_spec("default").token_ids == tuple(IDS)


_CHILD = """
import json, sys
import numpy as np
import keras_lowrank
from keras import ops
model = keras_lowrank.load_model(sys.argv[1] + "/lm.keras")
data = np.load(sys.argv[1] + "/data.npz")
x = {"token_ids": data["token_ids"], "padding_mask": data["padding_mask"]}
got = np.asarray(ops.convert_to_numpy(model(x, training=False)))
table = model.backbone.token_embedding
print(json.dumps([float(np.abs(got - data["expected"]).max()),
                  type(table).__name__,
                  [w.name for w in table.trainable_weights]]))
"""


def test_keras_file_round_trip_in_a_fresh_process_on_another_backend(tmp_path):
    model = _gemma()
    x = _lm_batch()
    keras_lowrank.adapt(model, rank=2, trainable_tokens=IDS)
    _random_rows(model.backbone.token_embedding)
    expected = model_kinds.outputs(model, x)
    model.save(str(tmp_path / "lm.keras"))
    np.savez(str(tmp_path / "data.npz"), expected=expected, **x)
    other = {"jax": "torch", "torch": "tensorflow", "tensorflow": "jax"}[
        keras.backend.backend()
    ]
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp_path)],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "KERAS_BACKEND": other},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    diff, kind, trainable = json.loads(proc.stdout.strip().splitlines()[-1])
    assert diff <= 1e-5
    assert kind == "LowRankReversibleEmbedding"
    assert trainable == ["lowrank_B_default"]


def test_stacked_switching_serves_tied_rows_exactly():
    model = _gemma()
    x = _lm_batch()
    keras_lowrank.adapt(model, rank=2, trainable_tokens=[IDS[0]], name="a")
    keras_lowrank.adapt(model, rank=2, trainable_tokens=[IDS[1]], name="b")
    expected = {}
    for seed, name in enumerate(("a", "b")):
        _random_rows(model.backbone.token_embedding, name, seed=seed)
        keras_lowrank.set_adapter(model, name)
        expected[name] = model_kinds.outputs(model, x)
    assert max_diff(expected["a"], expected["b"]) > 1e-3
    keras_lowrank.stack_adapters(model)
    for name in ("b", "a"):
        keras_lowrank.set_adapter(model, name)
        assert max_diff(model_kinds.outputs(model, x), expected[name]) <= 1e-5


def test_quantizing_a_tied_table_with_rows_is_refused_unchanged():
    model = _gemma()
    keras_lowrank.adapt(model, rank=2, trainable_tokens=IDS)
    before = model_kinds.fingerprint(model)
    with pytest.raises(ValueError) as caught:
        model.quantize("int8")
    assert str(caught.value) == (
        "keras_lowrank: layer 'token_embedding': a ReversibleEmbedding "
        "quantized ('int8') cannot hold adapters: its logits are Keras's own "
        "quantized product, which an adapter cannot join. Keep this table in "
        "float (adapt the float model; model.quantize(..., filters=...) "
        "without it), or leave it out of the adapter."
    )
    assert model_kinds.fingerprint(model) == before
    quantized = _gemma()
    quantized.quantize("int8")
    with pytest.raises(ValueError, match="a ReversibleEmbedding quantized"):
        keras_lowrank.adapt(quantized, rank=2, trainable_tokens=IDS)
    assert not hasattr(quantized, "_keras_lowrank")


def max_diff(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())
