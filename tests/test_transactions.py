"""Every verb is all-or-nothing: a fault at the second adapted layer leaves
the model exactly as before.

A table: model kinds (Sequential, Functional, subclassed with nested
sublayers, a KerasHub classifier built from config) × verbs × adapter kinds
(LoRA, `init="pissa_niter_4"`, which rewrites kernels, and DoRA). The fault is
a `MemoryError` raised by the second call of a layer method the verb uses;
afterwards outputs, every weight (bit for bit), layer classes, trainable
flags, adapters, active and merged sets and the model state are as before.
"""

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
