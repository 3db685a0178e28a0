"""Adapted models through pickling, `clone_model`, `load_weights`, legacy
`.h5` saving and edited `.keras` manifests."""

import json
import os
import pickle
import re
import zipfile

import keras
import numpy as np
import pytest
from _lifecycle_helpers import assert_same_snapshot
from _lifecycle_helpers import mlp
from _lifecycle_helpers import model_snapshot
from _lifecycle_helpers import randomize
from _lifecycle_helpers import to_np

import keras_lowrank as kl
from keras_lowrank.io import manifest as manifest_lib
from keras_lowrank.io.keras_file import AdaptedModel
from keras_lowrank.io.keras_file import adopt

X = np.random.default_rng(2).normal(size=(4, 8)).astype("float32")


def two_adapters(seed=0):
    """An MLP with adapters 'a' (on d1, d2, owning the output layer) and 'b'
    (on d2), 'a' active, both moved off their initial values."""
    keras.utils.set_random_seed(seed)
    model = mlp()
    kl.adapt(model, rank=2, name="b", targets=["d2"])
    kl.adapt(model, rank=2, name="a", targets=["d1", "d2"], trainable=["out"])
    randomize(model, seed=seed + 1)
    out = model.get_layer("out").kernel
    out.assign(to_np(out) + 0.5)  # a's own copy of the head
    return model


def functional():
    inputs = keras.Input((8,))
    hidden = keras.layers.Dense(16, name="h")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2, name="o")(hidden), name="f")
    kl.adapt(model, rank=2, name="task", targets=["h"])
    randomize(model)
    return model


def outputs(model, names):
    out = {}
    for name in names:
        kl.set_adapter(model, name)
        out[name] = to_np(model(X))
    with kl.disable_adapters(model):
        out[None] = to_np(model(X))
    return out


# --- pickle -----------------------------------------------------------------------


def test_an_adapted_model_pickles_to_an_equal_adapted_model():
    model = two_adapters()
    expected = outputs(model, ["a", "b"])
    kl.set_adapter(model, "a")
    copy = pickle.loads(pickle.dumps(model))
    assert isinstance(copy, AdaptedModel) and copy is not model
    assert copy._keras_lowrank.active == ["a"]
    np.testing.assert_allclose(to_np(copy(X)), expected["a"], atol=1e-6)
    # Still switchable, with each adapter's own head and the base one.
    got = outputs(copy, ["a", "b"])
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, atol=1e-6)
    kl.set_adapter(copy, "a")
    kl.set_adapter(model, "a")
    # (Keras drops the model's own name from variable paths on a reload.)
    assert sorted(v.path.split("/")[-2:] for v in copy.trainable_variables) == sorted(
        v.path.split("/")[-2:] for v in model.trainable_variables
    )


def test_a_functional_adapted_model_pickles_too():
    model = functional()
    copy = pickle.loads(pickle.dumps(model))
    np.testing.assert_allclose(to_np(copy(X)), to_np(model(X)), atol=1e-6)
    assert copy.get_layer("h").adapter_names == ["task"]


# --- clone_model -------------------------------------------------------------------


def switchable(seed=0):
    """A Sequential model with adapters 'a' and 'b' that own no weights."""
    keras.utils.set_random_seed(seed)
    model = mlp()
    kl.adapt(model, rank=2, name="b", targets=["d2"])
    kl.adapt(model, rank=1, alpha=3, name="a", targets=["d1", "d2"])
    randomize(model, seed=seed + 1)
    return model


@pytest.mark.parametrize("kind", ["functional", "sequential"])
def test_a_clone_is_a_working_adapted_model(kind, tmp_path):
    model = functional() if kind == "functional" else switchable()
    names = ["task"] if kind == "functional" else ["a", "b"]
    kl.set_adapter(model, names[0])
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())  # clone_model copies no weights
    # A Functional clone has its state at once; a Sequential one gets it
    # from its layers on first use.
    state = adopt(clone)
    assert isinstance(clone, AdaptedModel)
    assert sorted(state.options) == sorted(names) and state.active == [names[0]]
    assert clone.get_layer("d1" if kind == "sequential" else "h").adapter_spec(
        names[0]
    ) == model.get_layer("d1" if kind == "sequential" else "h").adapter_spec(names[0])
    np.testing.assert_allclose(to_np(clone(X)), to_np(model(X)), atol=1e-6)
    assert sorted(v.path.split("/")[-2:] for v in clone.trainable_variables) == sorted(
        v.path.split("/")[-2:] for v in model.trainable_variables
    )
    # Switchable, and it saves and reloads as an adapted model.
    kl.set_adapter(clone, names[-1])
    kl.set_adapter(model, names[-1])
    np.testing.assert_allclose(to_np(clone(X)), to_np(model(X)), atol=1e-6)
    with kl.disable_adapters(clone), kl.disable_adapters(model):
        np.testing.assert_allclose(to_np(clone(X)), to_np(model(X)), atol=1e-6)
    path = str(tmp_path / "clone.keras")
    clone.save(path)
    loaded = kl.load_model(path)
    np.testing.assert_allclose(to_np(loaded(X)), to_np(model(X)), atol=1e-6)
    adapter = str(tmp_path / "clone.safetensors")
    kl.save_adapter(clone, adapter)
    assert kl.read_adapter_config(adapter)["name"] == names[-1]


def test_a_sequential_clone_switches_without_an_explicit_adopt():
    model = switchable()
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    kl.set_adapter(clone, "b")
    kl.set_adapter(model, "b")
    np.testing.assert_allclose(to_np(clone(X)), to_np(model(X)), atol=1e-6)


def test_a_clone_of_adapters_that_own_weights_is_refused():
    """Their own copies of a head or of biases live in the model's state,
    which clone_model does not copy: refused, pointing to pickle."""
    message = re.escape(
        "is a copy of an adapted model made by keras.models.clone_model, and "
        "its adapters keep their own copies of the weights of ['out'], which "
        "a clone does not carry. Copy the model with "
        "pickle.loads(pickle.dumps(model))"
    )
    clone = keras.models.clone_model(two_adapters())
    with pytest.raises(ValueError, match=message):
        adopt(clone)

    def graph():
        inputs = keras.Input((8,))
        hidden = keras.layers.Dense(16, name="h")(inputs)
        return keras.Model(inputs, keras.layers.Dense(2, name="out")(hidden))

    model = kl.adapt(graph(), rank=2, targets=["h"], trainable=["out"])
    with pytest.raises(ValueError, match=message):
        keras.models.clone_model(model)
    model = kl.adapt(graph(), rank=2, targets=["h"], bias="lora_only")
    with pytest.raises(ValueError, match=re.escape("keep their own copies of the weights of ['h']")):
        keras.models.clone_model(model)


def test_adopt_leaves_plain_models_alone():
    plain = mlp()
    assert adopt(plain) is None
    assert not isinstance(plain, AdaptedModel)


# --- load_weights -----------------------------------------------------------------


def test_load_weights_of_a_file_that_does_not_fit_changes_nothing(tmp_path):
    source = mlp()
    kl.adapt(source, rank=2, name="other", targets=["d1", "d2"])
    for variable in source.weights:
        variable.assign(to_np(variable) + 1.0)
    path = str(tmp_path / "other.weights.h5")
    source.save_weights(path)
    model = two_adapters()
    before = model_snapshot(model)
    with pytest.raises(ValueError, match="the weights file lacks the copies of 'out/kernel'"):
        model.load_weights(path)
    assert_same_snapshot(before, model_snapshot(model))
    # A file that fits still loads.
    good = str(tmp_path / "good.weights.h5")
    twin = two_adapters(seed=4)
    twin.save_weights(good)
    model.load_weights(good)
    np.testing.assert_allclose(to_np(model(X)), to_np(twin(X)), atol=1e-6)


# --- legacy .h5 ---------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".h5", ".hdf5"])
def test_legacy_h5_saving_is_refused(tmp_path, suffix):
    model = two_adapters()
    path = str(tmp_path / f"m{suffix}")
    with pytest.raises(ValueError, match=re.escape(
        f"keras_lowrank: model.save('{path}'): model 'mlp' has adapters, and "
        "the legacy HDF5 format cannot record them (the file would never load "
        "again). Save it as a .keras file: model.save('model.keras')"
    )):
        model.save(path)
    assert not os.path.exists(path)
    with pytest.raises(ValueError, match=re.escape(
        "keras_lowrank: keras.saving.save_model(model, 'x.h5'): model 'mlp' "
        "has adapters, and the legacy HDF5 format cannot record them"
    )):
        keras.saving.save_model(model, path)


# --- the .keras manifest --------------------------------------------------------------


def _edit_manifest(source, target, change):
    """Copies the .keras file `source` to `target` with its adapter manifest
    edited by `change`."""
    with zipfile.ZipFile(source) as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    config = json.loads(files["config.json"])
    change(config["config"]["adapters"])
    files["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(target, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return target


@pytest.fixture
def saved_model(tmp_path):
    model = two_adapters()
    path = str(tmp_path / "m.keras")
    model.save(path)
    return model, path


def test_the_manifest_carries_a_checksum(saved_model):
    model, path = saved_model
    with zipfile.ZipFile(path) as archive:
        adapters = json.loads(archive.read("config.json"))["config"]["adapters"]
    assert adapters["format"] == 2 and re.fullmatch(r"[0-9a-f]{64}", adapters["sha256"])
    np.testing.assert_allclose(to_np(kl.load_model(path)(X)), to_np(model(X)), atol=1e-6)


def _more_alpha(manifest):
    for entry in manifest["layers"].values():
        for spec in entry["adapters"].values():
            spec["alpha"] = 40.0


def test_an_edited_manifest_is_refused_naming_the_file(saved_model, tmp_path):
    _, path = saved_model
    bad = _edit_manifest(path, str(tmp_path / "bad.keras"), _more_alpha)
    with pytest.raises(ValueError, match=re.escape(
        f"keras_lowrank: '{bad}': the adapter manifest of this .keras file "
        "does not match its checksum: the file was edited or is corrupt. Save "
        "the model again from the original."
    )):
        kl.load_model(bad)
    with pytest.raises(ValueError, match="does not match its checksum"):
        keras.saving.load_model(bad)  # Keras does not say which file


def _without_checksum(change):
    def edit(manifest):
        change(manifest)
        del manifest["sha256"]
        manifest["sha256"] = manifest_lib._checksum(manifest)

    return edit


MALFORMED = {
    "layers a list": (lambda m: m.__setitem__("layers", []), "it has no dict 'layers'"),
    "no options": (lambda m: m.pop("options"), "it has no dict 'options'"),
    "active unknown": (
        lambda m: m.__setitem__("active", ["zzz"]),
        "'active' names adapters it does not describe: ['zzz']",
    ),
    "layer active unknown": (
        lambda m: m["layers"]["d1"].__setitem__("active", ["zzz"]),
        "layers['d1']['active'] does not list adapters of that layer",
    ),
    "stash entry": (
        lambda m: m.__setitem__("stash", [["a", "out/kernel"]]),
        "a 'stash' entry is not [owner, key, shape, dtype]: ['a', 'out/kernel']",
    ),
    "spec": (
        lambda m: m["layers"]["d1"]["adapters"]["a"].__setitem__("rank", "two"),
        "layer 'd1' adapter 'a': ",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_manifest_is_a_clear_error(saved_model, tmp_path, case):
    _, path = saved_model
    change, problem = MALFORMED[case]
    bad = _edit_manifest(path, str(tmp_path / "bad.keras"), _without_checksum(change))
    with pytest.raises(ValueError, match=re.escape(
        f"keras_lowrank: '{bad}': the adapter manifest of this .keras file is "
        f"malformed: {problem}"
    )):
        kl.load_model(bad)


def test_format_1_manifests_still_load(saved_model, tmp_path):
    """Files from keras_lowrank 0.1 have no manifest checksum; they hold
    whole trained models, so they still load after the structural checks."""
    model, path = saved_model

    def old(manifest):
        manifest["format"] = 1
        del manifest["sha256"]

    legacy = _edit_manifest(path, str(tmp_path / "old.keras"), old)
    np.testing.assert_allclose(to_np(kl.load_model(legacy)(X)), to_np(model(X)), atol=1e-6)
    future = _edit_manifest(path, str(tmp_path / "new.keras"), lambda m: m.__setitem__("format", 3))
    with pytest.raises(ValueError, match=re.escape(
        "adapter manifest format 3 is not supported (this keras_lowrank reads "
        "format 2). Upgrade keras_lowrank."
    )):
        kl.load_model(future)


@pytest.mark.parametrize("value", [None, 7])
def test_load_model_needs_a_path(value):
    with pytest.raises(TypeError, match=re.escape(
        "keras_lowrank: load_model(filepath): `filepath` must be the path of a "
        f".keras file (a str or os.PathLike), not {type(value).__name__}"
    )):
        kl.load_model(value)
