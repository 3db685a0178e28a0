"""DoRA, rsLoRA, PiSSA and OLoRA against float64 NumPy closed forms.

Every layer kind (Dense, EinsumDense with and without batch axes or a
transposed kernel, Embedding, Conv) goes through the same checks. The closed
forms work on the kernel's matrix form `(*batch, d, k)`; a reference output is
that of a plain Keras layer holding the closed-form kernel, and reference
gradients come from the plain layer's kernel gradient `J` by the chain rule
with DoRA's norm held constant:

    W' = R ⊙ V,  V = W + s·A·B,  R = m/‖V‖ (a constant)
    dL/dA = s·(J⊙R)·Bᵀ,  dL/dB = s·Aᵀ·(J⊙R),  dL/dm = Σ_d J⊙V / ‖V‖.
"""

import keras
import numpy as np
import pytest
from keras import ops

import keras_lowrank
from keras_lowrank import AdapterSpec
from keras_lowrank import adapter_math
from keras_lowrank.layers import adapter_class_for

from backend_gradients import gradients as _grads

RNG = np.random.default_rng(0)


# --- layer cases -------------------------------------------------------------


def _dense():
    return keras.layers.Dense(5, use_bias=True), (3, 7)


def _einsum():
    return keras.layers.EinsumDense(
        "abc,cde->abde", (None, 3, 4), bias_axes="de"
    ), (
        2,
        4,
        8,
    )


def _einsum_batch():
    # `b` is a batch axis of the kernel: each b gets its own rank-r update and
    # DoRA one magnitude per (b, d).
    return keras.layers.EinsumDense("abc,bcd->abd", (3, 4)), (2, 3, 5)


def _einsum_transposed():
    # Kernel (out, in): the matrix form is a transpose of the kernel.
    return keras.layers.EinsumDense(
        "abc,dc->abd", (None, 4), bias_axes="d"
    ), (2, 3, 6)


def _embedding():
    return keras.layers.Embedding(11, 6), (2, 5)


def _conv2d():
    return keras.layers.Conv2D(4, 3, padding="same"), (2, 5, 5, 3)


def _conv1d_causal():
    return keras.layers.Conv1D(4, 3, padding="causal", dilation_rate=2), (
        2,
        7,
        3,
    )


CASES = {
    "dense": _dense,
    "einsum": _einsum,
    "einsum_batch": _einsum_batch,
    "einsum_transposed": _einsum_transposed,
    "embedding": _embedding,
    "conv2d": _conv2d,
    "conv1d_causal": _conv1d_causal,
}
MATRIX_CASES = list(CASES)


def _inputs(layer, shape):
    if isinstance(layer, keras.layers.Embedding):
        return RNG.integers(0, layer.input_dim, size=shape).astype("int32")
    return RNG.normal(size=shape).astype("float32")


def _plain(case):
    """A built plain layer with a random (non-trivial) kernel and bias."""
    layer, shape = CASES[case]()
    x = _inputs(layer, shape)
    layer(x)
    for var in layer.weights:
        var.assign(RNG.normal(size=var.shape).astype("float32"))
    return layer, x


def _kernel_var(layer):
    for attr in ("_kernel", "_embeddings"):
        if getattr(layer, attr, None) is not None:
            return getattr(layer, attr)
    raise AssertionError(layer)


def _twin(layer, x):
    """A fresh plain layer of the same configuration and weights."""
    base_class = adapter_class_for(layer).base_class
    config = {
        k: v
        for k, v in layer.get_config().items()
        if k not in ("adapters", "active_adapters", "merged_adapters")
    }
    twin = base_class.from_config(config)
    twin(x)
    for mine, theirs in zip(twin.weights, _plain_weights(layer)):
        mine.assign(theirs)
    return twin


def _plain_weights(layer):
    return [w for w in layer.weights if not w.name.startswith("lowrank_")]


def _np(x):
    if isinstance(x, keras.Variable):
        x = x.value
    return np.asarray(ops.convert_to_numpy(x), dtype="float64")


def _adapt(case, **options):
    layer, x = _plain(case)
    w = _np(_kernel_var(layer))
    y0 = _np(layer(x))
    adapter_class_for(layer).from_layer(layer, seed=1, **options)
    return layer, x, w, y0


def _randomize(layer, name="default", positive_magnitude=True):
    variables = layer.adapter_variables(name)
    for key in ("A", "B"):
        var = variables[key]
        var.assign(RNG.normal(size=var.shape).astype("float32") * 0.5)
    if "magnitude" in variables:
        m = variables["magnitude"]
        m.assign(_np(m) * RNG.uniform(0.5, 1.5, size=m.shape))


# --- float64 closed forms in the matrix form ---------------------------------


def _to_matrix(layout, kernel):
    kernel = np.asarray(kernel, "float64")
    x = np.transpose(kernel, layout.perm)
    return x.reshape(layout.batch_shape + (layout.d, layout.k))


def _from_matrix(layout, matrix):
    x = np.asarray(matrix).reshape(
        layout.batch_shape + layout.in_shape + layout.out_shape
    )
    return np.transpose(x, np.argsort(layout.perm))


def _factors(layer, name="default", keys=("A", "B")):
    layout = layer.lowrank_layout
    v = layer.adapter_variables(name)
    out = []
    for key in keys:
        value = _np(v[key])
        if key.startswith("A"):
            out.append(value.reshape(layout.batch_shape + (layout.d, -1)))
        else:
            rank = value.shape[len(layout.batch_shape)]
            out.append(value.reshape(layout.batch_shape + (rank, layout.k)))
    return out


def _units(layer, value):
    layout = layer.lowrank_layout
    shape = layout.batch_shape + (layout.k,)
    return np.asarray(value, "float64").reshape(shape)


def _dora_closed_form(w, a, b, m, s):
    """`(V, n, W')` for DoRA in float64: V = W + sAB, n = ‖V‖ per column."""
    v = w + s * a @ b
    n = np.sqrt((v**2).sum(axis=-2))
    return v, n, v * (m / n)[..., None, :]


def _output_with_kernel(layer, x, kernel_matrix):
    """The output of a plain twin of `layer` whose kernel is the closed form."""
    twin = _twin(layer, x)
    _kernel_var(twin).assign(
        _from_matrix(layer.lowrank_layout, kernel_matrix).astype("float32")
    )
    return _np(twin(x)), twin


def _close(actual, expected, tol=2e-5):
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=tol * scale)


# --- DoRA --------------------------------------------------------------------


@pytest.mark.parametrize("case", MATRIX_CASES)
def test_dora_forward_merge_and_unmerge_match_closed_form(case):
    layer, x, w, y0 = _adapt(case, rank=2, alpha=3, method="dora")
    layout = layer.lowrank_layout
    m = _units(layer, _np(layer.adapter_variables("default")["magnitude"]))
    wm = _to_matrix(layout, w)
    # m starts at ‖W + s·A·B‖ = ‖W‖ (B or A is zero) and the output at base.
    _close(m, np.sqrt((wm**2).sum(axis=-2)), 1e-6)
    assert layer.adapter_variables("default")["magnitude"].shape == (
        layout.unit_shape
    )
    np.testing.assert_array_equal(_np(layer(x)), y0)

    _randomize(layer)
    a, b = _factors(layer)
    m = _units(layer, _np(layer.adapter_variables("default")["magnitude"]))
    s = layer.adapter_spec("default").scale
    _, n, merged = _dora_closed_form(wm, a, b, m, s)
    expected, _ = _output_with_kernel(layer, x, merged)
    _close(_np(layer(x)), expected)
    # The norm without forming W + sAB equals the direct one.
    norm = adapter_math.dora_weight_norm(wm, a, b, s)
    _close(_np(norm), n, 1e-6)

    y = _np(layer(x))
    variables = layer.adapter_variables("default")
    layer.merge()
    assert layer.merged_adapters == ["default"]
    assert not any(v.trainable for v in variables.values())
    _close(_to_matrix(layout, _np(_kernel_var(layer))), merged, 1e-5)
    # The norm used is kept while merged: unmerging needs it.
    _close(_units(layer, _np(variables["norm"])), n, 1e-5)
    _close(_np(layer(x)), y)

    layer.unmerge()
    np.testing.assert_allclose(_np(_kernel_var(layer)), w, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(_np(variables["norm"]), 0.0)
    _close(_np(layer(x)), y)
    assert variables["magnitude"].trainable


@pytest.mark.parametrize("case", MATRIX_CASES)
def test_dora_gradients_hold_the_norm_constant(case):
    layer, x, w, _ = _adapt(case, rank=2, alpha=3, method="dora")
    _randomize(layer)
    layout = layer.lowrank_layout
    wm = _to_matrix(layout, w)
    a, b = _factors(layer)
    variables = layer.adapter_variables("default")
    m = _units(layer, _np(variables["magnitude"]))
    s = layer.adapter_spec("default").scale
    v, n, merged = _dora_closed_form(wm, a, b, m, s)
    y, twin = _output_with_kernel(layer, x, merged)
    cotangent = RNG.normal(size=y.shape).astype("float32")

    def loss(target):
        return lambda: ops.sum(ops.multiply(target(x), cotangent))

    kernel = _kernel_var(twin)
    kernel.trainable = True
    (j,) = _grads(loss(twin), [kernel])
    j = _to_matrix(layout, j)
    jr = j * (m / n)[..., None, :]
    expected = {
        "A": s * jr @ np.swapaxes(b, -1, -2),
        "B": s * np.swapaxes(a, -1, -2) @ jr,
        "magnitude": (j * v).sum(axis=-2) / n,
    }
    keys = ["A", "B", "magnitude"]
    got = _grads(loss(layer), [variables[k] for k in keys])
    got_a = got[0].reshape(layout.batch_shape + (layout.d, -1))
    got_b = got[1].reshape(layout.batch_shape + (2, layout.k))
    _close(got_a, expected["A"], 5e-5)
    _close(got_b, expected["B"], 5e-5)
    _close(_units(layer, got[2]), expected["magnitude"], 5e-5)


@pytest.mark.parametrize("case", ["dense", "einsum_transposed", "conv2d"])
def test_dora_dropout_term_uses_the_dropped_input(case, monkeypatch):
    layer, x, w, _ = _adapt(case, rank=2, method="dora", dropout=0.5)
    _randomize(layer)
    mask = (RNG.uniform(size=x.shape) > 0.3).astype("float32") * 2.0
    masks = []

    def fake_dropout(inputs, rate, training, seed=None):
        if not rate or not training:
            return inputs
        masks.append(rate)
        return ops.multiply(inputs, mask)

    monkeypatch.setattr(adapter_math, "adapter_dropout", fake_dropout)
    layout = layer.lowrank_layout
    a, b = _factors(layer)
    m = _units(layer, _np(layer.adapter_variables("default")["magnitude"]))
    s = layer.adapter_spec("default").scale
    _, _, merged = _dora_closed_form(_to_matrix(layout, w), a, b, m, s)
    x_d = x * mask
    # y = x·W + (m/n − 1)·x_d·W + (m/n)·s·x_d·A·B = x·W + x_d·W' − x_d·W
    with_merged, twin = _output_with_kernel(layer, x_d, merged)
    plain = _twin(layer, x)
    bias = _np(plain.bias)
    expected = _np(plain(x)) + (with_merged - bias) - (_np(plain(x_d)) - bias)
    _close(_np(layer(x, training=True)), expected)
    assert masks == [0.5]
    # Inference: no dropout at all.
    expected_eval, _ = _output_with_kernel(layer, x, merged)
    _close(_np(layer(x, training=False)), expected_eval)


def test_dora_with_real_dropout_trains_all_three():
    layer = keras_lowrank.LowRankDense(4, rank=2, method="dora", dropout=0.2)
    model = keras.Sequential([keras.Input((6,)), layer])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    before = {k: _np(v) for k, v in layer.adapter_variables("default").items()}
    x = RNG.normal(size=(8, 6)).astype("float32")
    model.fit(x, RNG.normal(size=(8, 4)), epochs=2, verbose=0)
    after = {k: _np(v) for k, v in layer.adapter_variables("default").items()}
    for key in ("A", "B", "magnitude"):
        assert not np.allclose(before[key], after[key]), key
    np.testing.assert_array_equal(after["norm"], 0.0)


def test_adapters_act_side_by_side_and_merge_exactly_in_any_order():
    """LoRA "a" and DoRA "b", "c" all act on the same base kernel W0."""
    layer, x, w, _ = _adapt("dense", rank=2, alpha=2, adapter_name="a")
    layer.add_adapter("b", AdapterSpec(rank=1, alpha=3, method="dora"))
    layer.add_adapter("c", AdapterSpec(rank=2, method="dora"))
    for name in "abc":
        _randomize(layer, name)
    w0 = np.asarray(w, "float64")
    expected = w0.copy()
    for name in "abc":
        spec = layer.adapter_spec(name)
        a, b = _factors(layer, name)
        if spec.method == "lora":
            expected += spec.scale * a @ b
        else:
            m = _np(layer.adapter_variables(name)["magnitude"])
            _, _, merged = _dora_closed_form(w0, a, b, m, spec.scale)
            expected += merged - w0
    y, _ = _output_with_kernel(layer, x, expected)
    _close(_np(layer(x)), y)
    for order in (["c"], ["b", "a"], ["a"], ["c", "b", "a"]):
        layer.merge(order)
        _close(_np(layer(x)), y)
        assert set(layer.merged_adapters) >= set(order)
    _close(_np(_kernel_var(layer)), expected, 1e-5)
    layer.unmerge(["b"])
    _close(_np(layer(x)), y)
    layer.unmerge()
    _close(_np(_kernel_var(layer)), w0, 1e-5)
    _close(_np(layer(x)), y)
    total = sum(_np(layer.delta(n)) for n in "abc")
    _close(w0 + total, expected, 1e-5)


# --- mixed precision ---------------------------------------------------------


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
@pytest.mark.parametrize(
    "case", ["dense", "einsum_batch", "embedding", "conv2d"]
)
def test_dora_starts_at_base_under_mixed_precision(case, policy):
    keras.config.set_dtype_policy(policy)
    layer, x = _plain(case)
    y0 = _np(layer(x))
    adapter_class_for(layer).from_layer(layer, rank=2, method="dora")
    variables = layer.adapter_variables("default")
    assert all(v.dtype == "float32" for v in variables.values())
    # The norm is taken of the kernel as `call` sees it (compute dtype), so
    # m/‖·‖ is exactly 1 and the output is exactly the base output.
    np.testing.assert_array_equal(_np(layer(x)), y0)
    dtype = keras.backend.standardize_dtype(layer(x).dtype)
    assert dtype == layer.compute_dtype
    _randomize(layer)
    y = _np(layer(x))
    layer.merge()
    tol = 2e-2 if policy == "mixed_bfloat16" else 4e-3
    _close(_np(layer(x)), y, tol)
    layer.unmerge()
    _close(_np(layer(x)), y, tol)


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_kernel_inits_start_at_base_under_mixed_precision(init, policy):
    keras.config.set_dtype_policy(policy)
    layer, x = _plain("einsum")
    y0 = _np(layer(x))
    keras_lowrank.LowRankEinsumDense.from_layer(
        layer, rank=2, init=init, method="dora"
    )
    tol = 2e-2 if policy == "mixed_bfloat16" else 4e-3
    _close(_np(layer(x)), y0, tol)


# --- PiSSA and OLoRA ---------------------------------------------------------


def _top_r(wm, r):
    u, s, vt = np.linalg.svd(wm, full_matrices=False)
    return (u[..., :, :r] * s[..., None, :r]) @ vt[..., :r, :]


@pytest.mark.parametrize("case", MATRIX_CASES)
def test_pissa_is_the_top_r_svd(case):
    dora_cases = ("einsum_batch", "embedding", "conv2d")
    method = "dora" if case in dora_cases else "lora"
    layer, x, w, y0 = _adapt(
        case, rank=2, alpha=3, method=method, init="pissa"
    )
    layout = layer.lowrank_layout
    s = layer.adapter_spec("default").scale
    a, b, a0, b0 = _factors(layer, keys=("A", "B", "A0", "B0"))
    wm = _to_matrix(layout, w)
    _close(s * a @ b, _top_r(wm, 2), 1e-5)
    _close(_to_matrix(layout, _np(_kernel_var(layer))), wm - s * a @ b, 1e-5)
    np.testing.assert_array_equal(a0, a)
    np.testing.assert_array_equal(b0, b)
    # A = U_r·sqrt(S_r/s): orthogonal columns with squared norms S_r/s.
    sing = np.linalg.svd(wm, compute_uv=False)[..., :2]
    _close(np.linalg.norm(a, axis=-2) ** 2, sing / s, 1e-5)
    _close(_np(layer(x)), y0, 1e-5)
    variables = layer.adapter_variables("default")
    assert not variables["A0"].trainable and not variables["B0"].trainable
    trainable = {v.name for v in layer.trainable_weights}
    assert "lowrank_A0_default" not in trainable


@pytest.mark.parametrize("case", MATRIX_CASES)
def test_olora_follows_the_qr_formula(case):
    layer, x, w, y0 = _adapt(case, rank=2, alpha=3, init="olora")
    layout = layer.lowrank_layout
    s = layer.adapter_spec("default").scale
    a, b = _factors(layer)
    wm = _to_matrix(layout, w)
    # Wᵀ = Q·R; B = Q_rᵀ, A = R_rᵀ (signs of a column of Q and the matching
    # row of R may flip together between QR implementations).
    q, r = np.linalg.qr(np.swapaxes(wm, -1, -2))
    _close(np.abs(b), np.abs(np.swapaxes(q[..., :, :2], -1, -2)), 1e-5)
    _close(np.abs(a), np.abs(np.swapaxes(r[..., :2, :], -1, -2)), 1e-4)
    _close(a @ b, np.swapaxes(q[..., :, :2] @ r[..., :2, :], -1, -2), 1e-5)
    eye = np.broadcast_to(np.eye(2), a.shape[:-2] + (2, 2))
    _close(b @ np.swapaxes(b, -1, -2), eye, 1e-5)
    assert np.allclose(np.triu(np.swapaxes(a, -1, -2)), np.swapaxes(a, -1, -2))
    _close(_to_matrix(layout, _np(_kernel_var(layer))), wm - s * a @ b, 1e-5)
    _close(_np(layer(x)), y0, 1e-5)


def test_randomized_pissa_approximates_the_top_r_svd():
    d, k, r = 40, 30, 3
    u, _ = np.linalg.qr(RNG.normal(size=(d, d)))
    v, _ = np.linalg.qr(RNG.normal(size=(k, k)))
    spectrum = np.concatenate([[10.0, 7.0, 5.0], 0.01 * np.ones(k - 3)])
    w = (u[:, :k] * spectrum) @ v.T
    layer = keras.layers.Dense(k, use_bias=False)
    layer.build((None, d))
    layer.kernel.assign(w.astype("float32"))
    keras_lowrank.LowRankDense.from_layer(
        layer, rank=r, init="pissa_niter_4", seed=3
    )
    a, b = _factors(layer)
    s = layer.adapter_spec("default").scale
    _close(s * a @ b, _top_r(w, r), 1e-3)
    x = RNG.normal(size=(4, d)).astype("float32")
    _close(_np(layer(x)), x @ w, 1e-5)
    assert layer.adapter_spec("default").rewrites_kernel


def test_randomized_svd_returns_r_triplets():
    u, _ = np.linalg.qr(RNG.normal(size=(2, 12, 9)))
    v, _ = np.linalg.qr(RNG.normal(size=(2, 9, 9)))
    w = (u * 0.5 ** np.arange(9)) @ np.swapaxes(v, -1, -2)
    u3, s3, vt3 = adapter_math.randomized_svd(w, 3, niter=6, seed=0)
    assert tuple(u3.shape) == (2, 12, 3) and tuple(vt3.shape) == (2, 3, 9)
    _close(_np(s3), np.broadcast_to([1.0, 0.5, 0.25], (2, 3)), 1e-3)
    eye = np.broadcast_to(np.eye(3), (2, 3, 3))
    _close(np.swapaxes(_np(u3), -1, -2) @ _np(u3), eye, 1e-5)
    _close(_np(vt3) @ np.swapaxes(_np(vt3), -1, -2), eye, 1e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_delete_restores_the_original_kernel(init):
    layer, x, w, y0 = _adapt("einsum", rank=2, init=init)
    _randomize(layer)
    layer.merge()
    layer.delete_adapter("default")
    _close(_np(_kernel_var(layer)), w, 1e-5)
    _close(_np(layer(x)), y0, 1e-5)


def test_kernel_rewrites_refuse_an_existing_dora_adapter():
    layer, _, _, _ = _adapt("dense", rank=2, method="dora", adapter_name="d")
    with pytest.raises(ValueError, match="init='pissa' rewrites the kernel, "
                       "which would change the DoRA adapter 'd'"):
        layer.add_adapter("p", AdapterSpec(rank=1, init="pissa"))
    assert layer.adapter_names == ["d"]
    layer2, _, _, _ = _adapt("dense", rank=2, init="olora", adapter_name="p")
    layer2.add_adapter("d", AdapterSpec(rank=1, method="dora"))
    with pytest.raises(ValueError, match="deleting the init='olora' adapter "
                       "'p' restores the kernel.*Delete the DoRA adapter"):
        layer2.delete_adapter("p")
    layer2.delete_adapter("d")
    layer2.delete_adapter("p")
    layer3, _, _, _ = _adapt("dense", rank=2)
    layer3.merge()
    with pytest.raises(ValueError, match="init='olora' rewrites the kernel, "
                       "which holds merged adapters now. `unmerge` first."):
        layer3.add_adapter("p", AdapterSpec(rank=1, init="olora"))


def test_pissa_niter_option_is_validated():
    assert AdapterSpec(rank=2, init="pissa_niter_0").rewrites_kernel
    assert not AdapterSpec(rank=2, init="gaussian").rewrites_kernel
    for bad in ("pissa_niter_", "pissa_niter_x", "pissa_niter_-1", "svd"):
        with pytest.raises(ValueError, match=f"unknown init '{bad}'. Use one "
                           "of 'default', 'gaussian', 'pissa', 'olora', "
                           "'pissa_niter_<n>'."):
            AdapterSpec(rank=2, init=bad)


# --- adapters relative to the original kernel --------------------------------


@pytest.mark.parametrize(
    "case,init,method,scaling",
    [
        ("dense", "pissa", "lora", "standard"),
        ("einsum_batch", "olora", "dora", "standard"),
        ("conv2d", "pissa_niter_2", "dora", "rslora"),
        ("embedding", "pissa", "dora", "standard"),
    ],
)
def test_pissa_olora_as_rank_2r_adapter_on_original_kernel(
    case, init, method, scaling
):
    layer, x = _plain(case)
    original = _twin(layer, x)
    adapter_class_for(layer).from_layer(
        layer, rank=2, alpha=3, init=init, method=method, scaling=scaling
    )
    _randomize(layer)
    y = _np(layer(x))
    spec, values = layer.adapter_for_original_kernel("default")
    assert spec.rank == 4 and spec.init == "default"
    assert spec.method == method and spec.scaling == scaling
    assert spec.scale == pytest.approx(layer.adapter_spec("default").scale)
    adapter_class_for(original).from_layer(
        original, **{k: v for k, v in spec.get_config().items()}
    )
    for key, value in values.items():
        original.adapter_variables("default")[key].assign(value)
    _close(_np(original(x)), y, 5e-5)


def test_original_kernel_factors_closed_form():
    a, b = RNG.normal(size=(6, 2)), RNG.normal(size=(2, 5))
    a0, b0 = RNG.normal(size=(6, 2)), RNG.normal(size=(2, 5))
    a2, b2 = adapter_math.original_kernel_factors(a, b, a0, b0)
    assert tuple(a2.shape) == (6, 4) and tuple(b2.shape) == (4, 5)
    _close(_np(a2) @ _np(b2), a @ b - a0 @ b0, 1e-5)
    # PEFT's layout of the same: A' = [A, A0], B' = [B; −B0].
    np.testing.assert_allclose(_np(a2)[:, 2:], a0, atol=1e-6)
    np.testing.assert_allclose(_np(b2)[2:], -b0, atol=1e-6)
    assert adapter_math.alpha_for_rank(8, 4, 8) == 16.0
    assert adapter_math.alpha_for_rank(8, 4, 8, "rslora") == pytest.approx(
        8 * 2**0.5
    )
    with pytest.raises(ValueError, match="unknown scaling 'x'"):
        adapter_math.alpha_for_rank(8, 4, 8, "x")


def test_rank_2r_is_recompressed_when_larger_than_the_kernel():
    layer, x = _plain("dense")  # 7 -> 5: min(d, k) = 5 < 2·3
    original = _twin(layer, x)
    keras_lowrank.LowRankDense.from_layer(layer, rank=3, init="pissa")
    _randomize(layer)
    y = _np(layer(x))
    spec, values = layer.adapter_for_original_kernel("default")
    assert spec.rank == 5 and tuple(values["A"].shape) == (7, 5)
    assert spec.scale == pytest.approx(layer.adapter_spec("default").scale)
    keras_lowrank.LowRankDense.from_layer(original, **spec.get_config())
    for key, value in values.items():
        original.adapter_variables("default")[key].assign(value)
    _close(_np(original(x)), y, 5e-5)


def test_plain_adapters_are_their_own_original_kernel_form():
    layer, _, _, _ = _adapt("dense", rank=2, method="dora")
    spec, values = layer.adapter_for_original_kernel("default")
    assert spec == layer.adapter_spec("default")
    assert sorted(values) == ["A", "B", "magnitude"]


def test_pissa_dora_layer_round_trips_through_a_keras_file(tmp_path):
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras_lowrank.LowRankDense(
                5, rank=2, init="pissa", method="dora", scaling="rslora"
            ),
        ]
    )
    layer = model.layers[0]
    _randomize(layer)
    config = layer.get_config()
    assert config["adapters"]["default"]["init"] == "pissa"
    clone = keras_lowrank.LowRankDense.from_config(config)
    clone.build((None, 6))
    assert sorted(clone.adapter_variables("default")) == [
        "A", "A0", "B", "B0", "magnitude", "norm"
    ]
    x = RNG.normal(size=(3, 6)).astype("float32")
    y = _np(model(x))
    path = str(tmp_path / "pissa_dora.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    _close(_np(loaded(x)), y, 1e-6)
    for key, var in layer.adapter_variables("default").items():
        np.testing.assert_array_equal(
            _np(loaded.layers[0].adapter_variables("default")[key]), _np(var)
        )
    np.testing.assert_array_equal(
        _np(_kernel_var(loaded.layers[0])), _np(_kernel_var(layer))
    )


def test_loading_does_not_rerun_the_kernel_init(monkeypatch):
    layer = keras_lowrank.LowRankEinsumDense(
        "ab,bc->ac", (4,), rank=2, init="olora", method="dora"
    )
    layer.build((None, 6))
    config = layer.get_config()

    def refuse(*args, **kwargs):
        raise AssertionError("the kernel init ran while restoring")

    monkeypatch.setattr(adapter_math, "kernel_factors", refuse)
    clone = keras_lowrank.LowRankEinsumDense.from_config(config)
    clone.build((None, 6))
    # Until the saved weights are loaded the adapter is neutral: B = 0 and
    # m = ‖W‖, so the layer computes its (random) kernel's output.
    x = RNG.normal(size=(3, 6)).astype("float32")
    _close(_np(clone(x)), x @ _np(_kernel_var(clone)), 1e-5)


# --- rsLoRA ------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("case", ["dense", "einsum", "conv2d"])
def test_rslora_scaling(case, method):
    layer, x, w, _ = _adapt(
        case, rank=4, alpha=6, method=method, scaling="rslora"
    )
    assert layer.adapter_spec("default").scale == pytest.approx(3.0)
    _randomize(layer)
    layout = layer.lowrank_layout
    a, b = _factors(layer)
    wm = _to_matrix(layout, w)
    if method == "lora":
        kernel = wm + 3.0 * a @ b
    else:
        m = _units(layer, _np(layer.adapter_variables("default")["magnitude"]))
        _, _, kernel = _dora_closed_form(wm, a, b, m, 3.0)
    expected, _ = _output_with_kernel(layer, x, kernel)
    _close(_np(layer(x)), expected)


# --- PEFT's DoRA, numerically ------------------------------------------------


def test_dora_matches_peft_on_linear_embedding_and_conv():
    """PEFT's DoRA layers and ours give the same outputs from the same
    weights: same norm axes, magnitude shapes and output formula."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(7, 5)
            self.emb = torch.nn.Embedding(11, 6)
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    config = peft.LoraConfig(
        r=2,
        lora_alpha=3,
        use_dora=True,
        init_lora_weights=False,  # B random: the magnitude is not just ‖W‖
        target_modules=["lin", "emb", "conv"],
    )
    net = peft.get_peft_model(Net(), config).eval()
    inner = net.base_model.model
    with torch.no_grad():
        for module in (inner.lin, inner.emb, inner.conv):
            mag = module.lora_magnitude_vector["default"].weight
            mag.mul_(torch.rand_like(mag) + 0.5)

    def t(x):
        return x.detach().numpy().astype("float32")

    def check(peft_module, x_torch, keras_layer, x, weights, to_keras_output):
        keras_layer(x)
        adapter_class_for(keras_layer).from_layer(
            keras_layer, rank=2, alpha=3, method="dora"
        )
        variables = keras_layer.adapter_variables("default")
        for var, value in zip(_plain_weights(keras_layer), weights["base"]):
            var.assign(value)
        for key in ("A", "B", "magnitude"):
            variables[key].assign(weights[key])
        with torch.no_grad():
            expected = to_keras_output(t(peft_module(x_torch)))
        _close(_np(keras_layer(x)), expected, 1e-5)

    lin = inner.lin
    x = RNG.normal(size=(4, 7)).astype("float32")
    check(
        lin,
        torch.from_numpy(x),
        keras.layers.Dense(5),
        x,
        {
            "base": [t(lin.base_layer.weight).T, t(lin.base_layer.bias)],
            "A": t(lin.lora_A["default"].weight).T,
            "B": t(lin.lora_B["default"].weight).T,
            "magnitude": t(lin.lora_magnitude_vector["default"].weight),
        },
        lambda y: y,
    )
    emb = inner.emb
    ids = RNG.integers(0, 11, size=(2, 5))
    check(
        emb,
        torch.from_numpy(ids),
        keras.layers.Embedding(11, 6),
        ids.astype("int32"),
        {
            "base": [t(emb.base_layer.weight)],
            "A": t(emb.lora_embedding_A["default"]).T,
            "B": t(emb.lora_embedding_B["default"]).T,
            "magnitude": t(emb.lora_magnitude_vector["default"].weight),
        },
        lambda y: y,
    )
    conv = inner.conv
    x = RNG.normal(size=(2, 5, 5, 3)).astype("float32")
    check(
        conv,
        torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
        keras.layers.Conv2D(4, 3, padding="same"),
        x,
        {
            "base": [
                t(conv.base_layer.weight).transpose(2, 3, 1, 0),
                t(conv.base_layer.bias),
            ],
            "A": t(conv.lora_A["default"].weight).transpose(2, 3, 1, 0),
            "B": t(conv.lora_B["default"].weight)[:, :, 0, 0].T,
            "magnitude": t(
                conv.lora_magnitude_vector["default"].weight
            ).reshape(-1),
        },
        lambda y: y.transpose(0, 2, 3, 1),
    )


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_kernel_inits_match_peft(init):
    """PEFT's `init_lora_weights="pissa"/"olora"` leaves the same residual
    kernel and the same `s·A·B` (factor signs may differ between QR/SVD
    implementations)."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(7, 5))
    w = base[0].weight.detach().numpy().T.astype("float32").copy()
    config = peft.LoraConfig(
        r=2, lora_alpha=3, init_lora_weights=init, target_modules=["0"]
    )
    lin = peft.get_peft_model(base, config).base_model.model[0]
    residual = lin.base_layer.weight.detach().numpy().T
    product = (
        lin.scaling["default"]
        * (lin.lora_B["default"].weight @ lin.lora_A["default"].weight)
        .detach()
        .numpy()
        .T
    )
    layer = keras.layers.Dense(5)
    layer.build((None, 7))
    layer.kernel.assign(w)
    keras_lowrank.LowRankDense.from_layer(layer, rank=2, alpha=3, init=init)
    a, b = _factors(layer)
    _close(_np(_kernel_var(layer)), residual, 1e-5)
    _close(layer.adapter_spec("default").scale * a @ b, product, 1e-5)
