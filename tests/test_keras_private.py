"""Pins every private Keras name keras_lowrank relies on (see
`keras_lowrank.keras_private`): each exists and behaves as we rely on, so a
Keras upgrade that changes one fails here, in one place, with a message that
names the attribute."""

import inspect

import keras
import numpy as np
import pytest

from keras_lowrank import keras_private


def _has(obj, name):
    assert hasattr(obj, name), (
        f"Keras {keras.__version__}: {type(obj).__name__}.{name} is gone; "
        "keras_lowrank.keras_private relies on it (see its docstring)."
    )
    return getattr(obj, name)


def _dense(units=3, d=4, **kwargs):
    layer = keras.layers.Dense(units, **kwargs)
    layer.build((None, d))
    return layer


def test_every_function_has_a_comment_and_the_table_lists_it():
    doc = keras_private.__doc__
    for name, obj in vars(keras_private).items():
        if name.startswith("_") or inspect.ismodule(obj):
            continue
        if callable(obj) and getattr(obj, "__module__", "") == keras_private.__name__:
            assert obj.__doc__ and "Keras" in obj.__doc__, name
            assert f"`{name}`" in doc, f"{name} missing from the table"


def test_tracker_lock_unlock():
    layer = _dense()
    tracker = _has(layer, "_tracker")
    assert tracker.locked, "Layer._tracker.locked: a built layer is locked"
    with pytest.raises(ValueError):
        layer.extra = keras.Variable(np.zeros(2))
    with keras_private.unlocked_state(layer):
        assert not tracker.locked
        layer.extra = keras.Variable(np.zeros(2), name="extra")
    assert tracker.locked
    assert any(v is layer.extra for v in layer.weights)


def test_untrack_variable_and_delattr_bypass():
    layer = _dense()
    _has(layer, "_untrack_variable")
    with keras_private.unlocked_state(layer):
        layer.extra = keras.Variable(np.zeros(2), name="extra")
        keras_private.delete_variable(layer, "extra")
    assert not hasattr(layer, "extra")
    assert len(layer.weights) == 2, "Layer._untrack_variable left it tracked"


def test_delete_sublayer_untracks_it():
    outer = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    layer = outer.layers[0]
    _has(layer._tracker, "untrack")
    with keras_private.unlocked_state(layer):
        layer.extra = keras.layers.Dense(1, name="extra")
    assert any(l.name == "extra" for l in keras_private.direct_sublayers(layer))
    with keras_private.unlocked_state(layer):
        keras_private.delete_sublayer(layer, "extra")
    assert not hasattr(layer, "extra")
    assert not keras_private.direct_sublayers(layer), (
        "Layer._tracker.untrack left the sublayer tracked"
    )


def test_place_under_gives_keras_paths_to_a_late_sublayer():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="host")])
    host = model.layers[0]
    late = keras.layers.Dense(2, name="late")
    _has(late, "_parent_path")
    keras_private.place_under(late, host)
    assert late.path == f"{host.path}/late"
    late.build((None, 3))
    assert late.kernel.path == f"{host.path}/late/kernel", (
        "name_scope no longer reads Layer._parent_path"
    )


def test_call_signature_attributes_and_refresh():
    layer = keras.layers.Embedding(10, 4)
    for name in keras_private.CALL_SIGNATURE_ATTRS:
        _has(layer, name)
    assert layer._call_has_training_arg is False

    class WithTraining(keras.layers.Embedding):
        def call(self, inputs, training=None):
            return super().call(inputs)

    keras_private.swap_class(layer, WithTraining)
    keras_private.refresh_call_signature(layer)
    assert type(layer) is WithTraining
    assert layer._call_has_training_arg is True
    assert "training" in layer.call_signature_parameters
    assert isinstance(layer._call_has_context_arg, dict)


def test_seed_generator_initial_seed():
    generator = keras.random.SeedGenerator(3)
    _has(generator, "_initial_seed")
    fixed = keras_private.FixedSeed(generator.next())
    x = keras.ops.ones((4, 64))
    first = keras.random.dropout(x, 0.5, seed=fixed)
    second = keras.random.dropout(x, 0.5, seed=fixed)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(first), keras.ops.convert_to_numpy(second)
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda: _dense(),
        lambda: keras.layers.EinsumDense("ab,bc->ac", (3,)),
        lambda: keras.layers.Embedding(10, 4),
        lambda: keras.layers.Conv1D(3, 2),
        lambda: keras.layers.Conv2D(3, 2),
        lambda: keras.layers.Conv3D(3, 2),
    ],
)
def test_kernel_attributes(make):
    layer = make()
    if not layer.built:
        shape = {
            "EinsumDense": (None, 4),
            "Embedding": (None, 2),
            "Conv1D": (None, 5, 2),
            "Conv2D": (None, 5, 5, 2),
            "Conv3D": (None, 5, 5, 5, 2),
        }[type(layer).__name__]
        layer.build(shape)
    attr, name = keras_private.kernel_attr(layer)
    variable = _has(layer, attr)
    assert isinstance(variable, keras.Variable)
    assert keras_private.kernel_of(layer) is variable
    assert getattr(layer, name) is variable, f"{attr} is not {name}"


def test_kernel_attr_refuses_other_layers():
    with pytest.raises(TypeError, match="LayerNormalization has no kernel "
                       "keras_lowrank knows"):
        keras_private.kernel_attr(keras.layers.LayerNormalization())


def test_conv1d_causal_padding():
    layer = keras.layers.Conv1D(2, 3, padding="causal", dilation_rate=2)
    layer.build((None, 8, 1))
    _has(layer, "_compute_causal_padding")
    assert [list(p) for p in keras_private.causal_padding(layer)] == [
        [0, 0], [4, 0], [0, 0]
    ]


def test_flatten_layers():
    inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    outer = keras.Sequential([keras.Input((4,)), inner, keras.layers.Dense(1)])
    _has(outer, "_flatten_layers")
    assert inner in keras_private.direct_sublayers(outer)
    assert not any(
        isinstance(x, keras.layers.Dense) and x in inner.layers
        for x in keras_private.direct_sublayers(outer)
    )
    names = [type(x).__name__ for x in keras_private.all_sublayers(outer)]
    assert names.count("Dense") == 2


def test_track_variables_on_torch():
    layer = _dense()
    if keras.backend.backend() != "torch":
        keras_private.retrack_variables(layer)  # a no-op
        return
    _has(layer, "_track_variables")
    with keras_private.unlocked_state(layer):
        layer.extra = layer.add_weight(shape=(2,), name="extra")
    keras_private.retrack_variables(layer)
    assert len(list(layer.parameters())) == 3


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("kind", ["Dense", "EinsumDense", "Embedding"])
def test_quantization_internals(kind, mode):
    if kind == "Dense":
        layer, x = _dense(6, 8), np.ones((2, 8), "float32")
    elif kind == "EinsumDense":
        layer = keras.layers.EinsumDense("ab,bc->ac", (6,))
        layer.build((None, 8))
        x = np.ones((2, 8), "float32")
    else:
        layer, x = keras.layers.Embedding(8, 6), np.array([[1, 2]])
        layer.build((None, 2))
    layer.quantize(mode)
    call = keras_private.quantized_call(type(layer), mode)
    assert callable(call), f"{kind}._{mode}_call is gone"
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(call(layer, x)),
        keras.ops.convert_to_numpy(layer(x)),
        rtol=1e-6, atol=1e-6,
    )
    _has(layer, "_is_quantized")
    if mode == "int4":
        if kind == "EinsumDense":
            _has(layer, "_int4_unpacked_column_size")
        else:
            _has(layer, "_orig_output_dim")
            assert keras_private.quantization_attr(layer, "_orig_output_dim") == 6
    if kind == "EinsumDense" and mode == "int8":
        _has(layer, "_adjust_scale_for_dequant")
        scale = keras_private.einsum_dequant_scale(layer, layer.kernel_scale)
        assert len(scale.shape) == 2
    with pytest.raises(KeyError, match="is not a pinned quantization"):
        keras_private.quantization_attr(layer, "_kernel")


def test_optimizer_update_hooks():
    optimizer = keras.optimizers.AdamW(0.1, weight_decay=0.1)
    update_step, decay = keras_private.optimizer_update_hooks(optimizer)
    assert callable(update_step) and callable(decay)
    calls = []

    def counting(grads, variables, learning_rate):
        calls.append(len(variables))
        update_step(grads, variables, learning_rate)

    keras_private.set_optimizer_update_hooks(optimizer, counting, decay)
    variable = keras.Variable(np.ones(3, "float32"), name="w")
    optimizer.apply([keras.ops.ones(3)], [variable])
    assert calls == [1], "Optimizer.apply no longer calls _backend_update_step"
    assert keras_private.uses_weight_decay(optimizer, variable) is True
    optimizer.exclude_from_weight_decay(var_names=["w"])
    assert keras_private.uses_weight_decay(optimizer, variable) is False


def test_instance_quantize_wrapper():
    layer = keras.layers.Dense(2)
    model = keras.Sequential([keras.Input((3,)), layer])
    for obj in (layer, model):
        wrapper = keras_private.instance_quantize(obj)
        assert callable(wrapper), (
            f"Keras {keras.__version__} no longer wraps `quantize` per "
            f"instance on {type(obj).__name__}"
        )
    assert "type_check" in inspect.signature(
        keras.layers.Dense.quantize
    ).parameters, "Dense.quantize lost its `type_check` keyword"


def test_legacy_h5_saving_is_marked_by_a_global_attribute(tmp_path):
    seen = []

    class Recording(keras.layers.Dense):
        def get_config(self):
            seen.append(keras_private.legacy_h5_saving_in_progress())
            return super().get_config()

    model = keras.Sequential([keras.Input((4,)), Recording(2)])
    assert not keras_private.legacy_h5_saving_in_progress()
    keras.saving.save_model(model, str(tmp_path / "m.h5"))
    assert seen and all(seen), (
        "keras.src.backend.common.global_state 'use_legacy_config' is not "
        "set while Keras writes a legacy .h5 file"
    )
    seen.clear()
    model.save(str(tmp_path / "m.keras"))
    assert seen and not any(seen)
    assert not keras_private.legacy_h5_saving_in_progress()


def test_the_call_scope_is_the_stateless_scope_or_the_outermost_call_context():
    seen = []

    class Probe(keras.layers.Layer):
        def call(self, x):
            seen.append(keras_private.current_call_context())
            return x

    probe = Probe()
    model = keras.Sequential([keras.Input((2,)), probe])
    assert keras_private.current_call_context() is None
    with keras.StatelessScope() as scope:
        assert keras_private.current_call_scope() is scope
    assert keras_private.current_call_scope() is None
    model(np.ones((1, 2), "float32"))
    model(np.ones((1, 2), "float32"))
    assert seen and all(ctx is not None for ctx in seen)
    assert seen[0] is not seen[-1], (
        "keras.src.backend.common.global_state 'current_call_ctx' is not a "
        "new object per outermost call"
    )
    assert keras_private.current_call_context() is None
    with keras.StatelessScope() as scope:
        assert keras_private.current_call_scope() is scope
    assert keras_private.current_call_scope() is None
