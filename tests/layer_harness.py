"""One harness for every adapter layer, after Keras's `run_layer_test`.

`CASES` describes plain Keras layers (Dense, EinsumDense, Embedding,
Conv1D/2D/3D in several configurations); each `check_*` function runs one
behaviour on one case, built either standalone (`LowRankDense(...)`) or in
place from a plain built layer (`LowRankDense.from_layer(...)`).
`tests/test_layers.py` crosses the cases with the checks; the whole suite runs
once per backend.

References are independent of the code under test: the merged kernel is
computed in float64 NumPy from the factors (`case.delta`), and compared with a
plain Keras layer holding it.
"""

import dataclasses
import json
import os

import keras
import numpy as np
from keras import ops

from keras_lowrank import keras_private
from keras_lowrank.layers import ADAPTER_CLASSES

RANK = 2
ALPHA = 3.0  # s = 1.5 with "standard" scaling: not 1, so scaling is tested.
CONSTRUCTIONS = ("standalone", "from_layer")
POLICIES = ("mixed_float16", "mixed_bfloat16", "bfloat16")


@dataclasses.dataclass
class LayerCase:
    """A plain Keras layer configuration and what adapting it must give.

    Attributes:
        id: test id.
        plain_class: the Keras class (`keras.layers.Dense`, ...).
        kwargs: its constructor arguments.
        input_shape: concrete input shape, batch included.
        a_shape, b_shape: the factors' shapes at rank `RANK`.
        delta_equation: `np.einsum` equation for `ΔW` (kernel layout) from
            `A`, `B`; `None` means `tensordot(A, B, 1)` (kernel axes are the
            input axes then the output axes).
        vocab: for Embedding, the number of ids (the input holds int ids).
    """

    id: str
    plain_class: type
    kwargs: dict
    input_shape: tuple
    a_shape: tuple
    b_shape: tuple
    delta_equation: str = None
    vocab: int = 0

    @property
    def adapter_class(self):
        return ADAPTER_CLASSES[self.plain_class]

    @property
    def has_bias(self):
        if self.plain_class is keras.layers.Embedding:
            return False
        if self.plain_class is keras.layers.EinsumDense:
            return bool(self.kwargs.get("bias_axes"))
        return self.kwargs.get("use_bias", True)

    @property
    def allows_dropout(self):
        return self.plain_class is not keras.layers.Embedding

    def inputs(self, seed=0, batch=None):
        shape = self.input_shape
        if batch is not None:
            shape = (batch,) + shape[1:]
        rng = np.random.default_rng(seed)
        if self.vocab:
            return rng.integers(0, self.vocab, size=shape).astype("int32")
        return rng.standard_normal(shape).astype("float32")

    def layer_kwargs(self, **overrides):
        # Zeros, then `fill`: random kernels come from NumPy, which spares
        # JAX an XLA compilation of the random initialiser for every shape
        # and dtype (most of this file's run time otherwise).
        key = (
            "embeddings_initializer"
            if self.plain_class is keras.layers.Embedding
            else "kernel_initializer"
        )
        return {key: "zeros", **self.kwargs, **overrides}

    def fill(self, layer, seed=12):
        """Random kernel (and bias) values, the same for every construction."""
        rng = np.random.default_rng(seed)
        kernel = kernel_of(layer)
        kernel.assign(
            (0.5 * rng.standard_normal(tuple(kernel.shape))).astype("float32")
        )
        if self.has_bias:
            layer.bias.assign(
                (0.1 * rng.standard_normal(tuple(layer.bias.shape))).astype(
                    "float32"
                )
            )
        return layer

    def plain(self, **overrides):
        """A built plain Keras layer with a random kernel."""
        layer = self.plain_class(**self.layer_kwargs(**overrides))
        layer.build(self.input_shape)
        return self.fill(layer)

    def adapted(self, construction, build=True, options=None, **overrides):
        """The adapted layer, built `"standalone"` or `"from_layer"`.

        With `build=False` (standalone only) the caller builds it, then
        calls `fill`."""
        options = {"rank": RANK, "alpha": ALPHA, **(options or {})}
        if construction == "standalone":
            layer = self.adapter_class(
                **self.layer_kwargs(**overrides), **options
            )
            if build:
                layer.build(self.input_shape)
                self.fill(layer)
            return layer
        assert construction == "from_layer", construction
        return self.adapter_class.from_layer(self.plain(**overrides), **options)

    def skip_unsupported(self, policy):
        """Skips combinations the backend itself cannot run on CPU."""
        import pytest

        compute = keras.dtype_policies.get(policy).compute_dtype
        if (
            keras.backend.backend() == "tensorflow"
            and self.kwargs.get("data_format") == "channels_first"
            and compute == "float16"
        ):
            pytest.skip(
                "TensorFlow's CPU Conv2D has no float16 NCHW kernel (a plain "
                "keras.layers.Conv2D fails the same way)."
            )
        equation = self.kwargs.get("equation", "")
        if "..." in equation and not _einsum_is_right(equation, compute):
            pytest.skip(
                f"this backend's {compute} einsum {equation!r} is wrong on "
                "this CPU (TensorFlow 2.21's oneDNN kernels with AMX; a plain "
                "keras.layers.EinsumDense is wrong the same way): see "
                "docs/layers.md, Precision."
            )

    def delta(self, a, b):
        """`ΔW = A·B` in the kernel's layout, float64 (scale not applied)."""
        a, b = np.asarray(a, "float64"), np.asarray(b, "float64")
        if self.delta_equation:
            return np.einsum(self.delta_equation, a, b)
        return np.tensordot(a, b, axes=1)

    def targets(self, model, x, seed=1):
        """Random regression targets shaped like `model(x)`."""
        shape = tuple(model(x).shape)
        return np.random.default_rng(seed).standard_normal(shape).astype(
            "float32"
        )


CASES = [
    LayerCase(
        "dense",
        keras.layers.Dense,
        dict(units=6, activation="tanh"),
        (2, 3, 5),
        (5, RANK),
        (RANK, 6),
    ),
    LayerCase(
        "einsum_mha_query",  # BERT's query/key/value projection
        keras.layers.EinsumDense,
        dict(
            equation="abc,cde->abde",
            output_shape=(None, 3, 4),
            bias_axes="de",
            activation="tanh",
        ),
        (2, 3, 8),
        (8, RANK),
        (RANK, 3, 4),
        "cr,rde->cde",
    ),
    LayerCase(
        "einsum_mha_output",  # "abcd,cde->abe": two contracted axes
        keras.layers.EinsumDense,
        dict(equation="abcd,cde->abe", output_shape=(None, 5), bias_axes="e"),
        (2, 3, 3, 4),
        (3, 4, RANK),
        (RANK, 5),
        "cdr,re->cde",
    ),
    LayerCase(
        "einsum_gemma_query",  # kernel (n, d, h): the input axis in between
        keras.layers.EinsumDense,
        dict(equation="btd,ndh->btnh", output_shape=(None, 3, 4)),
        (2, 3, 8),
        (8, RANK),
        (RANK, 3, 4),
        "dr,rnh->ndh",
    ),
    LayerCase(
        "einsum_batch_axis",  # one rank-r update per head n
        keras.layers.EinsumDense,
        dict(
            equation="bnd,ndh->bnh",
            output_shape=(3, 4),
            bias_axes="h",
            activation="tanh",
        ),
        (2, 3, 5),
        (3, 5, RANK),
        (3, RANK, 4),
        "ndr,nrh->ndh",
    ),
    LayerCase(
        "einsum_ellipsis",
        keras.layers.EinsumDense,
        dict(
            equation="...b,bc->...c",
            output_shape=6,
            bias_axes="c",
            activation="tanh",
        ),
        (2, 3, 5),
        (5, RANK),
        (RANK, 6),
        "br,rc->bc",
    ),
    LayerCase(
        "embedding",
        keras.layers.Embedding,
        dict(input_dim=20, output_dim=6),
        (2, 3),
        (20, RANK),
        (RANK, 6),
        vocab=20,
    ),
    LayerCase(
        "conv1d",
        keras.layers.Conv1D,
        dict(filters=4, kernel_size=3, activation="tanh"),
        (2, 7, 3),
        (3, 3, RANK),
        (RANK, 4),
    ),
    LayerCase(
        "conv1d_causal",
        keras.layers.Conv1D,
        dict(
            filters=4,
            kernel_size=3,
            padding="causal",
            dilation_rate=2,
            activation="tanh",
        ),
        (2, 8, 3),
        (3, 3, RANK),
        (RANK, 4),
    ),
    LayerCase(
        "conv2d",
        keras.layers.Conv2D,
        dict(
            filters=4,
            kernel_size=(3, 2),
            strides=(2, 1),
            padding="same",
            activation="tanh",
        ),
        (2, 6, 5, 3),
        (3, 2, 3, RANK),
        (RANK, 4),
    ),
    LayerCase(
        "conv2d_channels_first",
        keras.layers.Conv2D,
        dict(
            filters=4,
            kernel_size=3,
            data_format="channels_first",
            activation="tanh",
        ),
        (2, 3, 6, 6),
        (3, 3, 3, RANK),
        (RANK, 4),
    ),
    LayerCase(
        "conv3d",
        keras.layers.Conv3D,
        dict(filters=3, kernel_size=2, use_bias=False, activation="gelu"),
        (1, 4, 4, 4, 2),
        (2, 2, 2, 2, RANK),
        (RANK, 3),
    ),
]

CASE_IDS = [case.id for case in CASES]


# --- helpers --------------------------------------------------------------------


def _einsum_is_right(equation, dtype):
    """Whether `keras.ops.einsum(equation)` in `dtype` agrees with NumPy on
    a small input (a probe of the backend, not of this package)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 5)).astype("float32")
    w = rng.standard_normal((5, 6)).astype("float32")
    got = ops.einsum(equation, ops.cast(x, dtype), ops.cast(w, dtype))
    want = np.einsum(equation, x, w)
    return np.abs(to_numpy(ops.cast(got, "float32")) - want).max() < 0.1


def to_numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


def assert_close(actual, expected, rtol=1e-5):
    """Relative to the largest entry: outputs near zero do not blow up."""
    actual = np.asarray(to_numpy(actual), "float64")
    expected = np.asarray(to_numpy(expected), "float64")
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    atol = rtol * max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


def factors(layer, name="default"):
    variables = layer.adapter_variables(name)
    return variables["A"], variables["B"]


def randomize_factors(layer, seed=0, name="default", scale=0.4):
    """Non-zero A and B (B starts at zero, which would hide most bugs)."""
    rng = np.random.default_rng(seed)
    for var in factors(layer, name):
        value = scale * rng.standard_normal(tuple(var.shape))
        var.assign(value.astype("float32"))


def kernel_of(layer):
    """The kernel variable of a plain or adapted layer."""
    return keras_private.kernel_of(layer)


def merged_kernel(case, layer, name="default"):
    """`W + s·A·B` in float64 NumPy, from the layer's current variables."""
    a, b = factors(layer, name)
    scale = layer.adapter_spec(name).scale
    w = np.asarray(to_numpy(kernel_of(layer)), "float64")
    return w + scale * case.delta(to_numpy(a), to_numpy(b))


def plain_with_kernel(case, layer, kernel, **overrides):
    """A plain Keras layer with `layer`'s config, holding `kernel`."""
    plain = case.plain(**overrides)
    values = [np.asarray(kernel).astype(kernel_of(plain).dtype)]
    if case.has_bias:
        values.append(to_numpy(layer.bias))
    plain.set_weights(values)
    return plain


def snapshot(variables):
    return [np.array(to_numpy(v), copy=True) for v in variables]


def compile_for_test(model, learning_rate=0.05, run_eagerly=False):
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=learning_rate),
        loss="mse",
        run_eagerly=run_eagerly,
    )


def model_around(case, layer):
    """A Functional model holding `layer` alone."""
    inputs = keras.Input(
        case.input_shape[1:], dtype="int32" if case.vocab else "float32"
    )
    return keras.Model(inputs, layer(inputs))


def adapter_weight_names(name="default"):
    return [f"lowrank_A_{name}", f"lowrank_B_{name}"]


# --- checks -----------------------------------------------------------------------


def check_weights(case, construction):
    """Weight count, shapes, dtypes, trainability and paths."""
    layer = case.adapted(construction)
    plain = case.plain()
    assert type(layer) is case.adapter_class
    plain_names = [w.name for w in plain.weights]
    assert [w.name for w in layer.weights] == plain_names + adapter_weight_names()
    a, b = factors(layer)
    assert tuple(a.shape) == case.a_shape
    assert tuple(b.shape) == case.b_shape
    assert a.dtype == b.dtype == "float32"
    assert [w.name for w in layer.trainable_weights] == adapter_weight_names()
    assert [w.name for w in layer.non_trainable_weights] == plain_names
    n_adapter = int(np.prod(case.a_shape) + np.prod(case.b_shape))
    assert layer.count_params() == plain.count_params() + n_adapter
    assert a.path == f"{layer.path}/lowrank_A_default"
    assert b.path == f"{layer.path}/lowrank_B_default"
    # The adapted layer starts exactly at the base layer: one factor is 0.
    zero = a if case.vocab else b
    assert not np.any(to_numpy(zero))
    assert np.any(to_numpy(b if case.vocab else a))
    assert layer.adapter_names == ["default"]
    assert layer.active_adapters == ["default"]
    assert layer.merged_adapters == []


def check_from_layer_keeps_identity(case):
    """`from_layer` converts in place: same object, same variables."""
    plain = case.plain(name="base_layer")
    x = case.inputs()
    before = to_numpy(plain(x))
    kernel = kernel_of(plain)
    weights = list(plain.weights)
    bias = getattr(plain, "bias", None)
    activation = getattr(plain, "activation", None)
    policy = plain.dtype_policy
    path = plain.path
    adapted = case.adapter_class.from_layer(plain, rank=RANK, alpha=ALPHA)
    assert adapted is plain
    assert type(plain) is case.adapter_class
    assert isinstance(plain, case.plain_class)
    assert kernel_of(plain) is kernel
    assert all(x is y for x, y in zip(plain.weights, weights))
    assert getattr(plain, "bias", None) is bias
    assert getattr(plain, "activation", None) is activation
    assert plain.dtype_policy is policy
    assert plain.name == "base_layer" and plain.path == path
    assert not kernel.trainable
    if bias is not None:
        assert not bias.trainable  # bias="none"
    # B = 0 (A = 0 for Embedding): the output is exactly the old one.
    np.testing.assert_array_equal(to_numpy(plain(x)), before)


def check_matches_merged_plain_layer(case, construction, scaling="standard"):
    """Output == a plain Keras layer holding `W + s·A·B` (nonlinear
    activation: the adapter contribution is added before it)."""
    layer = case.adapted(construction, options={"scaling": scaling})
    randomize_factors(layer)
    if case.has_bias:
        layer.bias.assign(
            np.random.default_rng(5)
            .standard_normal(tuple(layer.bias.shape))
            .astype("float32")
        )
    x = case.inputs(seed=3)
    reference = plain_with_kernel(case, layer, merged_kernel(case, layer))
    expected = reference(x)
    assert_close(layer(x), expected, rtol=1e-5)
    # The adapter really contributes: the base layer alone differs.
    base = plain_with_kernel(case, layer, to_numpy(kernel_of(layer)))
    assert not np.allclose(to_numpy(base(x)), to_numpy(expected), atol=1e-3)


def check_merge_unmerge(case, construction):
    layer = case.adapted(construction)
    randomize_factors(layer)
    x = case.inputs(seed=4)
    y0 = to_numpy(layer(x))
    w0 = snapshot([kernel_of(layer)])[0]
    expected_kernel = merged_kernel(case, layer)

    layer.merge()
    assert layer.merged_adapters == ["default"]
    w1 = snapshot([kernel_of(layer)])[0]
    assert_close(w1, expected_kernel, rtol=1e-6)
    assert_close(layer(x), y0, rtol=1e-5)
    # Merged factors do not train (their gradient would be lost).
    assert layer.trainable_weights == []
    # Merging again is a no-op, never a double count.
    layer.merge()
    layer.merge(["default"])
    np.testing.assert_array_equal(to_numpy(kernel_of(layer)), w1)
    assert layer.merged_adapters == ["default"]
    assert_close(layer(x), y0, rtol=1e-5)

    layer.unmerge()
    assert layer.merged_adapters == []
    assert_close(to_numpy(kernel_of(layer)), w0, rtol=1e-6)
    assert_close(layer(x), y0, rtol=1e-5)
    assert [w.name for w in layer.trainable_weights] == adapter_weight_names()
    w2 = snapshot([kernel_of(layer)])[0]
    layer.unmerge()  # nothing merged: no-op
    np.testing.assert_array_equal(to_numpy(kernel_of(layer)), w2)


def _options_for_config(case):
    options = {"scaling": "rslora", "bias": "all" if case.has_bias else "none"}
    if case.allows_dropout:
        options["dropout"] = 0.25
    return options


def check_config_round_trip(case, construction):
    layer = case.adapted(construction, options=_options_for_config(case))
    randomize_factors(layer)
    config = layer.get_config()
    json.dumps(config)  # JSON-ready
    spec = config["adapters"]["default"]
    assert spec["rank"] == RANK and spec["alpha"] == ALPHA
    assert spec["scaling"] == "rslora"
    assert config["active_adapters"] == ["default"]
    assert config["merged_adapters"] == []

    clone = case.adapter_class.from_config(config)
    assert clone.get_config() == config  # before build too
    clone.build(case.input_shape)
    assert clone.get_config() == config
    assert clone.adapter_spec("default") == layer.adapter_spec("default")
    assert [w.name for w in clone.weights] == [w.name for w in layer.weights]
    assert [w.trainable for w in clone.weights] == [
        w.trainable for w in layer.weights
    ]
    clone.set_weights(layer.get_weights())
    x = case.inputs(seed=6)
    assert_close(clone(x), layer(x), rtol=1e-6)

    # Through Keras's (de)serialisation: the registered class comes back.
    serialized = keras.saving.serialize_keras_object(layer)
    assert serialized["registered_name"] == (
        f"keras_lowrank>{case.adapter_class.__name__}"
    )
    revived = keras.saving.deserialize_keras_object(serialized)
    assert type(revived) is case.adapter_class

    # A merged adapter is restored as merged (the saved kernel holds it).
    layer.merge()
    merged_config = layer.get_config()
    assert merged_config["merged_adapters"] == ["default"]
    merged_clone = case.adapter_class.from_config(merged_config)
    merged_clone.build(case.input_shape)
    merged_clone.set_weights(layer.get_weights())
    assert merged_clone.merged_adapters == ["default"]
    assert_close(merged_clone(x), layer(x), rtol=1e-6)
    merged_clone.unmerge()
    layer.unmerge()
    assert_close(to_numpy(kernel_of(merged_clone)), to_numpy(kernel_of(layer)))


def check_save_and_load(case, construction, tmp_path, retrain=True):
    """A Sequential (standalone) or Functional (from_layer) model survives
    `model.save` + `keras.saving.load_model`, factors intact and trainable
    (with `retrain`, a `fit` after the reload moves them)."""
    options = {"dropout": 0.2} if case.allows_dropout else {}
    if construction == "standalone":
        layer = case.adapted(construction, build=False, options=options)
        model = keras.Sequential(
            [
                keras.Input(
                    case.input_shape[1:],
                    dtype="int32" if case.vocab else "float32",
                ),
                layer,
            ]
        )
    else:
        plain = case.plain_class(**case.layer_kwargs())
        model = model_around(case, plain)
        layer = case.adapter_class.from_layer(
            plain, rank=RANK, alpha=ALPHA, **options
        )
    case.fill(layer)
    randomize_factors(layer)
    x = case.inputs(seed=7)
    expected = to_numpy(model(x))
    path = os.path.join(str(tmp_path), "m.keras")
    model.save(path)

    loaded = keras.saving.load_model(path)
    twin = loaded.layers[-1]
    assert type(twin) is case.adapter_class
    assert twin.adapter_spec("default") == layer.adapter_spec("default")
    for ours, theirs in zip(layer.weights, twin.weights):
        assert ours.name == theirs.name
        np.testing.assert_array_equal(to_numpy(theirs), to_numpy(ours))
        assert theirs.trainable == ours.trainable
    assert [w.name for w in loaded.trainable_weights] == adapter_weight_names()
    assert not kernel_of(twin).trainable
    np.testing.assert_allclose(to_numpy(loaded(x)), expected, rtol=1e-6)
    if not retrain:
        return

    # Still trainable after the reload: the factors move, the kernel not.
    kernel_before = snapshot([kernel_of(twin)])[0]
    a_before, b_before = snapshot(factors(twin))
    compile_for_test(loaded)
    loaded.fit(x, case.targets(loaded, x), epochs=1, verbose=0)
    np.testing.assert_array_equal(to_numpy(kernel_of(twin)), kernel_before)
    a_after, b_after = snapshot(factors(twin))
    assert not np.allclose(a_after, a_before)
    assert not np.allclose(b_after, b_before)


def check_save_merged(case, tmp_path):
    """A model saved with its adapter merged reloads merged (the kernel in
    the file holds the delta, so it is not added twice), and unmerging the
    reloaded layer gives back the original kernel."""
    plain = case.plain_class(**case.layer_kwargs())
    model = model_around(case, plain)
    layer = case.adapter_class.from_layer(plain, rank=RANK, alpha=ALPHA)
    case.fill(layer)
    randomize_factors(layer)
    original_kernel = snapshot([kernel_of(layer)])[0]
    x = case.inputs(seed=13)
    layer.merge()
    expected = to_numpy(model(x))
    path = os.path.join(str(tmp_path), "merged.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    twin = loaded.layers[-1]
    assert twin.merged_adapters == ["default"]
    assert twin.trainable_weights == []
    np.testing.assert_allclose(to_numpy(loaded(x)), expected, rtol=1e-6)
    twin.unmerge()
    assert_close(to_numpy(kernel_of(twin)), original_kernel, rtol=1e-6)
    assert [w.name for w in twin.trainable_weights] == adapter_weight_names()


def check_fit(case, construction, bias="none"):
    """After `fit`, the frozen kernel is bit-for-bit unchanged, the factors
    moved, and the bias moved exactly when `bias="all"`."""
    layer = case.adapted(construction, build=False, options={"bias": bias})
    model = model_around(case, layer)
    case.fill(layer)
    randomize_factors(layer)
    expected_trainable = adapter_weight_names()
    if bias == "all" and case.has_bias:
        assert layer.bias.trainable
        expected_trainable = ["bias"] + expected_trainable
    assert sorted(w.name for w in model.trainable_weights) == sorted(
        expected_trainable
    )
    frozen = [kernel_of(layer)]
    if case.has_bias and bias == "none":
        frozen.append(layer.bias)
    frozen_before = snapshot(frozen)
    a_before, b_before = snapshot(factors(layer))
    bias_before = snapshot([layer.bias])[0] if case.has_bias else None

    # Default shapes throughout: JAX compiles each op once per shape.
    x = case.inputs(seed=8)
    compile_for_test(model)
    model.fit(
        x,
        case.targets(model, x),
        batch_size=max(1, len(x) // 2),  # two steps
        epochs=1,
        verbose=0,
    )

    for var, before in zip(frozen, frozen_before):
        np.testing.assert_array_equal(to_numpy(var), before)
    a_after, b_after = snapshot(factors(layer))
    assert not np.allclose(a_after, a_before)
    assert not np.allclose(b_after, b_before)
    assert a_after.dtype == b_after.dtype == np.float32
    if bias == "all" and case.has_bias:
        assert not np.allclose(to_numpy(layer.bias), bias_before)


def check_dropout(case, construction):
    """Dropout acts on the adapter path only, and only in training."""
    layer = case.adapted(construction, options={"dropout": 0.5})
    model = model_around(case, layer)
    randomize_factors(layer)
    x = case.inputs(seed=9)
    reference = plain_with_kernel(case, layer, merged_kernel(case, layer))
    inference = to_numpy(model(x, training=False))
    assert_close(inference, reference(x), rtol=1e-5)
    # Default `training` is inference (no dropout): the side path, where
    # `training=False` may fold the adapter into the kernel; the same values
    # up to rounding, far from a 50% dropout.
    assert_close(to_numpy(model(x)), inference, rtol=1e-5)
    training = to_numpy(model(x, training=True))
    assert not np.allclose(training, inference, atol=1e-4)
    # With B = 0 the adapter adds nothing, dropped or not: the base path has
    # no dropout, so training and inference agree.
    factors(layer)[1].assign(np.zeros(case.b_shape, "float32"))
    base = to_numpy(model(x, training=False))
    np.testing.assert_allclose(
        to_numpy(model(x, training=True)), base, rtol=1e-6, atol=1e-6
    )


def check_mixed_precision(case, construction, policy):
    """Factors stay float32 under any policy; the output follows it."""
    case.skip_unsupported(policy)
    policy = keras.dtype_policies.get(policy)
    layer = case.adapted(construction, dtype=policy)
    a, b = factors(layer)
    assert a.dtype == b.dtype == "float32"
    assert kernel_of(layer).dtype == policy.variable_dtype
    randomize_factors(layer)
    x = case.inputs(seed=10)
    y = layer(x)
    assert keras.backend.standardize_dtype(y.dtype) == policy.compute_dtype
    # Same result as a plain layer of that policy holding the merged kernel.
    reference = plain_with_kernel(
        case, layer, merged_kernel(case, layer), dtype=policy
    )
    tolerance = 5e-2 if policy.compute_dtype == "bfloat16" else 1e-2
    assert_close(y, reference(x), rtol=tolerance)


def check_mixed_precision_fit(case, policy):
    """A training step under `policy` keeps the factors float32 and moves
    them; the kernel stays bit-for-bit frozen."""
    case.skip_unsupported(policy)
    layer = case.adapted("from_layer", dtype=policy)
    model = model_around(case, layer)
    randomize_factors(layer)
    a, b = factors(layer)
    a_before, b_before = snapshot([a, b])
    kernel_before = snapshot([kernel_of(layer)])[0]
    x = case.inputs(seed=11)
    compile_for_test(model, learning_rate=0.5)
    model.fit(x, case.targets(model, x), epochs=1, verbose=0)
    assert a.dtype == b.dtype == "float32"
    assert not np.allclose(to_numpy(a), a_before)
    assert not np.allclose(to_numpy(b), b_before)
    np.testing.assert_array_equal(to_numpy(kernel_of(layer)), kernel_before)


def check_trainable_toggle(case, construction):
    """Freezing and unfreezing the layer (or its model) keeps the kernel
    frozen; operations on a frozen layer do not unfreeze its factors."""
    options = {"bias": "all"} if case.has_bias else {}
    layer = case.adapted(construction, options=options)
    model = model_around(case, layer)
    expected = (["bias"] if case.has_bias else []) + adapter_weight_names()
    for owner in (layer, model):
        owner.trainable = False
        assert model.trainable_weights == []
        assert not any(w.trainable for w in layer.weights)
        owner.trainable = True
        assert [w.name for w in model.trainable_weights] == expected
        assert not kernel_of(layer).trainable
    layer.trainable = False
    layer.merge()
    layer.unmerge()
    assert model.trainable_weights == []
    assert not any(w.trainable for w in layer.weights)


def check_bias_policy(case, construction):
    """`bias="all"` makes the bias trainable, `bias="none"` freezes it."""
    trained = case.adapted(construction, options={"bias": "all"})
    frozen = case.adapted(construction, options={"bias": "none"})
    assert trained.bias.trainable
    assert not frozen.bias.trainable
    assert [w.name for w in trained.trainable_weights] == [
        "bias"
    ] + adapter_weight_names()
    assert [w.name for w in frozen.trainable_weights] == adapter_weight_names()
    # Merged adapters do not train, and neither does the bias they asked for.
    trained.merge()
    assert not trained.bias.trainable
    trained.unmerge()
    assert trained.bias.trainable


__all__ = [
    "CASES",
    "CASE_IDS",
    "CONSTRUCTIONS",
    "POLICIES",
    "LayerCase",
]


def check_low_precision_merge(case, construction, dtype, tmp_path):
    """merge + unmerge on a bfloat16/float16 kernel gives the kernel back bit
    for bit (rounding `W + ΔW` and subtracting `ΔW` again would not), also
    with two adapters unmerged one at a time, and after a `.keras` round
    trip while merged."""
    from keras_lowrank.spec import AdapterSpec

    layer = case.adapted(construction, dtype=dtype)
    assert str(kernel_of(layer).dtype).endswith(dtype)
    layer.add_adapter("second", AdapterSpec(rank=RANK, alpha=ALPHA))
    layer.set_active_adapters(["default", "second"])
    randomize_factors(layer, seed=1)
    randomize_factors(layer, seed=2, name="second")
    original = snapshot([kernel_of(layer)])[0]
    layer.merge()
    merged = snapshot([kernel_of(layer)])[0]
    assert (merged != original).any(), "the merge changed nothing"
    assert "lowrank_unmerged_kernel" in [w.name for w in layer.weights]
    layer.unmerge(["second"])
    assert layer.merged_adapters == ["default"]
    layer.unmerge()
    np.testing.assert_array_equal(to_numpy(kernel_of(layer)), original)
    # The backup exists only while something is merged.
    assert "lowrank_unmerged_kernel" not in [w.name for w in layer.weights]
    assert sorted(w.name for w in layer.trainable_weights) == sorted(
        adapter_weight_names() + adapter_weight_names("second")
    )

    # merge -> save -> load -> unmerge, in the same process.
    model = model_around(case, layer)
    layer.merge()
    path = os.path.join(str(tmp_path), f"merged_{dtype}.keras")
    model.save(path)
    layer.unmerge()
    np.testing.assert_array_equal(to_numpy(kernel_of(layer)), original)
    loaded = keras.saving.load_model(path)
    twin = loaded.layers[-1]
    assert twin.merged_adapters == ["default", "second"]
    np.testing.assert_array_equal(to_numpy(kernel_of(twin)), merged)
    twin.unmerge()
    np.testing.assert_array_equal(to_numpy(kernel_of(twin)), original)
