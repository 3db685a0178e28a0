"""Bad input to the adapter layers: every message names the layer and the fix.

A failed `from_layer` must leave the layer exactly as it was: same class,
same attributes, same variables with the same values and trainable flags.
"""

import re

import keras
import numpy as np
import pytest
from keras import ops

from keras_lowrank import LowRankConv1D
from keras_lowrank import LowRankConv2D
from keras_lowrank import LowRankDense
from keras_lowrank import LowRankEinsumDense
from keras_lowrank import LowRankEmbedding


def _dense_in_model(name="proj"):
    """A built Dense whose path is `sequential/<name>`."""
    model = keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(6, name=name)],
        name="sequential",
    )
    layer = model.layers[0]
    assert layer.path == f"sequential/{name}"
    return layer


def _state(layer):
    """Everything a failed conversion must leave untouched."""
    return {
        "class": type(layer),
        "attributes": sorted(vars(layer)),
        "variables": [id(v) for v in layer.weights],
        "names": [v.path for v in layer.weights],
        "trainable": [v.trainable for v in layer.weights],
        "values": [np.array(ops.convert_to_numpy(v)) for v in layer.weights],
        "call_has_training_arg": layer._call_has_training_arg,
        "call_signature": list(layer.call_signature_parameters),
    }


def _assert_same_state(before, after):
    values_before, values_after = before.pop("values"), after.pop("values")
    assert before == after
    for x, y in zip(values_before, values_after):
        np.testing.assert_array_equal(x, y)


def _assert_from_layer_fails(cls, layer, error, match, **options):
    """`cls.from_layer(layer, **options)` raises, naming the layer's path,
    and leaves the layer as it was."""
    path = layer.path or layer.name
    before = _state(layer)
    with pytest.raises(error, match=match) as info:
        cls.from_layer(layer, **options)
    assert str(info.value).startswith(f"keras_lowrank: layer '{path}': ")
    _assert_same_state(before, _state(layer))
    # And the layer still works as the plain layer it was.
    return info


# --- options (the same checks standalone and via from_layer) -----------------

BAD_OPTIONS = [
    (dict(rank=0), ValueError, r"rank must be a positive integer, got 0\. "
     r"Pass rank=8"),
    (dict(rank=-3), ValueError, r"got -3\. Pass rank=8"),
    (dict(rank=2.5), TypeError, r"rank must be a positive integer, got 2\.5 "
     r"\(float\)\. Pass an int such as rank=8"),
    (dict(rank="8"), TypeError, r"got '8' \(str\)\. Pass an int"),
    (dict(rank=True), TypeError, r"got True \(bool\)"),
    (dict(alpha=0), ValueError, r"alpha must be a finite positive number, "
     r"got 0\. Pass a number such as alpha=16, or alpha=None"),
    (dict(alpha=float("inf")), ValueError, r"alpha must be a finite positive "
     r"number, got inf\. Pass a number such as alpha=16"),
    (dict(alpha=float("nan")), ValueError, r"alpha must be a finite positive "
     r"number, got nan\."),
    (dict(alpha=-2.0), ValueError, r"alpha must be a finite positive "
     r"number, got -2\.0\."),
    (dict(scaling="rs"), ValueError, r"unknown scaling 'rs'\. Use one of "
     r"'standard', 'rslora'\."),
    (dict(init="kaiming"), ValueError, r"unknown init 'kaiming'\. Use one of "
     r"'default', 'gaussian', 'pissa', 'olora', 'pissa_niter_<n>'\."),
    (dict(method="lokr"), ValueError, r"unknown method 'lokr'\. Use one of "
     r"'lora', 'dora'\."),
    (dict(bias="lora_only"), ValueError, r"unknown bias 'lora_only'\. Use "
     r"one of 'none', 'all'\."),
    (dict(dropout=-0.1), ValueError, r"dropout must be a finite number in "
     r"\[0, 1\), got -0\.1\. Pass dropout=0\.0 to disable it, or a rate "
     r"such as dropout=0\.1\."),
    (dict(dropout=1.0), ValueError, r"dropout must be a finite number in "
     r"\[0, 1\), got 1\.0"),
    (dict(dropout=float("nan")), ValueError, r"dropout must be a finite "
     r"number in \[0, 1\), got nan\. Pass dropout=0\.0"),
    (dict(dropout=float("-inf")), ValueError, r"dropout must be a finite "
     r"number in \[0, 1\), got -inf\."),
    (dict(adapter_name="task.a"), ValueError, r"adapter name 'task\.a' is not"
     r" valid\. Use letters, digits, '_' and '-' only"),
]
OPTION_IDS = [
    "-".join(f"{k}={v!r}" for k, v in options.items())
    for options, _, _ in BAD_OPTIONS
]


@pytest.mark.parametrize("options, error, match", BAD_OPTIONS, ids=OPTION_IDS)
def test_bad_options_standalone(options, error, match):
    with pytest.raises(error, match=match) as info:
        LowRankDense(4, name="head", **options)
    assert str(info.value).startswith("keras_lowrank: layer 'head': ")


@pytest.mark.parametrize("options, error, match", BAD_OPTIONS, ids=OPTION_IDS)
def test_bad_options_from_layer(options, error, match):
    layer = _dense_in_model()
    _assert_from_layer_fails(LowRankDense, layer, error, match, **options)


def test_rank_larger_than_min_d_k():
    layer = _dense_in_model()  # 5 -> 6
    _assert_from_layer_fails(
        LowRankDense,
        layer,
        ValueError,
        r"rank 6 is larger than min\(d, k\) = min\(5, 6\) = 5 for this "
        r"kernel \(5, 6\), so it is not low-rank\. Use a rank of at most 5\.",
        rank=6,
    )
    # Standalone: known once the input size is, at build.
    standalone = LowRankDense(4, rank=5, name="head")
    with pytest.raises(ValueError, match=r"layer 'head': rank 5 is larger "
                       r"than min\(d, k\) = min\(3, 4\) = 3.*at most 3"):
        standalone.build((None, 3))


def test_rank_larger_than_min_d_k_conv_and_einsum():
    conv = keras.layers.Conv1D(2, 3, name="conv")
    conv.build((None, 8, 4))  # d = 3·4 = 12, k = 2
    _assert_from_layer_fails(
        LowRankConv1D, conv, ValueError, r"min\(12, 2\) = 2", rank=3
    )
    einsum = keras.layers.EinsumDense(
        "abc,cde->abde", (None, 2, 3), name="query"
    )
    einsum.build((None, 4, 5))  # d = 5, k = 2·3 = 6
    _assert_from_layer_fails(
        LowRankEinsumDense, einsum, ValueError, r"min\(5, 6\) = 5", rank=6
    )


# --- layers that cannot be adapted ----------------------------------------------


def test_unbuilt_layer():
    layer = keras.layers.Dense(4, name="late")
    before = _state(layer)
    with pytest.raises(
        ValueError,
        match=r"^keras_lowrank: layer 'late': the layer is not built, so it "
        r"has no kernel to adapt yet\. Build the model first",
    ):
        LowRankDense.from_layer(layer)
    _assert_same_state(before, _state(layer))


def test_kernel_constraint():
    layer = keras.layers.Dense(4, kernel_constraint="non_neg", name="nn")
    layer.build((None, 3))
    _assert_from_layer_fails(
        LowRankDense,
        layer,
        ValueError,
        r"has a kernel constraint, which a low-rank update would bypass\. "
        r"Remove `kernel_constraint`",
    )
    with pytest.raises(ValueError, match=r"layer 'nn2': .*kernel constraint"):
        LowRankDense(4, kernel_constraint="non_neg", name="nn2")
    embedding = keras.layers.Embedding(10, 4, embeddings_constraint="unit_norm")
    embedding.build()
    _assert_from_layer_fails(
        LowRankEmbedding, embedding, ValueError, r"`embeddings_constraint`"
    )


def test_int_dtype_policy():
    if keras.backend.backend() == "torch":
        # torch cannot even build it (an int tensor cannot require
        # gradients), so give a built float layer an int policy.
        layer = keras.layers.Dense(4, name="ints")
        layer.build((None, 3))
        layer.dtype_policy = "int32"
    else:
        layer = keras.layers.Dense(
            4, dtype="int32", kernel_initializer="zeros", name="ints"
        )
        layer.build((None, 3))
    _assert_from_layer_fails(
        LowRankDense,
        layer,
        TypeError,
        r"unsupported dtype 'int32'; adapters need a floating-point kernel "
        r"\(float16, bfloat16, float32, float64\)\. Use a float dtype policy",
    )
    with pytest.raises(
        TypeError, match=r"^keras_lowrank: layer 'ints2': unsupported dtype"
    ):
        LowRankDense(4, dtype="int32", name="ints2")


def test_float8_quantized_layer():
    # int8/int4 bases are supported (tests/test_quantized.py); float8 is not.
    layer = keras.layers.Dense(4, name="q")
    layer.build((None, 8))
    layer.quantize("float8")
    _assert_from_layer_fails(
        LowRankDense,
        layer,
        TypeError,
        r"cannot adapt a layer quantized with 'float8': float8 training "
        r"fake-quantizes the kernel .* Adapters support 'int8' and 'int4' "
        r"bases\.",
    )


def test_subclass_is_refused():
    class ScaledDense(keras.layers.Dense):
        def call(self, inputs):
            return 2.0 * super().call(inputs)

    layer = ScaledDense(4, name="scaled")
    layer.build((None, 3))
    _assert_from_layer_fails(
        LowRankDense,
        layer,
        TypeError,
        r"LowRankDense adapts exactly `keras.layers.Dense` layers, not "
        r"ScaledDense \(a subclass, whose own `call` would be lost\)\. Leave "
        r"this layer out of `targets`",
    )


def test_wrong_layer_type_is_refused():
    conv = keras.layers.Conv1D(4, 3, name="conv")
    conv.build((None, 8, 3))
    _assert_from_layer_fails(
        LowRankDense,
        conv,
        TypeError,
        r"not Conv1D \(another kind of layer\)",
    )


def test_keras_builtin_lora_is_refused():
    layer = keras.layers.Dense(4, name="kl")
    layer.build((None, 3))
    layer.enable_lora(2)
    _assert_from_layer_fails(
        LowRankDense,
        layer,
        ValueError,
        r"Keras's built-in LoRA is enabled on this layer.*rebuild the layer "
        r"without `lora_rank`/`enable_lora`, then adapt it\.",
    )
    with pytest.raises(ValueError, match=r"layer 'kl2': Keras's built-in"):
        LowRankDense(4, lora_rank=2, name="kl2")


def test_grouped_conv_is_refused():
    conv = keras.layers.Conv2D(4, 3, groups=2, name="grouped")
    conv.build((None, 6, 6, 4))
    _assert_from_layer_fails(
        LowRankConv2D,
        conv,
        ValueError,
        r"grouped convolutions \(groups=2\) have a block-diagonal kernel.*"
        r"Exclude this layer, or use groups=1\.",
    )
    with pytest.raises(ValueError, match=r"layer 'g2': grouped conv"):
        LowRankConv2D(4, 3, groups=2, name="g2")


def test_dropout_on_embedding_is_refused():
    embedding = keras.layers.Embedding(10, 4, name="tokens")
    embedding.build()
    info = _assert_from_layer_fails(
        LowRankEmbedding,
        embedding,
        ValueError,
        r"dropout=0\.1 cannot apply to an Embedding, whose input is token "
        r"ids\. Use dropout=0\.0 for this layer",
        rank=2,
        dropout=0.1,
    )
    assert "Embedding" in str(info.value)
    with pytest.raises(ValueError, match=r"layer 'tok2': dropout=0\.2"):
        LowRankEmbedding(10, 4, rank=2, dropout=0.2, name="tok2")


def test_einsum_equation_without_factorisation():
    layer = keras.layers.EinsumDense("ab,bc->ac", output_shape=4, name="ok")
    layer.build((None, 3))
    LowRankEinsumDense.from_layer(layer, rank=1)  # fine
    with pytest.raises(
        ValueError,
        match=r"^keras_lowrank: layer 'bad': kernel axis 'c' of 'ab,bcd->ad' "
        r"is summed within the kernel alone.*Exclude this layer\.",
    ):
        LowRankEinsumDense("ab,bcd->ad", output_shape=4, name="bad")


# --- layers that are adapted already ------------------------------------------------


def test_second_adapter_with_same_name_keeps_the_first():
    layer = _dense_in_model()
    LowRankDense.from_layer(layer, rank=2)
    before = _state(layer)
    with pytest.raises(
        ValueError,
        match=r"^keras_lowrank: layer 'sequential/proj': an adapter named "
        r"'default' already exists\. Choose another name",
    ):
        LowRankDense.from_layer(layer, rank=2)
    _assert_same_state(before, _state(layer))
    assert layer.adapter_names == ["default"]
    # Another name is fine: a second adapter, both active.
    LowRankDense.from_layer(layer, rank=1, adapter_name="second")
    assert layer.adapter_names == ["default", "second"]


def test_other_adapter_class_is_refused():
    layer = _dense_in_model()
    LowRankDense.from_layer(layer, rank=2)
    before = _state(layer)
    with pytest.raises(
        TypeError,
        match=r"the layer is a LowRankDense already, not a LowRankConv1D\. "
        r"Use `LowRankDense.from_layer`",
    ):
        LowRankConv1D.from_layer(layer, rank=1)
    _assert_same_state(before, _state(layer))


def test_failed_from_layer_leaves_a_working_plain_layer():
    """After a refusal late in the conversion (rank too large, known only
    once the class has changed), the layer is a plain, working Conv1D:
    Keras no longer passes it `training`."""
    conv = keras.layers.Conv1D(4, 3, name="conv")
    x = np.ones((1, 6, 3), "float32")
    y = ops.convert_to_numpy(conv(x))
    before = _state(conv)
    with pytest.raises(ValueError, match="larger than min"):
        LowRankConv1D.from_layer(conv, rank=5)
    _assert_same_state(before, _state(conv))
    assert type(conv) is keras.layers.Conv1D
    assert not conv._call_has_training_arg
    np.testing.assert_array_equal(ops.convert_to_numpy(conv(x)), y)
    # And it can still be adapted afterwards.
    LowRankConv1D.from_layer(conv, rank=2)
    assert conv._call_has_training_arg


def test_config_from_a_newer_version_names_the_layer():
    config = LowRankDense(4, rank=2, name="head").get_config()
    config["adapters"]["default"]["future_option"] = 1
    # Keras's `from_config` wraps the layer's error in a TypeError that
    # quotes it in full.
    with pytest.raises(
        (ValueError, TypeError),
        match=r"keras_lowrank: layer 'head': unknown adapter option\(s\) "
        r"\['future_option'\].*upgrade keras_lowrank\.",
    ):
        LowRankDense.from_config(config)
    config["adapters"]["default"].pop("future_option")
    config["adapters"]["default"]["rank"] = 0
    with pytest.raises(
        (ValueError, TypeError), match=r"layer 'head': rank must be"
    ):
        LowRankDense.from_config(config)


# --- one adapter-spec argument ------------------------------------------------


def test_adapter_argument_equals_the_keywords():
    from keras_lowrank import AdapterSpec

    spec = AdapterSpec(rank=2, alpha=6, method="dora", dropout=0.1)
    by_spec = LowRankDense(4, adapter=spec, name="a")
    by_keywords = LowRankDense(
        4, rank=2, alpha=6, method="dora", dropout=0.1, name="a"
    )
    assert by_spec.get_config() == by_keywords.get_config()
    config = by_spec.get_config()
    assert set(config) >= {"adapters", "active_adapters", "merged_adapters"}
    assert config["adapters"]["default"] == spec.get_config()
    # The saved format still loads (no `adapter` key in it).
    twin = LowRankDense.from_config(config)
    twin.build((None, 3))
    assert twin.adapter_spec("default") == spec
    layer = LowRankEinsumDense("ab,bc->ac", (4,), adapter=spec)
    layer.build((None, 3))
    assert layer.adapter_spec("default") == spec
    plain = keras.layers.Dense(4)
    plain.build((None, 3))
    LowRankDense.from_layer(plain, adapter=spec, adapter_name="task")
    assert plain.adapter_spec("task") == spec


@pytest.mark.parametrize(
    "make",
    [
        lambda spec: LowRankDense(4, adapter=spec, rank=4, name="head"),
        lambda spec: LowRankEmbedding(10, 4, adapter=spec, alpha=2.0, name="head"),
        lambda spec: LowRankConv2D(4, 3, adapter=spec, rank=4, name="head"),
    ],
)
def test_adapter_argument_and_a_keyword_conflict(make):
    from keras_lowrank import AdapterSpec

    with pytest.raises(TypeError, match=r"layer 'head': LowRank\w+ got both "
                       r"adapter= and (rank=4|alpha=2\.0)\. Give the adapter's "
                       r"options once: either adapter=AdapterSpec\(\.\.\.\) "
                       r"or the keywords"):
        make(AdapterSpec(rank=2))


def test_adapter_argument_errors():
    from keras_lowrank import AdapterSpec

    with pytest.raises(TypeError, match=r"layer 'head': LowRankDense got "
                       r"adapter=\{'rank': 2\} \(dict\); pass an AdapterSpec"):
        LowRankDense(4, adapter={"rank": 2}, name="head")
    with pytest.raises(TypeError, match=r"got both adapter= and adapters= "
                       r"\(the saved state\)\. Pass one of them\."):
        LowRankDense(
            4, adapter=AdapterSpec(rank=2), name="head",
            adapters={"default": AdapterSpec(rank=2).get_config()},
        )
    plain = _dense_in_model()
    _assert_from_layer_fails(
        LowRankDense, plain, TypeError,
        r"LowRankDense\.from_layer got both adapter= and rank=4\.",
        adapter=AdapterSpec(rank=2), rank=4,
    )


# --- seeds ------------------------------------------------------------------------

BAD_SEEDS = [-1, 2**32, 1.5, "7", True]


@pytest.mark.parametrize("seed", BAD_SEEDS, ids=[repr(s) for s in BAD_SEEDS])
def test_bad_seed(seed):
    match = (
        r"seed must be None or an integer in \[0, 2\*\*32\), got "
        + re.escape(repr(seed))
        + r"\. Pass a non-negative int such as seed=0, or seed=None"
    )
    _assert_from_layer_fails(
        LowRankDense, _dense_in_model(), ValueError, match, rank=2, seed=seed
    )
    layer = LowRankDense(4, rank=2, name="head")
    layer.build((None, 3))
    from keras_lowrank import AdapterSpec

    with pytest.raises(ValueError, match=r"layer 'head': " + match):
        layer.add_adapter("second", AdapterSpec(rank=1), seed=seed)
    assert layer.adapter_names == ["default"]


def test_adapt_with_a_negative_seed_is_refused_and_changes_nothing():
    import keras_lowrank

    model = keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(6), keras.layers.Dense(2)]
    )
    with pytest.raises(ValueError, match=r"seed must be None or an integer in "
                       r"\[0, 2\*\*32\), got -1\. Pass a non-negative int"):
        keras_lowrank.adapt(model, rank=2, seed=-1)
    assert [type(x).__name__ for x in model.layers] == ["Dense", "Dense"]
    keras_lowrank.adapt(model, rank=2, seed=0)  # the fix works


def test_unknown_adapter_is_the_one_message():
    layer = LowRankDense(4, rank=2, name="head")
    layer.build((None, 3))
    for call in (
        lambda: layer.adapter_spec("nope"),
        lambda: layer.adapter_variables("nope"),
        lambda: layer.delete_adapter("nope"),
        lambda: layer.merge(["nope"]),
        lambda: layer.set_active_adapters(["nope"]),
    ):
        with pytest.raises(ValueError, match=r"^keras_lowrank: layer 'head' "
                           r"has no adapter named 'nope'; it has "
                           r"\['default'\]\. Use one of those names\.$"):
            call()
