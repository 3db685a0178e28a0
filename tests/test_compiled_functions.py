"""Compiled functions follow the adapter state (issue 14, first part).

KerasHub's `CausalLM.generate` caches its compiled `generate_function`; on
TensorFlow that `tf.function` keeps whatever adapter state it was traced with,
so after `adapt`, `set_adapter`, `merge` or inside `disable_adapters` it would
silently generate with the old state. The one refresh after every verb drops
it with Keras's own train/test/predict functions (`surgery/freezing.py`).
"""

import numpy as np
import pytest

import keras_lowrank

import model_kinds

PROMPT = {
    "token_ids": np.array([[5, 9, 3, 0, 0, 0]], "int32"),
    "padding_mask": np.array([[1, 1, 1, 0, 0, 0]], "int32"),
}


def _generate(model):
    out = model.generate(PROMPT, max_length=model_kinds.SEQ, stop_token_ids=None)
    return np.asarray(out["token_ids"]).tolist()


def _strong(model, name, seed):
    rng = np.random.default_rng(seed)
    for layer in keras_lowrank.surgery.walk.walk(model):
        layer = layer.layer
        if isinstance(layer, keras_lowrank.LowRankLayer) and name in layer.adapter_names:
            for v in layer.adapter_variables(name).values():
                v.assign(3.0 * rng.normal(size=v.shape).astype("float32"))


def _fresh_generations(model, names):
    """What generate gives for each adapter when nothing was compiled yet."""
    out = {}
    for name in names:
        keras_lowrank.set_adapter(model, name)
        model.generate_function = None
        out[name] = _generate(model)
    return out


def test_generate_follows_adapt_set_adapter_merge_and_disable():
    pytest.importorskip("keras_hub")
    model = model_kinds.KINDS["llama_causal_lm"].build()
    model.compile(sampler="greedy")
    base = _generate(model)
    keras_lowrank.adapt(model, rank=4, targets="all-linear", name="a")
    _strong(model, "a", 1)
    keras_lowrank.adapt(model, rank=4, targets="all-linear", name="b")
    _strong(model, "b", 2)
    want = _fresh_generations(model, ["a", "b"])
    assert want["a"] != base and want["b"] != want["a"]  # the check can fail

    keras_lowrank.set_adapter(model, "a")
    assert _generate(model) == want["a"]          # compiled with "a"
    keras_lowrank.set_adapter(model, "b")
    assert _generate(model) == want["b"]          # not the stale "a"
    with keras_lowrank.disable_adapters(model):
        assert _generate(model) == base
    assert _generate(model) == want["b"]
    keras_lowrank.merge(model)
    assert _generate(model) == want["b"]          # merged once, not twice
    keras_lowrank.merge(model)
    assert _generate(model) == want["b"]
    keras_lowrank.unmerge(model)
    keras_lowrank.delete_adapter(model, "b")
    active = model._keras_lowrank.active
    assert _generate(model) == (want[active[0]] if active else base)
