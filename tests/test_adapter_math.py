"""Every function of `keras_lowrank.adapter_math` against float64 NumPy.

The library computes in float32 with `keras.ops` on the active backend; the
references here are closed forms evaluated in float64 NumPy.
"""

import math

import keras
import numpy as np
import pytest
from keras import ops

from keras_lowrank import adapter_math as am

RTOL = 1e-5
ATOL = 1e-5


def _np(x):
    return np.asarray(ops.convert_to_numpy(x), dtype="float64")


def _rand(rng, *shape):
    return rng.standard_normal(shape).astype("float32")


def _close(actual, expected, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(_np(actual), expected, rtol=rtol, atol=atol)


# --- scaling -------------------------------------------------------------------


@pytest.mark.parametrize(
    "alpha, rank, scaling, expected",
    [
        (16, 4, "standard", 4.0),
        (8, 8, "standard", 1.0),
        (1, 3, "standard", 1.0 / 3.0),
        (16, 4, "rslora", 8.0),
        (8, 8, "rslora", 8.0 / math.sqrt(8.0)),
        (2.5, 2, "rslora", 2.5 / math.sqrt(2.0)),
    ],
)
def test_scaling_factor(alpha, rank, scaling, expected):
    s = am.scaling_factor(alpha, rank, scaling)
    assert isinstance(s, float)
    assert s == pytest.approx(expected, rel=1e-15)


def test_scaling_factor_unknown_name():
    with pytest.raises(ValueError, match="unknown scaling 'rs'.*'standard'"):
        am.scaling_factor(8, 4, "rs")


# --- the low-rank contribution ------------------------------------------------


@pytest.mark.parametrize("x_shape", [(4, 6), (2, 3, 6)])
def test_lowrank_contribution_is_s_xa_b(x_shape):
    rng = np.random.default_rng(0)
    x, a, b = _rand(rng, *x_shape), _rand(rng, 6, 3), _rand(rng, 3, 5)
    out = am.lowrank_contribution(x, a, b, 0.75)
    expected = 0.75 * (x.astype("float64") @ a.astype("float64")) @ b
    assert tuple(out.shape) == x_shape[:-1] + (5,)
    _close(out, expected)


@pytest.mark.parametrize("scale, multiplies", [(1.0, 0), (1, 0), (0.75, 1)])
def test_lowrank_contribution_multiplies_only_when_s_is_not_one(
    monkeypatch, scale, multiplies
):
    """The fewest ops: `s = 1` (alpha = rank, the default) takes no
    elementwise multiply at all, and the result is still `s·(x·A)·B`."""
    from keras_lowrank.adapter_math import lowrank

    calls = []
    multiply = lowrank.ops.multiply

    class CountingOps:
        def __getattr__(self, name):
            return getattr(ops, name)

        def multiply(self, *args):
            calls.append(args)
            return multiply(*args)

    monkeypatch.setattr(lowrank, "ops", CountingOps())
    rng = np.random.default_rng(1)
    x, a, b = _rand(rng, 4, 6), _rand(rng, 6, 3), _rand(rng, 3, 5)
    out = am.lowrank_contribution(x, a, b, scale)
    assert len(calls) == multiplies
    _close(out, float(scale) * (x.astype("float64") @ a.astype("float64")) @ b)


@pytest.mark.parametrize(
    "x_shape, contracted_ndim, out_shape",
    [((4, 6), 1, None), ((2, 3, 6), 1, None), ((2, 3, 2, 3), 2, None),
     ((2, 3, 6), 1, (5, 1))],
)
def test_flat_matmul_is_the_trailing_axes_product(x_shape, contracted_ndim,
                                                  out_shape):
    rng = np.random.default_rng(0)
    x, w = _rand(rng, *x_shape), _rand(rng, 6, 5)
    out = am.flat_matmul(x, w, contracted_ndim, out_shape)
    lead = x_shape[: len(x_shape) - contracted_ndim]
    expected = (x.astype("float64").reshape(-1, 6) @ w).reshape(
        lead + (out_shape or (5,))
    )
    assert tuple(out.shape) == lead + (out_shape or (5,))
    _close(out, expected)


@pytest.mark.parametrize("x_shape,contracted_ndim", [((4, 6), 1), ((2, 3, 2, 3), 2)])
def test_shared_projections_are_each_scaled_factors_product(x_shape, contracted_ndim):
    rng = np.random.default_rng(2)
    x = _rand(rng, *x_shape)
    factors = [_rand(rng, 6, 2), _rand(rng, 6, 3), _rand(rng, 6, 1)]
    scales = [2.0, 1.0, 0.25]
    parts = am.shared_projections(x, factors, scales, "float32", contracted_ndim)
    lead = x_shape[: len(x_shape) - contracted_ndim]
    flat = x.astype("float64").reshape(-1, 6)
    assert len(parts) == 3
    for part, a, s in zip(parts, factors, scales):
        expected = (s * flat @ a.astype("float64")).reshape(lead + (a.shape[1],))
        assert tuple(part.shape) == lead + (a.shape[1],)
        _close(part, expected)


def test_lowrank_contribution_dropout_inactive_at_inference():
    rng = np.random.default_rng(1)
    x, a, b = _rand(rng, 4, 6), _rand(rng, 6, 2), _rand(rng, 2, 3)
    plain = _np(am.lowrank_contribution(x, a, b, 2.0))
    for training in (False, None):
        out = am.lowrank_contribution(
            x, a, b, 2.0, dropout=0.5, training=training
        )
        np.testing.assert_array_equal(_np(out), plain)


def test_lowrank_contribution_dropout_in_training():
    rng = np.random.default_rng(2)
    x, a, b = _rand(rng, 8, 6), _rand(rng, 6, 2), _rand(rng, 2, 3)
    out = am.lowrank_contribution(
        x,
        a,
        b,
        2.0,
        dropout=0.5,
        training=True,
        seed=keras.random.SeedGenerator(7),
    )
    dropped = _np(am.adapter_dropout(x, 0.5, True, keras.random.SeedGenerator(7)))
    _close(out, 2.0 * (dropped @ a) @ b)
    assert not np.allclose(_np(out), 2.0 * (x.astype("float64") @ a) @ b)


def test_adapter_dropout():
    rng = np.random.default_rng(3)
    x = ops.convert_to_tensor(np.abs(_rand(rng, 64, 32)) + 0.1)
    # Inactive: the very same tensor comes back (DoRA relies on it).
    assert am.adapter_dropout(x, 0.0, True) is x
    assert am.adapter_dropout(x, 0.3, False) is x
    assert am.adapter_dropout(x, 0.3, None) is x
    out = _np(am.adapter_dropout(x, 0.25, True, keras.random.SeedGenerator(0)))
    kept = out != 0
    np.testing.assert_allclose(out[kept], _np(x)[kept] / 0.75, rtol=1e-6)
    assert 0.6 < kept.mean() < 0.9


def test_lowrank_contribution_custom_contractions_and_dtype():
    rng = np.random.default_rng(4)
    x, a, b = _rand(rng, 2, 3, 4), _rand(rng, 4, 2), _rand(rng, 2, 3, 5)
    out = am.lowrank_contribution(
        ops.cast(x, "float16"),
        a,
        b,
        0.5,
        contract_a=lambda x, a: ops.einsum("btd,dr->btr", x, a),
        contract_b=lambda h, b: ops.einsum("btr,rnh->btnh", h, b),
    )
    assert keras.backend.standardize_dtype(out.dtype) == "float16"
    expected = 0.5 * np.einsum("btd,dr,rnh->btnh", x, a, b)
    _close(out, expected, rtol=1e-2, atol=1e-2)
    # Ids as input: the factors are cast to `dtype`, not to the ids' dtype.
    ids = np.array([[0, 2], [1, 1]], "int32")
    emb = am.lowrank_contribution(
        ids,
        _rand(rng, 3, 2),
        _rand(rng, 2, 4),
        1.0,
        contract_a=lambda i, a: ops.take(a, i, axis=0),
        dtype="bfloat16",
    )
    assert keras.backend.standardize_dtype(emb.dtype) == "bfloat16"


# --- delta, merge, unmerge ----------------------------------------------------


@pytest.mark.parametrize("batch", [(), (3,)])
def test_lowrank_delta(batch):
    rng = np.random.default_rng(5)
    a, b = _rand(rng, *batch, 7, 2), _rand(rng, *batch, 2, 4)
    delta = am.lowrank_delta(a, b, 1.5)
    assert keras.backend.standardize_dtype(delta.dtype) == "float32"
    _close(delta, 1.5 * np.matmul(a.astype("float64"), b))
    # float16 factors are widened before the product.
    half = am.lowrank_delta(ops.cast(a, "float16"), ops.cast(b, "float16"), 1.5)
    assert keras.backend.standardize_dtype(half.dtype) == "float32"


def test_merge_and_unmerge_kernel():
    rng = np.random.default_rng(6)
    w, a, b = _rand(rng, 7, 4), _rand(rng, 7, 2), _rand(rng, 2, 4)
    delta = am.lowrank_delta(a, b, 0.5)
    expected = w.astype("float64") + 0.5 * a.astype("float64") @ b
    merged = am.merge_kernel(w, delta)
    _close(merged, expected)
    _close(am.unmerge_kernel(merged, delta), w)
    # W's dtype is kept; the arithmetic happens in float32.
    w16 = ops.cast(w, "float16")
    merged16 = am.merge_kernel(w16, delta)
    assert keras.backend.standardize_dtype(merged16.dtype) == "float16"
    _close(merged16, expected, rtol=1e-3, atol=1e-2)


# --- DoRA ---------------------------------------------------------------------


@pytest.mark.parametrize("batch", [(), (2,)])
def test_dora_weight_norm_is_explicit_column_norm(batch):
    rng = np.random.default_rng(7)
    w, a, b = _rand(rng, *batch, 9, 5), _rand(rng, *batch, 9, 3), _rand(
        rng, *batch, 3, 5
    )
    s = 0.8
    explicit = w.astype("float64") + s * np.matmul(a.astype("float64"), b)
    expected = np.linalg.norm(explicit, axis=-2)
    norm = am.dora_weight_norm(w, a, b, s)
    assert tuple(norm.shape) == batch + (5,)
    _close(norm, expected)
    _close(am.dora_column_norm(w), np.linalg.norm(w.astype("float64"), axis=-2))


@pytest.mark.parametrize("batch", [(), (2,)])
@pytest.mark.parametrize("block_elements", [None, 5, 1, 10**9])
def test_column_sq_norm_in_blocks_equals_sum_of_squares(batch, block_elements):
    """Row blocks of 1, 2 and all rows (and a bfloat16 kernel) give the
    closed form; the block size only bounds the temporary."""
    rng = np.random.default_rng(17)
    w = _rand(rng, *batch, 7, 5)
    expected = np.sum(np.square(w.astype("float64")), axis=-2)
    got = am.column_sq_norm(w, block_elements=block_elements)
    assert keras.backend.standardize_dtype(got.dtype) == "float32"
    assert tuple(got.shape) == batch + (5,)
    _close(got, expected)
    w16 = ops.cast(w, "bfloat16")
    expected16 = np.sum(np.square(_np(ops.cast(w16, "float32")).astype("float64")), axis=-2)
    _close(am.column_sq_norm(w16, block_elements=block_elements), expected16)


def test_dora_combine_equals_rescaled_kernel():
    """Without dropout, DoRA's parts add up to x·(m/‖W+sAB‖)·(W+sAB)."""
    rng = np.random.default_rng(8)
    x, w = _rand(rng, 4, 6), _rand(rng, 6, 5)
    a, b = _rand(rng, 6, 2), _rand(rng, 2, 5)
    m = np.abs(_rand(rng, 5)) + 0.5
    s = 2.0
    w_adapted = w.astype("float64") + s * a.astype("float64") @ b
    norm = np.linalg.norm(w_adapted, axis=0)
    expected = x.astype("float64") @ (w_adapted * (m / norm))
    base = x @ w
    ratio = (m / _np(am.dora_weight_norm(w, a, b, s))).astype("float32")
    scaled_b = am.dora_scaled_b(b, ratio, 0)
    scaled_lowrank = am.lowrank_contribution(x, a, scaled_b, s)
    base = ops.convert_to_tensor(base)
    out = am.dora_combine(base, base, scaled_lowrank, ratio)
    _close(out, expected, rtol=1e-4, atol=1e-4)


def test_dora_combine_formula_with_dropout():
    rng = np.random.default_rng(9)
    base, base_d, lowrank = _rand(rng, 3, 4), _rand(rng, 3, 4), _rand(rng, 3, 4)
    ratio = np.abs(_rand(rng, 4)) + 0.5
    out = am.dora_combine(base, base_d, ratio * lowrank, ratio)
    expected = (
        base.astype("float64") + (ratio - 1.0) * base_d + ratio * lowrank
    )
    _close(out, expected)


def test_dora_merge_and_unmerge_kernel():
    rng = np.random.default_rng(10)
    w, a, b = _rand(rng, 6, 5), _rand(rng, 6, 2), _rand(rng, 2, 5)
    m = (np.abs(_rand(rng, 5)) + 0.5).astype("float32")
    s = 0.5
    delta = am.lowrank_delta(a, b, s)
    norm = am.dora_weight_norm(w, a, b, s)
    w_adapted = w.astype("float64") + s * a.astype("float64") @ b
    expected = w_adapted * (m / np.linalg.norm(w_adapted, axis=0))
    merged = am.dora_merged_kernel(w, delta, m, norm)
    _close(merged, expected)
    _close(am.dora_unmerged_kernel(merged, delta, m, norm), w, atol=1e-5)


# --- initialisers ---------------------------------------------------------------


def test_initial_factors_default():
    a, b = am.initial_factors("default", (400, 50), (50, 30), fan_in=400, seed=0)
    a, b = _np(a), _np(b)
    assert a.shape == (400, 50) and b.shape == (50, 30)
    limit = math.sqrt(6.0 / 400)
    assert np.abs(a).max() <= limit
    # U(-l, l): mean 0, std l/sqrt(3); 20,000 samples.
    assert abs(a.mean()) < 0.02 * limit
    assert a.std() == pytest.approx(limit / math.sqrt(3.0), rel=0.03)
    assert np.abs(a).max() > 0.95 * limit
    np.testing.assert_array_equal(b, np.zeros((50, 30)))


def test_initial_factors_gaussian():
    a, b = am.initial_factors("gaussian", (300, 4, 8), (4, 8, 20), fan_in=1200)
    a_np = _np(a)
    assert a_np.shape == (300, 4, 8)
    assert keras.backend.standardize_dtype(a.dtype) == "float32"
    assert keras.backend.standardize_dtype(b.dtype) == "float32"
    assert abs(a_np.mean()) < 0.01
    assert a_np.std() == pytest.approx(1.0 / 8, rel=0.03)
    np.testing.assert_array_equal(_np(b), np.zeros((4, 8, 20)))


def test_token_row_factors_place_the_rows_and_nothing_else():
    """`A·B` is `B`'s rows at the ids, zero elsewhere: `W[ids] += B`."""
    a, b = am.token_row_factors([7, 2, 4], vocab=9, width=5)
    assert keras.backend.standardize_dtype(a.dtype) == "float32"
    np.testing.assert_array_equal(_np(b), np.zeros((3, 5)))
    rows = np.random.default_rng(0).normal(size=(3, 5))
    expected = np.zeros((9, 5))
    expected[[7, 2, 4]] = rows
    np.testing.assert_array_equal(_np(a) @ rows, expected)


def test_initial_factors_refuses_kernel_inits():
    for init in ("pissa", "olora"):
        with pytest.raises(ValueError, match=f"{init}.*kernel_factors"):
            am.initial_factors(init, (4, 2), (2, 3), fan_in=4)
    with pytest.raises(ValueError, match="'nope'"):
        am.initial_factors("nope", (4, 2), (2, 3), fan_in=4)


def _top_r(w, r):
    u, sv, vt = np.linalg.svd(w.astype("float64"), full_matrices=False)
    return (u[..., :, :r] * sv[..., None, :r]) @ vt[..., :r, :]


@pytest.mark.parametrize("batch", [(), (2,)])
@pytest.mark.parametrize("scale", [1.0, 0.25, 4.0])
def test_pissa_factors(batch, scale):
    rng = np.random.default_rng(11)
    w = _rand(rng, *batch, 8, 6)
    rank = 3
    a, b, residual = am.pissa_factors(w, rank, scale)
    assert tuple(a.shape) == batch + (8, rank)
    assert tuple(b.shape) == batch + (rank, 6)
    sab = scale * np.matmul(_np(a), _np(b))
    _close(sab, _top_r(w, rank), rtol=1e-4, atol=1e-4)
    _close(_np(residual) + sab, w, rtol=1e-5, atol=1e-5)
    # A and B share the singular values evenly: AᵀA = B·Bᵀ = diag(S_r)/s.
    ata = np.matmul(np.swapaxes(_np(a), -1, -2), _np(a))
    bbt = np.matmul(_np(b), np.swapaxes(_np(b), -1, -2))
    np.testing.assert_allclose(ata, bbt, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batch", [(), (2,)])
@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_olora_factors(batch, scale):
    rng = np.random.default_rng(12)
    w = _rand(rng, *batch, 8, 6)
    rank = 2
    a, b, residual = am.olora_factors(w, rank, scale)
    assert tuple(a.shape) == batch + (8, rank)
    assert tuple(b.shape) == batch + (rank, 6)
    # Wᵀ = Q·R; A = R_rᵀ and B = Q_rᵀ unscaled (as PEFT and the issue), so
    # A·B = (Q_r·R_r)ᵀ, which does not depend on QR's signs.
    q, r = np.linalg.qr(np.swapaxes(w.astype("float64"), -1, -2))
    expected = np.swapaxes(q[..., :, :rank] @ r[..., :rank, :], -1, -2)
    ab = np.matmul(_np(a), _np(b))
    _close(ab, expected, rtol=1e-4, atol=1e-4)
    _close(_np(residual) + scale * ab, w)
    # B's rows are orthonormal.
    bbt = np.matmul(_np(b), np.swapaxes(_np(b), -1, -2))
    np.testing.assert_allclose(
        bbt, np.broadcast_to(np.eye(rank), bbt.shape), atol=1e-5
    )


def test_kernel_factors_dispatch():
    rng = np.random.default_rng(13)
    w = _rand(rng, 5, 4)
    for init, fn in (("pissa", am.pissa_factors), ("olora", am.olora_factors)):
        got = am.kernel_factors(init, w, 2, 1.0)
        want = fn(w, 2, 1.0)
        for g, e in zip(got, want):
            np.testing.assert_array_equal(_np(g), _np(e))
    with pytest.raises(ValueError, match="'default'.*initial_factors"):
        am.kernel_factors("default", w, 2, 1.0)


# --- combining adapters ----------------------------------------------------------


def _factors(rng, d=6, k=5, ranks=(2, 2)):
    return [_rand(rng, d, r) for r in ranks], [_rand(rng, r, k) for r in ranks]


def test_combine_linear_includes_cross_terms():
    rng = np.random.default_rng(20)
    a_list, b_list = _factors(rng)
    c = [0.7, -0.3]
    a, b = am.combine_linear(a_list, b_list, c)
    sa = [math.copysign(math.sqrt(abs(x)), x) for x in c]
    sb = [math.sqrt(abs(x)) for x in c]
    a_ref = sum(s * x.astype("float64") for s, x in zip(sa, a_list))
    b_ref = sum(s * x.astype("float64") for s, x in zip(sb, b_list))
    _close(a, a_ref)
    _close(b, b_ref)
    # A·B = Σ c_i A_i B_i + cross terms: not the weighted sum in general.
    weighted = sum(x * ai.astype("float64") @ bi for x, ai, bi in zip(c, a_list, b_list))
    assert np.max(np.abs(_np(a) @ _np(b) - weighted)) > 1e-3


def test_combine_cat_is_the_exact_weighted_sum():
    rng = np.random.default_rng(21)
    a_list, b_list = _factors(rng, ranks=(2, 3))
    c = [0.7, -0.3]
    a, b = am.combine_cat(a_list, b_list, c)
    assert tuple(a.shape) == (6, 5) and tuple(b.shape) == (5, 5)
    weighted = sum(x * ai.astype("float64") @ bi for x, ai, bi in zip(c, a_list, b_list))
    _close(_np(a) @ _np(b), weighted)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_truncate_product_is_the_best_rank_r_approximation(rank):
    rng = np.random.default_rng(22)
    a = _rand(rng, 8, 4)
    b = _rand(rng, 4, 7)
    new_a, new_b = am.truncate_product(a, b, rank)
    assert tuple(new_a.shape) == (8, rank) and tuple(new_b.shape) == (rank, 7)
    u, s, vt = np.linalg.svd(a.astype("float64") @ b.astype("float64"))
    best = (u[:, :rank] * s[:rank]) @ vt[:rank]
    _close(_np(new_a) @ _np(new_b), best, rtol=1e-4, atol=1e-4)


def test_relative_error():
    target = np.array([[3.0, 4.0]], "float32")
    approx = np.array([[3.0, 3.0]], "float32")
    assert math.isclose(am.relative_error(approx, target), 1.0 / 5.0, rel_tol=1e-6)
    assert am.relative_error(np.zeros((2, 2)), np.zeros((2, 2))) == 0.0
    assert am.relative_error(np.ones((2, 2)), np.zeros((2, 2))) == float("inf")


def test_dora_scaled_b_scales_each_output_unit():
    rng = np.random.default_rng(30)
    b = _rand(rng, 2, 3, 4)  # (batch, r, out)
    ratio = np.abs(_rand(rng, 2, 4)) + 0.5
    _close(am.dora_scaled_b(b, ratio, 1), b.astype("float64") * ratio[:, None, :])


def test_dora_merge_delta_and_unmerged_base_kernel():
    rng = np.random.default_rng(31)
    w0, a, b = _rand(rng, 6, 5), _rand(rng, 6, 2), _rand(rng, 2, 5)
    a2, b2 = _rand(rng, 6, 2), _rand(rng, 2, 5)
    m = np.abs(_rand(rng, 5)) + 0.5
    s = 1.5
    delta = s * a.astype("float64") @ b
    norm = np.linalg.norm(w0 + delta, axis=0)
    c = m / norm
    expected = (c - 1.0) * w0 + c * delta
    got = am.dora_merge_delta(w0, delta.astype("float32"), m, norm.astype("float32"))
    _close(got, expected, rtol=1e-4, atol=1e-4)
    # W0 + (a LoRA delta) + (the DoRA delta) gives W0 back.
    lora = (s * a2.astype("float64") @ b2)
    merged = w0 + lora + expected
    back = am.unmerged_base_kernel(
        merged.astype("float32"),
        [(lora.astype("float32"), None), (delta.astype("float32"), c.astype("float32"))],
    )
    _close(back, w0, rtol=1e-4, atol=1e-4)
    _close(am.unmerged_base_kernel(w0, []), w0)


def test_pissa_niter_parses_the_init_name():
    assert am.pissa_niter("pissa_niter_4") == 4
    assert am.pissa_niter("pissa_niter_16") == 16
    assert am.pissa_niter("pissa") is None
    assert am.pissa_niter("pissa_niter_x") is None
    assert am.pissa_niter(None) is None


def test_truncate_product_is_exact_for_a_low_rank_product():
    rng = np.random.default_rng(32)
    a = _rand(rng, 7, 1) @ np.ones((1, 3), "float32")  # rank 1 stored as 3
    b = _rand(rng, 3, 5)
    new_a, new_b = am.truncate_product(a, b, 1)
    assert tuple(new_a.shape) == (7, 1)
    _close(_np(new_a) @ _np(new_b), a.astype("float64") @ b, rtol=1e-4, atol=1e-4)


# Tested in tests/test_variants.py against float64 closed forms.
TESTED_ELSEWHERE = {"randomized_svd", "original_kernel_factors", "alpha_for_rank"}

TESTED = TESTED_ELSEWHERE | {
    "token_row_factors",
    "dora_scaled_b",
    "dora_merge_delta",
    "unmerged_base_kernel",
    "pissa_niter",
    "combine_linear",
    "combine_cat",
    "truncate_product",
    "relative_error",
    "scaling_factor",
    "shared_projections",
    "lowrank_contribution",
    "flat_matmul",
    "adapter_dropout",
    "lowrank_delta",
    "merge_kernel",
    "unmerge_kernel",
    "dora_weight_norm",
    "column_sq_norm",
    "dora_column_norm",
    "dora_combine",
    "dora_merged_kernel",
    "dora_unmerged_kernel",
    "initial_factors",
    "pissa_factors",
    "olora_factors",
    "kernel_factors",
    "stacked_slot",
    "routed_factors",
    "rows_lowrank_contribution",
}


# --- stacked adapters and per-row routing ----------------------------------------


@pytest.mark.parametrize("batch_ndim", [0, 1])
def test_stacked_slot_pads_the_rank_and_folds_the_scale(batch_ndim):
    rng = np.random.default_rng(11)
    lead = (2,) * batch_ndim
    a, b = _rand(rng, *lead, 5, 2), _rand(rng, *lead, 2, 3)
    a4, b4 = am.stacked_slot(a, b, 0.75, 4, batch_ndim)
    assert a4.shape == lead + (5, 4) and b4.shape == lead + (4, 3)
    assert not a4[..., 2:].any() and not np.take(b4, [2, 3], axis=batch_ndim).any()
    expected = 0.75 * np.matmul(a.astype("float64"), b.astype("float64"))
    np.testing.assert_allclose(np.matmul(a4, b4), expected, rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match="rank 2 does not fit a stack of rank 1"):
        am.stacked_slot(a, b, 1.0, 1, batch_ndim)


def test_routed_factors_picks_one_slot():
    rng = np.random.default_rng(12)
    a, b = _rand(rng, 3, 4, 2), _rand(rng, 3, 2, 5)
    a1, b1 = am.routed_factors(a, b, np.int32(2))
    _close(a1, a[2].astype("float64"))
    _close(b1, b[2].astype("float64"))


@pytest.mark.parametrize(
    "x_shape, contracted_ndim, out_shape",
    [((4, 6), 1, None), ((4, 3, 6), 1, None), ((4, 3, 2, 3), 2, (5,)),
     ((4, 6), 1, (5, 1))],
)
def test_rows_lowrank_contribution_is_each_rows_own_xab(x_shape, contracted_ndim,
                                                        out_shape):
    rng = np.random.default_rng(13)
    x = _rand(rng, *x_shape)
    a, b = _rand(rng, 3, 6, 2), _rand(rng, 3, 2, 5)
    a[0], b[0] = 0.0, 0.0  # slot 0: the base model
    rows = np.array([2, 0, 1, 2], "int32")
    out = _np(am.rows_lowrank_contribution(x, a, b, rows, contracted_ndim, out_shape))
    lead = x_shape[: len(x_shape) - contracted_ndim]
    assert out.shape == lead + tuple(out_shape or (5,))
    for n, slot in enumerate(rows):
        flat = x[n].reshape(-1, 6).astype("float64")
        expected = (flat @ a[slot].astype("float64")) @ b[slot].astype("float64")
        expected = expected.reshape(lead[1:] + tuple(out_shape or (5,)))
        np.testing.assert_allclose(out[n], expected, rtol=RTOL, atol=ATOL)
    assert not out[1].any()  # the base row gets nothing


def test_every_public_function_has_a_test():
    """A formula added to adapter_math needs its closed-form test here."""
    import inspect

    public = {
        name
        for name, obj in vars(am).items()
        if inspect.isfunction(obj)
        and obj.__module__.startswith(am.__name__ + ".")  # its submodules
        and not name.startswith("_")
    }
    assert public == TESTED, sorted(public ^ TESTED)
