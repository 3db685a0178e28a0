"""Every verb is all-or-nothing: a fault at the second adapted layer leaves
the model exactly as before.

A table: model kinds (Sequential, Functional, subclassed with nested
sublayers, a KerasHub classifier built from config) × verbs × adapter kinds
(LoRA, `init="pissa_niter_4"`, which rewrites kernels, and DoRA). The fault is
a `MemoryError` raised by the second call of a layer method the verb uses;
afterwards outputs, every weight (bit for bit), layer classes, trainable
flags, adapters, active and merged sets and the model state are as before.
"""

import keras
import numpy as np
import pytest
from _lifecycle_helpers import assert_same_snapshot
from _lifecycle_helpers import model_snapshot
from model_kinds import KINDS
from model_kinds import outputs
from model_kinds import randomize_adapters

import keras_lowrank as kl
from keras_lowrank.layers import LowRankLayer

MODEL_KINDS = ["sequential", "functional", "subclassed", "bert_classifier"]
VARIANTS = {
    "lora": {},
    "pissa_niter_4": {"init": "pissa_niter_4"},
    "dora": {"method": "dora"},
}


def _sources(variant):
    # DoRA's update is not a product A·B: combine() refuses it.
    return ["b"] if variant == "dora" else ["a", "b"]


def _disable(model, variant):
    with kl.disable_adapters(model):
        pass


# verb -> (prepare, call, the layer method that fails on its 2nd call)
VERBS = {
    "adapt": (
        None,
        lambda m, v, kind: kl.adapt(
            m, rank=2, name="c", targets=list(kind.default_targets),
            **VARIANTS[v],
        ),
        "add_adapter",
    ),
    "unload": (None, lambda m, v, kind: kl.unload(m), "forget_adapter"),
    "merge": (None, lambda m, v, kind: kl.merge(m), "merge"),
    "unmerge": (kl.merge, lambda m, v, kind: kl.unmerge(m), "unmerge"),
    "set_adapter": (
        None, lambda m, v, kind: kl.set_adapter(m, "b"), "set_active_adapters"
    ),
    "delete_adapter": (
        None, lambda m, v, kind: kl.delete_adapter(m, "a"), "delete_adapter"
    ),
    "disable_adapters": (
        kl.merge, lambda m, v, kind: _disable(m, v), "unmerge"
    ),
    "combine": (
        None,
        lambda m, v, kind: kl.combine(
            m, _sources(v), [0.5] * len(_sources(v)), "mix", how="cat"
        ),
        "add_adapter",
    ),
}


def build(kind_name, variant):
    """A model holding a LoRA adapter "b" and the `variant` adapter "a"
    (active) on the kind's default targets, with non-zero factors."""
    kind = KINDS[kind_name]
    model = kind.build()
    targets = list(kind.default_targets)
    kl.adapt(model, rank=2, name="b", targets=targets, seed=1)
    kl.adapt(model, rank=2, name="a", targets=targets, seed=2, **VARIANTS[variant])
    randomize_adapters(model)
    return kind, model


def fail_on_second_call(monkeypatch, method):
    original = getattr(LowRankLayer, method)
    calls = []

    def faulty(self, *args, **kwargs):
        calls.append(self.path)
        if len(calls) == 2:
            raise MemoryError(f"injected: {method} on '{self.path}'")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LowRankLayer, method, faulty)
    return calls


# Which adapter kinds change what a verb does: set_adapter writes no kernel,
# and combine() leaves DoRA adapters out.
VARIANTS_FOR = {"set_adapter": ["lora"], "combine": ["lora", "pissa_niter_4"]}
CASES = [
    (kind_name, verb, variant)
    for kind_name in MODEL_KINDS
    for verb in VERBS
    for variant in VARIANTS_FOR.get(verb, list(VARIANTS))
]


@pytest.mark.parametrize("kind_name, verb, variant", CASES)
def test_a_fault_at_the_second_layer_leaves_the_model_as_it_was(
    kind_name, verb, variant, monkeypatch
):
    kind, model = build(kind_name, variant)
    prepare, call, method = VERBS[verb]
    if prepare is not None:
        prepare(model)
    inputs = kind.inputs()
    expected = outputs(model, inputs)
    before = model_snapshot(model)
    calls = fail_on_second_call(monkeypatch, method)
    with pytest.raises(MemoryError, match=f"injected: {method}"):
        call(model, variant, kind)
    monkeypatch.undo()
    assert len(calls) >= 2  # the fault did fire, at the second layer
    assert_same_snapshot(before, model_snapshot(model))
    np.testing.assert_array_equal(outputs(model, inputs), expected)
    assert not model._keras_lowrank.disabled
    # And the verb works afterwards.
    call(model, variant, kind)


def test_a_failed_verb_keeps_the_optimizer_and_training_works(monkeypatch):
    kind, model = build("sequential", "lora")
    model.compile(optimizer="adam", loss="mse")
    x = kind.inputs()
    y = np.zeros(outputs(model, x).shape, "float32")
    model.fit(x, y, epochs=1, verbose=0)
    optimizer = model.optimizer
    calls = fail_on_second_call(monkeypatch, "set_active_adapters")
    with pytest.raises(MemoryError, match="injected"):
        kl.set_adapter(model, "b")
    monkeypatch.undo()
    assert len(calls) >= 2
    assert model.optimizer is optimizer
    before = model_snapshot(model)["weights"]
    model.fit(x, y, epochs=1, verbose=0)
    after = model_snapshot(model)["weights"]
    changed = [p for (p, _, v), (_, _, w) in zip(before, after) if not np.array_equal(v, w)]
    assert changed and all("lowrank_" in p and p.endswith("_a") for p in changed)


# --- the verbs that read or write files ---------------------------------------
#
# verb -> (kinds, prepare(model, folder), call(model, folder), fault): the
# fault is `(owner, attribute)`, patched to raise on its second call.


def _save_a(model, folder):
    kl.save_adapter(model, folder / "a.safetensors", "a")


def _save_a_then_change_it_and_merge(model, folder):
    # The file holds other values than the model's merged adapter "a":
    # loading unmerges, assigns, and merges again.
    _save_a(model, folder)
    randomize_adapters(model, seed=7)
    kl.merge(model)  # "a" is the active adapter


def _export_b(model, folder):
    kl.export_peft_adapter(model, folder / "peft", "b")


def _export_module():
    from keras_lowrank.integrations.peft import export

    return export


HUB_KINDS = ["bert_classifier"]
FILE_VERBS = {
    "load_adapter (new name)": (
        MODEL_KINDS, _save_a,
        lambda m, f: kl.load_adapter(m, f / "a.safetensors", "c"),
        (LowRankLayer, "add_adapter"),
    ),
    "load_adapter (into a merged adapter)": (
        MODEL_KINDS, _save_a_then_change_it_and_merge,
        lambda m, f: kl.load_adapter(m, f / "a.safetensors"),
        (LowRankLayer, "merge"),
    ),
    "load_peft_adapter": (
        HUB_KINDS, _export_b,
        lambda m, f: kl.load_peft_adapter(m, f / "peft", "c"),
        (LowRankLayer, "add_adapter"),
    ),
    "save_adapter": (
        MODEL_KINDS, None,
        lambda m, f: kl.save_adapter(m, f / "out.safetensors", "a"),
        (LowRankLayer, "adapter_for_original_kernel"),
    ),
    "export_peft_adapter": (
        HUB_KINDS, None,
        lambda m, f: kl.export_peft_adapter(m, f / "out", "b"),
        (_export_module, "peft_factors"),
    ),
}
FILE_VARIANTS = {
    # Only LoRA exports to PEFT ("b" is LoRA in every variant).
    "load_peft_adapter": ["lora"],
    "export_peft_adapter": ["lora"],
    # A PiSSA adapter's file holds its rank-2r equivalent on the original
    # kernel, which the model's own PiSSA adapter refuses (another spec).
    "load_adapter (into a merged adapter)": ["lora", "dora"],
}
FILE_CASES = [
    (kind_name, verb, variant)
    for verb, (kinds, _, _, _) in FILE_VERBS.items()
    for kind_name in kinds
    for variant in FILE_VARIANTS.get(verb, list(VARIANTS))
]


@pytest.mark.parametrize("kind_name, verb, variant", FILE_CASES)
def test_a_fault_in_a_file_verb_leaves_the_model_and_folder_as_they_were(
    kind_name, verb, variant, monkeypatch, tmp_path
):
    kinds, prepare, call, (owner, attribute) = FILE_VERBS[verb]
    kind, model = build(kind_name, variant)
    if prepare is not None:
        prepare(model, tmp_path)
    inputs = kind.inputs()
    expected = outputs(model, inputs)
    before = model_snapshot(model)
    files = sorted(p.name for p in tmp_path.iterdir())
    owner = owner() if callable(owner) and not isinstance(owner, type) else owner
    original = getattr(owner, attribute)
    calls = []

    def faulty(*args, **kwargs):
        calls.append(attribute)
        if len(calls) == 2:
            raise MemoryError(f"injected: {attribute}")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, attribute, faulty)
    with pytest.raises(MemoryError, match=f"injected: {attribute}"):
        call(model, tmp_path)
    monkeypatch.undo()
    assert len(calls) == 2
    assert_same_snapshot(before, model_snapshot(model))
    np.testing.assert_array_equal(outputs(model, inputs), expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == files
    call(model, tmp_path)  # and the verb works afterwards


def test_saving_an_adapter_from_a_callback_keeps_fit_running(tmp_path):
    # save_adapter only reads the model: it must not drop the train
    # function that fit() is running.
    kind, model = build("sequential", "lora")
    model.compile(optimizer="adam", loss="mse")
    x = kind.inputs()
    y = np.zeros(outputs(model, x).shape, "float32")
    saved = []

    class SaveEachBatch(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            path = tmp_path / f"step{batch}.safetensors"
            saved.append(kl.save_adapter(self.model, path, "a"))

    model.fit(x, y, batch_size=2, epochs=1, verbose=0, callbacks=[SaveEachBatch()])
    assert len(saved) >= 2
    assert model.train_function is not None
