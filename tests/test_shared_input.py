"""Sibling adapter layers that read one input share one `x·[s₁A₁|s₂A₂|…]`
product (`layers.shared_input`): the fused path is taken where the siblings
read the same tensor in one Keras call, gives the plain formula's outputs
and gradients, and steps aside everywhere else (other inputs, separate
calls, dropout, DoRA)."""

import keras
import numpy as np
import pytest

import keras_lowrank
from keras_lowrank.state.model_state import adapted_layers

import model_kinds

TOL = 1e-5


def _groups(model):
    found = {}
    for layer in adapted_layers(model):
        group = layer._lowrank.input_group
        if group is not None:
            found[id(group)] = group
    return list(found.values())


def _products(model):
    return sum(group.fused_products for group in _groups(model))


def _unfused(model):
    """The same model computing every side path alone."""
    for layer in adapted_layers(model):
        layer._lowrank.input_group = None
    return model


def _qkv_model(cross=False):
    """Attention-like siblings: q, k (Dense) and v (matrix-form EinsumDense)
    in one Functional model; with `cross`, k and v read a second input."""
    x = keras.Input((5, 6), name="x")
    y = keras.Input((5, 6), name="y") if cross else x
    q = keras.layers.Dense(4, name="q")(x)
    k = keras.layers.Dense(4, name="k")(y)
    v = keras.layers.EinsumDense("abc,cde->abde", (5, 2, 3), name="v")(y)
    v = keras.layers.Reshape((5, 6))(v)
    out = keras.layers.Dense(3, name="head")(
        keras.layers.Concatenate()([q, k, v])
    )
    return keras.Model([x, y] if cross else x, out, name="qkv")


def _x(seed=0, batch=3):
    return np.random.default_rng(seed).normal(size=(batch, 5, 6)).astype("float32")


def _adapted(cross=False, **options):
    model = _qkv_model(cross)
    options.setdefault("targets", ["q", "k", "v"])
    keras_lowrank.adapt(model, rank=2, alpha=3, **options)
    model_kinds.randomize_adapters(model)
    _side_path_in_inference(model)
    return model


def _side_path_in_inference(model):
    # These layers are small enough that inference would fold the adapters
    # into the kernel (tested in test_inference_fold); here the side path is
    # under test.
    for layer in adapted_layers(model):
        layer._folds_in_inference = False


def _np(x):
    return keras.ops.convert_to_numpy(x)


# --- the groups -----------------------------------------------------------------


def test_siblings_with_one_input_size_form_a_group_and_others_do_not():
    model = _adapted(targets=["q", "k", "v", "head"])
    (group,) = _groups(model)
    assert sorted(m.name for m in group.members()) == ["k", "q", "v"]
    assert model.get_layer("head")._lowrank.input_group is None


def test_a_layer_without_adapted_siblings_has_no_group():
    model = _adapted(targets=["q"])
    assert _groups(model) == []


def test_every_verb_forms_the_groups_again():
    model = _adapted()
    (before,) = _groups(model)
    keras_lowrank.set_adapter(model, "default")
    (after,) = _groups(model)
    assert after is not before
    keras_lowrank.unload(model)
    assert not any(
        getattr(getattr(layer, "_lowrank", None), "input_group", None)
        for layer in model._flatten_layers()
    )


# --- the fused path: taken, and equal to the plain formula -----------------------


@pytest.mark.parametrize("training", [True, False])
def test_the_fused_product_is_taken_and_equals_the_plain_formula(training):
    model = _adapted()
    x = _x(batch=1)
    fused = _np(model(x, training=training))
    assert _products(model) == 1
    assert all(group.fusing for group in _groups(model))
    plain = _np(_unfused(model)(x, training=training))
    np.testing.assert_allclose(fused, plain, atol=TOL)


def test_two_active_adapters_share_one_product():
    model = _adapted()
    keras_lowrank.adapt(
        model, name="second", rank=3, alpha=5, targets=["q", "k", "v"]
    )
    keras_lowrank.set_adapter(model, ["default", "second"])
    model_kinds.randomize_adapter(model, "second", seed=1)
    x = _x(batch=1)
    fused = _np(model(x, training=True))
    assert _products(model) == 1
    plain = _np(_unfused(model)(x, training=True))
    np.testing.assert_allclose(fused, plain, atol=TOL)


def _train_once(model, x, y):
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    model.train_on_batch(x, y)
    return [_np(w) for w in model.trainable_weights]


def test_a_training_step_with_the_fused_product_equals_the_plain_one():
    x, y = _x(), np.random.default_rng(1).normal(size=(3, 5, 3)).astype("float32")
    fused = _adapted()
    plain = _adapted()
    plain.set_weights(fused.get_weights())
    after_fused = _train_once(fused, x, y)
    assert _products(fused) >= 1  # traced (JAX, TensorFlow) or run (torch)
    after_plain = _train_once(_unfused(plain), x, y)
    for a, b in zip(after_fused, after_plain):
        np.testing.assert_allclose(a, b, atol=TOL)


HUB_KINDS = ["bert_classifier", "llama_causal_lm", "gemma_causal_lm"]


@pytest.mark.parametrize("kind_name", HUB_KINDS)
@pytest.mark.parametrize("targets", ["default", "all-linear"])
def test_kerashub_attention_and_mlp_siblings_fuse_exactly(kind_name, targets):
    pytest.importorskip("keras_hub")
    kind = model_kinds.KINDS[kind_name]
    model = kind.build()
    keras_lowrank.adapt(
        model, targets=list(kind.default_targets) if targets == "default" else targets,
        rank=2,
    )
    model_kinds.randomize_adapters(model)
    inputs = kind.inputs()
    fused = _np(model(inputs, training=True))
    assert _products(model) >= 2  # one per transformer layer at least
    groups = _groups(model)
    assert groups and all(group.fusing for group in groups)
    # Attention's query/key/value (the targeted ones) share one product.
    assert any(
        sum(m.name in ("query", "key", "value") for m in group.members()) >= 2
        for group in groups
    )
    plain = _np(_unfused(model)(inputs, training=True))
    np.testing.assert_allclose(fused, plain, atol=TOL)


def test_a_functional_chain_is_never_grouped():
    x = keras.Input((4,))
    h = keras.layers.Dense(4, name="inner")(x)
    model = keras.Model(x, keras.layers.Dense(4, name="outer")(h))
    keras_lowrank.adapt(model, targets=["inner", "outer"], rank=2)
    assert _groups(model) == []
    sequential = model_kinds.KINDS["sequential"].build()
    keras_lowrank.adapt(sequential, targets=["hidden", "hidden2"], rank=2)
    assert _groups(sequential) == []


@pytest.mark.parametrize("name", ["subclassed", "subclassed_nested"])
def test_a_subclassed_chain_leaves_its_group_at_the_first_call(name):
    kind = model_kinds.KINDS[name]
    model = kind.build()
    keras_lowrank.adapt(model, targets=list(kind.default_targets), rank=2)
    model_kinds.randomize_adapters(model)
    first = _np(model(kind.inputs(), training=True))
    assert _groups(model) == []  # `mix` reads `inner`'s output
    products = _products(model)
    second = _np(model(kind.inputs(), training=True))
    plain = _np(_unfused(model)(kind.inputs(), training=True))
    np.testing.assert_allclose(first, plain, atol=TOL)
    np.testing.assert_allclose(second, plain, atol=TOL)
    assert products <= 2


# --- where it steps aside ----------------------------------------------------------


def test_functional_cross_attention_groups_by_the_graph():
    model = _adapted(cross=True)
    (group,) = _groups(model)
    assert sorted(m.name for m in group.members()) == ["k", "v"]
    inputs = [_x(0, 1), _x(1, 1)]
    fused = _np(model(inputs, training=True))
    assert _products(model) == 1 and group.fusing
    plain = _np(_unfused(model)(inputs, training=True))
    np.testing.assert_allclose(fused, plain, atol=TOL)


@keras.saving.register_keras_serializable(package="test_shared_input")
class CrossAttention(keras.layers.Layer):
    """q reads `x`, k and v read `y`: only the call shows it."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.q = keras.layers.Dense(4, name="q")
        self.k = keras.layers.Dense(4, name="k")
        self.v = keras.layers.Dense(4, name="v")

    def build(self, input_shape):
        for layer in (self.q, self.k, self.v):
            layer.build(input_shape[0])

    def call(self, inputs):
        x, y = inputs
        return self.q(x) + self.k(y) * self.v(y)


def test_subclassed_cross_attention_leaves_after_one_call_and_stays_exact():
    x, y = keras.Input((5, 6)), keras.Input((5, 6))
    model = keras.Model([x, y], CrossAttention(name="attn")([x, y]))
    keras_lowrank.adapt(model, targets=["q", "k", "v"], rank=2)
    model_kinds.randomize_adapters(model)
    inputs = [_x(0, 1), _x(1, 1)]
    (group,) = _groups(model)
    first = _np(model(inputs, training=True))
    # q formed the product for all three; k and v read another tensor, so
    # each left, and q alone is no group.
    assert group.fused_products == 1 and not group.fusing
    assert _groups(model) == []
    second = _np(model(inputs, training=True))
    plain = _np(_unfused(model)(inputs, training=True))
    np.testing.assert_allclose(first, plain, atol=TOL)
    np.testing.assert_allclose(second, plain, atol=TOL)


def test_a_product_is_not_reused_across_separate_calls():
    # q called on its own, then its sibling's factors change, then k called
    # on its own with the same tensor: k must see its new factors.
    model = _adapted()
    q, k = model.get_layer("q"), model.get_layer("k")
    x = _x(batch=1)
    q(x, training=True)
    a = k.adapter_variables("default")["A"]
    a.assign(_np(a) + 1.0)
    got = _np(k(x, training=True))
    (group,) = _groups(model)
    assert sorted(m.name for m in group.members()) == ["q", "v"]
    plain = _np(_unfused(model).get_layer("k")(x, training=True))
    np.testing.assert_allclose(got, plain, atol=TOL)


def test_adapter_dropout_computes_alone_in_training_and_fuses_in_inference():
    model = _adapted(dropout=0.5)
    x = _x(batch=1)
    model(x, training=True)
    assert _products(model) == 0
    fused = _np(model(x, training=False))
    assert _products(model) == 1
    plain = _np(_unfused(model)(x, training=False))
    np.testing.assert_allclose(fused, plain, atol=TOL)


def test_a_dora_sibling_computes_alone_and_the_others_still_share():
    model = _qkv_model()
    keras_lowrank.adapt(model, targets=["q", "v"], rank=2)
    keras_lowrank.adapt(model, targets=["k"], rank=2, method="dora", name="d")
    keras_lowrank.set_adapter(model, ["default", "d"])
    model_kinds.randomize_adapters(model)
    _side_path_in_inference(model)
    x = _x(batch=1)
    fused = _np(model(x, training=True))
    assert _products(model) == 1
    plain = _np(_unfused(model)(x, training=True))
    np.testing.assert_allclose(fused, plain, atol=TOL)
