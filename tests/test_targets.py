"""Which layers `adapt()` targets: the defaults (KerasHub backbones, the
output layers of plain models found from the call graph), literal names
before globs, misspelt entries, argument types, and what gets recorded."""

import re

import keras
import numpy as np
import pytest

import keras_lowrank
import model_kinds
from keras_lowrank.io.manifest import manifest
from keras_lowrank.state.model_state import state_of
from model_kinds import fingerprint


def adapted_paths(model):
    return [row.path for row in keras_lowrank.report(model).rows]


def sequential(*tail, name="seq"):
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, name="hidden"),
            keras.layers.Dense(6, name="hidden2"),
            keras.layers.Dense(6, name="logits"),
            *tail,
        ],
        name=name,
    )


# --- default targets: KerasHub backbones ------------------------------------


def _bert_backbone():
    return model_kinds._bert_backbone()


def _llama_backbone():
    return model_kinds.build_llama_causal_lm().backbone


def _gemma_backbone():
    return model_kinds.build_gemma_causal_lm().backbone


@pytest.mark.parametrize(
    "build, attention",
    [
        (_bert_backbone, "transformer_layer_{}/self_attention_layer"),
        (_llama_backbone, "transformer_layer_{}/self_attention"),
        (_gemma_backbone, "decoder_block_{}/attention"),
    ],
    ids=["bert", "llama", "gemma"],
)
def test_bare_backbone_gets_query_and_value_by_default(build, attention):
    pytest.importorskip("keras_hub")
    backbone = build()
    keras_lowrank.adapt(backbone, rank=2)
    assert adapted_paths(backbone) == [
        f"{attention.format(i)}/{n}" for i in range(2) for n in ("query", "value")
    ]


# --- default targets: output layers of plain models -------------------------


@pytest.mark.parametrize(
    "tail",
    [
        [keras.layers.Softmax(name="probs")],
        [keras.layers.Activation("sigmoid", name="act")],
        [keras.layers.Reshape((2, 3), name="reshape")],
        [keras.layers.Dropout(0.5, name="drop")],
        [keras.layers.Dropout(0.5), keras.layers.Softmax(), keras.layers.Flatten()],
    ],
    ids=["softmax", "activation", "reshape", "dropout", "several"],
)
def test_output_layer_followed_by_kernel_free_layers_is_left_out(tail):
    model = sequential(*tail)
    keras_lowrank.adapt(model, rank=2)
    assert adapted_paths(model) == ["hidden", "hidden2"]
    model = sequential(*tail)
    keras_lowrank.adapt(model, rank=2, targets="all-linear")
    assert adapted_paths(model) == ["hidden", "hidden2"]


class HeadFirst(keras.Model):
    """Creates its head before the layers that feed it, and applies raw ops
    after it."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.head = keras.layers.Dense(3, name="head")
        self.stem = keras.layers.Dense(8, name="stem")
        self.mid = keras.layers.Dense(8, name="mid")

    def call(self, x):
        return keras.ops.softmax(self.head(keras.ops.relu(self.mid(self.stem(x)))))


def test_subclassed_head_created_first_is_left_out():
    model = HeadFirst()
    model(np.zeros((2, 4), "float32"))
    keras_lowrank.adapt(model, rank=2)
    assert adapted_paths(model) == ["stem", "mid"]


class TakesMode(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.head = keras.layers.Dense(3, name="head")
        self.stem = keras.layers.Dense(8, name="stem")

    def call(self, x, mode):
        return self.head(self.stem(x))


def test_model_that_cannot_be_run_falls_back_with_a_warning():
    model = TakesMode()
    model(np.zeros((2, 4), "float32"), mode="a")
    with pytest.warns(UserWarning, match=r"could not run model .* leaving out its last Dense/EinsumDense 'stem'"):
        keras_lowrank.adapt(model, rank=2)
    assert adapted_paths(model) == ["head"]


def test_every_head_of_a_two_output_model_is_left_out():
    inputs = keras.Input((4,))
    x = keras.layers.Dense(8, name="trunk")(inputs)
    a = keras.layers.Dense(3, name="head_a")(x)
    b = keras.layers.Dense(2, name="head_b")(keras.layers.Dense(8, name="neck")(x))
    b = keras.layers.Softmax()(b)
    model = keras.Model(inputs, {"a": a, "b": b})
    keras_lowrank.adapt(model, rank=2)
    assert adapted_paths(model) == ["trunk", "neck"]


def test_layer_reaching_the_output_through_a_skip_connection_is_left_out():
    inputs = keras.Input((4,))
    h = keras.layers.Dense(8, name="trunk")(inputs)
    h = keras.layers.Dense(8, name="hidden")(h)
    out = keras.layers.Add()([h, keras.layers.Dense(8, name="proj")(h)])
    model = keras.Model(inputs, out)
    keras_lowrank.adapt(model, rank=2)
    assert adapted_paths(model) == ["trunk"]


def test_finding_output_layers_leaves_the_model_as_it_was():
    model = HeadFirst()
    x = np.random.default_rng(0).normal(size=(2, 4)).astype("float32")
    before = keras.ops.convert_to_numpy(model(x))
    keras_lowrank.adapt(model, rank=2)
    assert all("call" not in layer.__dict__ for layer in model.layers)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(x)), before, atol=1e-6)


# --- literal names before globs ---------------------------------------------


def bracket_model():
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(4, name="block[0]"),
            keras.layers.Dense(4, name="block0"),
            keras.layers.Dense(4, name="block1"),
            keras.layers.Dense(2, name="out"),
        ]
    )


def test_exact_name_with_glob_characters_matches_literally():
    model = bracket_model()
    keras_lowrank.adapt(model, rank=2, targets=["block[0]"])
    assert adapted_paths(model) == ["block[0]"]


def test_string_naming_no_layer_is_a_glob():
    model = bracket_model()
    keras_lowrank.adapt(model, rank=2, targets=["block[01]"])
    assert adapted_paths(model) == ["block0", "block1"]


def test_rank_pattern_key_with_glob_characters_matches_literally():
    model = bracket_model()
    keras_lowrank.adapt(
        model, rank=2, targets=["block*"], rank_pattern={"block[0]": 1}
    )
    ranks = {row.path: row.rank for row in keras_lowrank.report(model).rows}
    assert ranks == {"block[0]": 1, "block0": 2, "block1": 2}


def test_rank_pattern_preset_and_regex_keys_still_work():
    model = sequential()
    keras_lowrank.adapt(
        model, rank=2, rank_pattern={"all-linear": 3, "hid.*2": 1}
    )
    ranks = {row.path: row.rank for row in keras_lowrank.report(model).rows}
    assert ranks == {"hidden": 3, "hidden2": 3}
    model = sequential()
    keras_lowrank.adapt(model, rank=2, rank_pattern={"hid.*2": 1})
    ranks = {row.path: row.rank for row in keras_lowrank.report(model).rows}
    assert ranks == {"hidden": 2, "hidden2": 1}


# --- entries that match nothing ---------------------------------------------

UNMATCHED = {
    "targets name": (
        dict(targets=["hidden", "hiden2"]),
        r"targets entry 'hiden2' matched no layer in model 'seq'\. Closest "
        r"layer names: 'hidden2', 'hidden'\. Fix the spelling, or remove it "
        r"from `targets`",
    ),
    "targets class": (
        dict(targets=["hidden", keras.layers.Conv2D]),
        r"targets entry Conv2D matched no layer in model 'seq'\. Layer paths "
        r"include: 'input_layer",
    ),
    "targets pattern": (
        dict(targets=["hidden", re.compile("nope.*")]),
        r"targets entry re\.compile\('nope\.\*'\) matched no layer",
    ),
    "targets glob": (
        dict(targets=["hidden", "zz*"]),
        r"targets entry 'zz\*' matched no layer",
    ),
    "lone regex": (dict(targets="hiddn.*"), r"targets entry re\.compile\('hiddn\.\*'\) matched no layer"),
    "exclude": (
        dict(exclude=["hiden2"]),
        r"exclude entry 'hiden2' matched no layer in model 'seq'\. Closest "
        r"layer names: 'hidden2'",
    ),
    "rank_pattern": (
        dict(rank_pattern={"hidden": 1, "hiden2": 1}),
        r"rank_pattern key 'hiden2' matched no layer in the layers being "
        r"adapted\. Closest layer names: 'hidden2'",
    ),
    "rank_pattern on a layer left out": (
        dict(targets=["hidden"], rank_pattern={"hidden2": 1}),
        r"rank_pattern key 'hidden2' matched no layer in the layers being adapted",
    ),
    "alpha_pattern": (
        dict(alpha_pattern={"hiden": 4.0}),
        r"alpha_pattern key 'hiden' matched no layer in the layers being adapted",
    ),
    "trainable": (
        dict(trainable=["logit"]),
        r"trainable entry 'logit' matched no layer in model 'seq'\. Closest "
        r"layer names: 'logits'",
    ),
}


@pytest.mark.parametrize("case", list(UNMATCHED))
def test_entry_that_matches_nothing_raises_and_changes_nothing(case):
    kwargs, message = UNMATCHED[case]
    model = sequential()
    before = fingerprint(model)
    with pytest.raises(ValueError, match=message):
        keras_lowrank.adapt(model, rank=2, **kwargs)
    assert fingerprint(model) == before


# --- argument types ---------------------------------------------------------

BAD_ARGUMENTS = {
    "trainable twice": (
        dict(trainable=["hidden"], modules_to_save=["hidden"]), TypeError,
        r"adapt\(\) got both `trainable` and `modules_to_save`, which are one "
        r"option \(PEFT's name and ours\)\. Pass one of them\.",
    ),
    "int targets": (
        dict(targets=123), TypeError, r"targets=123 \(int\) is not a target\. Pass a layer name",
    ),
    "bytes targets": (
        dict(targets=b"x"), TypeError, r"targets=b'x' \(bytes\) is not a target",
    ),
    "dict targets": (
        dict(targets={"hidden": 2}), TypeError, r"targets=\{'hidden': 2\} \(dict\) is not a target",
    ),
    "int entry": (
        dict(targets=["hidden", 3]), TypeError, r"targets entry 3 \(int\) is not a target\. Each entry is",
    ),
    "int exclude": (
        dict(exclude=5), TypeError, r"exclude=5 \(int\) is not a target",
    ),
    "bad regex": (
        dict(targets="hidden("), ValueError,
        r"targets='hidden\(' is not a valid regular expression .*Escape it "
        r"\(re\.escape\), or pass names in a list: targets=\['hidden\('\]",
    ),
    "list rank_pattern": (
        dict(rank_pattern=[("hidden", 2)]), TypeError,
        r"rank_pattern must be a dict from layer pattern to value, such as "
        r"\{'value': 16\}; got list",
    ),
    "str alpha_pattern": (
        dict(alpha_pattern="hidden"), TypeError, r"alpha_pattern must be a dict",
    ),
    "int rank_pattern key": (
        dict(rank_pattern={0: 2}), TypeError, r"rank_pattern key 0 \(int\) is not a layer pattern",
    ),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_target_arguments_name_the_argument(case):
    kwargs, error, message = BAD_ARGUMENTS[case]
    model = sequential()
    before = fingerprint(model)
    with pytest.raises(error, match=message):
        keras_lowrank.adapt(model, rank=2, **kwargs)
    assert fingerprint(model) == before


# --- what gets recorded -----------------------------------------------------


def test_generators_are_read_once_and_recorded(tmp_path):
    model = sequential()
    keras_lowrank.adapt(
        model,
        rank=2,
        targets=(n for n in ["hidden", "hidden2", "logits"]),
        exclude=(n for n in ["logits"]),
    )
    assert adapted_paths(model) == ["hidden", "hidden2"]
    options = state_of(model).options["default"]
    assert options["targets"] == ["hidden", "hidden2", "logits"]
    assert options["exclude"] == ["logits"]
    assert manifest(model)["options"]["default"]["targets"] == [
        "hidden", "hidden2", "logits",
    ]
    path = str(tmp_path / "a.adapter")
    keras_lowrank.save_adapter(model, path)
    config = keras_lowrank.io.adapter_files.read_adapter_config(path)
    assert config["adapter"]["targets"] == ["hidden", "hidden2", "logits"]
    assert config["adapter"]["exclude"] == ["logits"]


def test_trainable_generator_is_read_once():
    model = sequential()
    keras_lowrank.adapt(
        model, rank=2, targets=["hidden"], trainable=(n for n in ["logits"])
    )
    options = state_of(model).options["default"]
    assert options["trainable"] == ["logits"]
    assert options["kept"] == ["logits"]
    trainable = {w.path.split("/")[-2] for w in model.trainable_weights}
    assert trainable == {"hidden", "logits"}
