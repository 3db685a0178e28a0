"""Small models and checks shared by the lifecycle and adapter-file tests."""

import keras
import numpy as np

from keras_lowrank.surgery.walk import walk


def mlp(widths=(16, 16), name="mlp", inputs=8, outputs=2):
    """A Sequential MLP with explicit layer names (paths must not depend on
    how many models the session built before)."""
    layers = [keras.Input((inputs,))]
    layers += [keras.layers.Dense(w, name=f"d{i + 1}") for i, w in enumerate(widths)]
    layers.append(keras.layers.Dense(outputs, name="out"))
    return keras.Sequential(layers, name=name)


def tiny_bert(seed=0, num_classes=2):
    """A random one-layer BertTextClassifier (no preprocessor)."""
    import keras_hub

    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=50,
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=8,
        name="bert_backbone",
    )
    return keras_hub.models.BertTextClassifier(
        backbone=backbone, num_classes=num_classes, preprocessor=None, name="clf"
    )


def bert_inputs(batch=8, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "token_ids": rng.integers(0, 50, (batch, 8)).astype("int32"),
        "segment_ids": np.zeros((batch, 8), "int32"),
        "padding_mask": np.ones((batch, 8), "int32"),
    }


def randomize(model, names=None, scale=0.5, seed=0):
    """Gives adapters non-zero factors (B starts at zero)."""
    rng = np.random.default_rng(seed)
    for visit in walk(model):
        layer = visit.layer
        for name in getattr(layer, "adapter_names", []):
            if names is not None and name not in names:
                continue
            for key, var in layer.adapter_variables(name).items():
                if key in ("A", "B"):
                    var.assign(rng.normal(0, scale, var.shape).astype("float32"))


def to_np(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def delta(layer, name):
    """`s·A·B` of adapter `name` in matrix form, computed in NumPy."""
    spec = layer.adapter_spec(name)
    layout = layer.lowrank_layout
    variables = layer.adapter_variables(name)
    a = to_np(variables["A"]).reshape(layout.batch_shape + (layout.d, spec.rank))
    b = to_np(variables["B"]).reshape(layout.batch_shape + (spec.rank, layout.k))
    return spec.scale * (a.astype("float64") @ b.astype("float64"))


def merged_delta(layer, name):
    """The layer's own `delta()` (what merging adds), in matrix form."""
    layout = layer.lowrank_layout
    return to_np(layout.to_matrix(layer.delta(name))).astype("float64")


def reference_mlp(model, x, active):
    """Closed form of an MLP of Dense layers (no activation) with the
    `active` adapters' deltas added to the kernels."""
    h = np.asarray(x, "float64")
    for layer in model.layers:
        w = to_np(layer.kernel).astype("float64")
        for name in active:
            if name in getattr(layer, "adapter_names", []):
                w = w + delta(layer, name)
        h = h @ w + to_np(layer.bias)
    return h


def model_snapshot(model):
    """Everything an all-or-nothing operation must leave as it was."""
    state = getattr(model, "_keras_lowrank", None)
    return {
        "model_class": type(model),
        "layers": [
            (
                v.path,
                type(v.layer),
                v.layer.trainable,
                tuple(getattr(v.layer, "adapter_names", ())),
                tuple(getattr(v.layer, "active_adapters", ())),
                tuple(getattr(v.layer, "merged_adapters", ())),
            )
            for v in walk(model)
        ],
        "weights": [(w.path, w.trainable, to_np(w).copy()) for w in model.weights],
        "state": None
        if state is None
        else (
            repr(state.options),
            list(state.active),
            dict(state.holders),
            {o: {k: v.copy() for k, v in d.items()} for o, d in state.stash.items()},
        ),
    }


def assert_same_snapshot(before, after):
    assert before["model_class"] is after["model_class"]
    assert before["layers"] == after["layers"]
    assert len(before["weights"]) == len(after["weights"])
    for (p1, t1, v1), (p2, t2, v2) in zip(before["weights"], after["weights"]):
        assert (p1, t1) == (p2, t2)
        np.testing.assert_array_equal(v1, v2)
    if before["state"] is None:
        assert after["state"] is None
        return
    assert before["state"][:3] == after["state"][:3]
    stash_a, stash_b = before["state"][3], after["state"][3]
    assert stash_a.keys() == stash_b.keys()
    for owner in stash_a:
        assert stash_a[owner].keys() == stash_b[owner].keys()
        for key in stash_a[owner]:
            np.testing.assert_array_equal(stash_a[owner][key], stash_b[owner][key])
