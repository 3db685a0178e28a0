"""The adapter math of keras_lowrank: every formula lives here, in `keras.ops`.

The layers only say how their kernel maps to a matrix and how an input meets a
factor; the formulas themselves (scaling, the low-rank contribution, the delta
that merging adds, DoRA's norm and recombination, and the initialisers) are
written once, in this module, and tested against float64 NumPy closed forms.

Conventions ("matrix form"): a kernel `W` is `(..., d, k)`, `d` input features
and `k` output units; leading axes, if any, are batch axes of the
factorisation (each batch entry has its own rank-r update). `A` is
`(..., d, r)`, `B` is `(..., r, k)`, `s` is the scaling factor and

    y = x·W + s·(dropout(x)·A)·B (+ bias).
"""

import math

import keras
from keras import ops


def scaling_factor(alpha, rank, scaling="standard"):
    """The factor `s` that multiplies `A·B`.

    Args:
        alpha: positive number.
        rank: positive integer `r`.
        scaling: `"standard"` for `alpha / r` (the LoRA paper) or `"rslora"`
            for `alpha / sqrt(r)` (rank-stabilised LoRA).

    Returns:
        A Python float.

    Example:

    >>> scaling_factor(16, 4)
    4.0
    >>> scaling_factor(16, 4, "rslora")
    8.0
    """
    if scaling == "standard":
        return float(alpha) / float(rank)
    if scaling == "rslora":
        return float(alpha) / math.sqrt(rank)
    raise ValueError(
        f"keras_lowrank: unknown scaling {scaling!r}. Use 'standard' or "
        "'rslora'."
    )


def lowrank_contribution(
    x,
    a,
    b,
    scale,
    dropout=0.0,
    training=False,
    seed=None,
    contract_a=None,
    contract_b=None,
    dtype=None,
):
    """`s·(dropout(x)·A)·B`: the adapter's share of a layer's output.

    The product is taken as `(x·A)·B`, never as `x·(A·B)`: no `d×k` matrix and
    hence no `d×k` gradient exists, which is what makes a LoRA training step
    cheaper than a full one.

    Args:
        x: the layer input, in the compute dtype.
        a: factor `A`; cast to `x.dtype` here (factors are stored float32).
        b: factor `B`; likewise.
        scale: the float `s`.
        dropout: rate of the dropout applied to `x` on this path only.
        training: whether dropout is active.
        seed: a `keras.random.SeedGenerator` for the dropout.
        contract_a: `f(x, a)`, how the input meets `A` (default `x @ a`);
            EinsumDense, Conv and Embedding layers pass their own.
        contract_b: `f(h, b)`, how the rank-r intermediate meets `B`
            (default `h @ b`).
        dtype: the dtype the factors are cast to at use (default `x.dtype`;
            an Embedding passes its compute dtype since `x` holds ids).

    Returns:
        A tensor shaped like the layer's output.

    Example:

    >>> import numpy as np
    >>> x = np.ones((2, 3), "float32"); a = np.ones((3, 1), "float32")
    >>> b = np.ones((1, 4), "float32")
    >>> keras.ops.convert_to_numpy(lowrank_contribution(x, a, b, 0.5))[0]
    array([1.5, 1.5, 1.5, 1.5], dtype=float32)
    """
    contract_a = contract_a or ops.matmul
    contract_b = contract_b or ops.matmul
    dtype = keras.backend.standardize_dtype(dtype or x.dtype)
    x = adapter_dropout(x, dropout, training, seed)
    h = contract_a(x, ops.cast(a, dtype))
    y = contract_b(ops.cast(h, dtype), ops.cast(b, dtype))
    return ops.multiply(y, ops.cast(scale, dtype))


def adapter_dropout(x, rate, training, seed=None):
    """Dropout on the adapter path only; returns `x` itself when inactive.

    Returning the very same tensor lets DoRA reuse `x·W` when nothing was
    dropped instead of computing it twice.
    """
    if not rate or not training:
        return x
    # The torch backend's seeded dropout needs a tensor, not a NumPy array.
    return keras.random.dropout(ops.convert_to_tensor(x), rate, seed=seed)


def lowrank_delta(a, b, scale):
    """`s·A·B` in matrix form, in float32: what merging adds to the kernel.

    Example:

    >>> import numpy as np
    >>> a = np.ones((3, 2), "float32"); b = np.ones((2, 4), "float32")
    >>> keras.ops.convert_to_numpy(lowrank_delta(a, b, 0.5)).shape
    (3, 4)
    """
    a = ops.cast(a, "float32")
    b = ops.cast(b, "float32")
    return ops.multiply(ops.matmul(a, b), scale)


def merge_kernel(w, delta):
    """`W + ΔW`, computed in float32 and returned in `W`'s dtype."""
    dtype = w.dtype
    return ops.cast(ops.add(ops.cast(w, "float32"), delta), dtype)


def unmerge_kernel(w, delta):
    """`W − ΔW`: the inverse of `merge_kernel` (exact up to float rounding)."""
    dtype = w.dtype
    return ops.cast(ops.subtract(ops.cast(w, "float32"), delta), dtype)


# --- Combining adapters -------------------------------------------------------
#
# A combination of adapters i with weights w_i and scales s_i aims at
# ΔW = Σ c_i·A_i·B_i with c_i = w_i·s_i. The factors below carry the c_i
# themselves, so the combined adapter has scale 1.


def _signed_roots(coefficients):
    """`(sign(c)·sqrt(|c|), sqrt(|c|))` per coefficient: the A and B sides."""
    roots = [math.sqrt(abs(float(c))) for c in coefficients]
    signs = [-1.0 if float(c) < 0 else 1.0 for c in coefficients]
    return [s * r for s, r in zip(signs, roots)], roots


def combine_linear(a_list, b_list, coefficients):
    """Weighted sums of factors of equal rank (PEFT's `"linear"`).

    `A = Σ sign(c_i)·sqrt(|c_i|)·A_i` and `B = Σ sqrt(|c_i|)·B_i`, so
    `A·B = Σ_i c_i·A_i·B_i + Σ_{i≠j} sign(c_i)·sqrt(|c_i·c_j|)·A_i·B_j`: the
    weighted sum of the deltas plus cross terms. Exact only when the cross
    terms vanish (a single adapter, say); the price of keeping rank `r`.

    Args:
        a_list: `A_i`, each `(..., d, r)` (matrix form), same `r`.
        b_list: `B_i`, each `(..., r, k)`.
        coefficients: `c_i` (Python floats): weight times scale.

    Returns:
        `(a, b)` in float32, rank `r`.

    Example:

    >>> import numpy as np
    >>> a = np.ones((3, 1), "float32"); b = np.ones((1, 2), "float32")
    >>> na, nb = combine_linear([a], [b], [4.0])
    >>> keras.ops.convert_to_numpy(na @ nb)[0]
    array([4., 4.], dtype=float32)
    """
    a_side, b_side = _signed_roots(coefficients)
    a = sum(ops.cast(x, "float32") * c for x, c in zip(a_list, a_side))
    b = sum(ops.cast(x, "float32") * c for x, c in zip(b_list, b_side))
    return a, b


def combine_cat(a_list, b_list, coefficients):
    """Factors stacked along the rank axis (PEFT's `"cat"`): exact.

    `A = [sign(c_1)·sqrt(|c_1|)·A_1, ...]`, `B = [sqrt(|c_1|)·B_1; ...]`, so
    `A·B = Σ c_i·A_i·B_i` exactly, at rank `Σ r_i`.

    Returns:
        `(a, b)` in float32.
    """
    a_side, b_side = _signed_roots(coefficients)
    a = ops.concatenate(
        [ops.cast(x, "float32") * c for x, c in zip(a_list, a_side)], axis=-1
    )
    b = ops.concatenate(
        [ops.cast(x, "float32") * c for x, c in zip(b_list, b_side)], axis=-2
    )
    return a, b


def truncate_product(a, b, rank):
    """The best rank-`rank` approximation of `A·B` (Eckart–Young), as factors.

    Never forms the d×k product: with `A = Q_a·R_a` and `Bᵀ = Q_b·R_b`,
    `A·B = Q_a·(R_a·R_bᵀ)·Q_bᵀ`, so the SVD of the small core
    `R_a·R_bᵀ = U·S·Vᵀ` gives `A·B`'s. The result is `A' = Q_a·U_t·sqrt(S_t)`,
    `B' = sqrt(S_t)·V_tᵀ·Q_bᵀ` with `t = min(rank, min(d, R, k))`.

    Args:
        a: `(..., d, R)`.
        b: `(..., R, k)`.
        rank: the target rank.

    Returns:
        `(a, b)` in float32, of rank `t`.
    """
    a = ops.cast(a, "float32")
    b = ops.cast(b, "float32")
    q_a, r_a = ops.qr(a, mode="reduced")
    q_b, r_b = ops.qr(_swap_last(b), mode="reduced")
    core = ops.matmul(r_a, _swap_last(r_b))
    u, s_vals, vt = ops.svd(core, full_matrices=False, compute_uv=True)
    t = min(int(rank), int(s_vals.shape[-1]))
    root = ops.sqrt(s_vals[..., :t])
    new_a = ops.matmul(q_a, u[..., :, :t]) * ops.expand_dims(root, -2)
    new_b = ops.expand_dims(root, -1) * ops.matmul(vt[..., :t, :], _swap_last(q_b))
    return new_a, new_b


def relative_error(approx, target):
    """`‖approx − target‖_F / ‖target‖_F` over all axes, as a Python float
    (0.0 when both are zero)."""
    approx = ops.cast(approx, "float32")
    target = ops.cast(target, "float32")
    diff = float(ops.convert_to_numpy(ops.sqrt(ops.sum(ops.square(approx - target)))))
    norm = float(ops.convert_to_numpy(ops.sqrt(ops.sum(ops.square(target)))))
    if norm == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / norm


# --- DoRA -------------------------------------------------------------------


def dora_weight_norm(w, a, b, scale):
    """`‖W + s·A·B‖` per output unit (over the input axis), without `W + s·A·B`.

    `‖w_j + s·(AB)_j‖² = ‖w_j‖² + 2s·(WᵀA)_j·B_j + s²·B_jᵀ(AᵀA)B_j`: the
    largest temporaries are `WᵀA` (k×r) and `AᵀA` (r×r), never a d×k matrix
    besides `W` itself. The result carries no gradient: DoRA treats the norm
    as a constant in the backward pass (paper §4.3, as PEFT does).

    Args:
        w: kernel in matrix form `(..., d, k)`.
        a: `(..., d, r)`.
        b: `(..., r, k)`.
        scale: the float `s`.

    Returns:
        float32 tensor `(..., k)`.
    """
    w = ops.stop_gradient(ops.cast(w, "float32"))
    a = ops.stop_gradient(ops.cast(a, "float32"))
    b = ops.stop_gradient(ops.cast(b, "float32"))
    w_sq = ops.sum(ops.square(w), axis=-2)
    wt_a = ops.matmul(_swap_last(w), a)  # (..., k, r)
    cross = ops.sum(ops.multiply(wt_a, _swap_last(b)), axis=-1)
    gram = ops.matmul(_swap_last(a), a)  # (..., r, r)
    quad = ops.sum(ops.multiply(b, ops.matmul(gram, b)), axis=-2)
    total = w_sq + 2.0 * scale * cross + (scale * scale) * quad
    return ops.stop_gradient(ops.sqrt(ops.maximum(total, 0.0)))


def dora_column_norm(w):
    """`‖w_j‖` per output unit of a matrix-form kernel: DoRA's initial `m`."""
    return ops.sqrt(ops.sum(ops.square(ops.cast(w, "float32")), axis=-2))


def dora_combine(base, base_dropped, lowrank, ratio):
    """DoRA's output from its parts, without forming the adapted kernel.

    `y = x·W + (m/‖·‖ − 1)·(x_d·W) + (m/‖·‖)·s·(x_d·A)·B`, where `x_d` is the
    input after adapter dropout (equal to `x` without dropout).

    Args:
        base: `x·W` (pre-bias), plus whatever other adapters already added.
        base_dropped: `x_d·W`; pass `base` when there is no dropout.
        lowrank: `s·(x_d·A)·B`.
        ratio: `m / ‖W + s·A·B‖`, broadcastable to the output.
    """
    base = ops.convert_to_tensor(base)
    ratio = ops.cast(ratio, base.dtype)
    return ops.add(
        ops.add(base, ops.multiply(ops.subtract(ratio, 1.0), base_dropped)),
        ops.multiply(ratio, lowrank),
    )


def dora_merged_kernel(w, delta, magnitude, norm):
    """`(m/‖W + ΔW‖)·(W + ΔW)`, matrix form, float32 math, `W`'s dtype."""
    dtype = w.dtype
    ratio = ops.divide(ops.cast(magnitude, "float32"), norm)
    merged = ops.add(ops.cast(w, "float32"), delta)
    return ops.cast(ops.multiply(merged, ops.expand_dims(ratio, -2)), dtype)


def dora_unmerged_kernel(w, delta, magnitude, norm):
    """The inverse of `dora_merged_kernel`, given the norm stored at merge."""
    dtype = w.dtype
    ratio = ops.divide(norm, ops.cast(magnitude, "float32"))
    restored = ops.multiply(ops.cast(w, "float32"), ops.expand_dims(ratio, -2))
    return ops.cast(ops.subtract(restored, delta), dtype)


# --- Initialisers -------------------------------------------------------------


def initial_factors(init, a_shape, b_shape, fan_in, seed=None):
    """Initial `A` and `B` (float32) for the data-free initialisers.

    Args:
        init: `"default"` (A he-uniform: `U(±sqrt(6/fan_in))`, B zeros) or
            `"gaussian"` (A normal with std `1/r`, B zeros, as PEFT does).
        a_shape: shape of `A` in its stored layout.
        b_shape: shape of `B` in its stored layout.
        fan_in: the number of inputs `d` each output of `A` sums over.
        seed: an int or `keras.random.SeedGenerator`.

    Returns:
        `(a, b)`; `B = 0`, so the adapted layer starts at the base layer.

    Example:

    >>> a, b = initial_factors("default", (6, 2), (2, 3), fan_in=6, seed=0)
    >>> float(keras.ops.max(keras.ops.abs(b)))
    0.0
    """
    rank = a_shape[-1]
    if init == "default":
        limit = math.sqrt(6.0 / fan_in)
        a = keras.random.uniform(
            a_shape, -limit, limit, dtype="float32", seed=seed
        )
    elif init == "gaussian":
        a = keras.random.normal(
            a_shape, stddev=1.0 / rank, dtype="float32", seed=seed
        )
    else:
        raise ValueError(
            f"keras_lowrank: init {init!r} needs the kernel; use "
            "kernel_factors() for 'pissa' and 'olora'."
        )
    return a, ops.zeros(b_shape, "float32")


def pissa_factors(w, rank, scale):
    """PiSSA: the top-r singular triplets of `W` become the adapter.

    `W = U·S·Vᵀ`; `A = U_r·sqrt(S_r/s)`, `B = sqrt(S_r/s)·V_rᵀ`, so that
    `s·A·B` is the best rank-r approximation of `W` and the frozen kernel
    becomes the residual `W − s·A·B`.

    Args:
        w: kernel in matrix form `(..., d, k)`.
        rank: `r`.
        scale: `s`.

    Returns:
        `(a, b, residual)` in float32, matrix form.
    """
    w32 = ops.cast(w, "float32")
    u, s_vals, vt = ops.svd(w32, full_matrices=False, compute_uv=True)
    u_r = u[..., :, :rank]
    s_r = s_vals[..., :rank]
    vt_r = vt[..., :rank, :]
    root = ops.sqrt(s_r / scale)
    a = u_r * ops.expand_dims(root, -2)
    b = ops.expand_dims(root, -1) * vt_r
    residual = w32 - lowrank_delta(a, b, scale)
    return a, b, residual


def olora_factors(w, rank, scale):
    """OLoRA: an orthonormal basis of `W`'s output space becomes `B`.

    With the output-major kernel `Wᵀ = Q·R`: `B = Q[:, :r]ᵀ`, `A = R[:r]ᵀ`,
    then both are divided by `sqrt(s)` so that `s·A·B = Q_r·R_r` (transposed)
    exactly; the frozen kernel becomes `W − s·A·B`.

    Returns:
        `(a, b, residual)` in float32, matrix form.
    """
    w32 = ops.cast(w, "float32")
    q, r_mat = ops.qr(_swap_last(w32), mode="reduced")  # Wᵀ (k×d) = Q·R
    root = math.sqrt(scale)
    b = _swap_last(q[..., :, :rank]) / root  # (r, k)
    a = _swap_last(r_mat[..., :rank, :]) / root  # (d, r)
    residual = w32 - lowrank_delta(a, b, scale)
    return a, b, residual


def kernel_factors(init, w, rank, scale):
    """Data-dependent factors: `"pissa"` or `"olora"`; see those functions."""
    if init == "pissa":
        return pissa_factors(w, rank, scale)
    if init == "olora":
        return olora_factors(w, rank, scale)
    raise ValueError(
        f"keras_lowrank: init {init!r} does not use the kernel; use "
        "initial_factors()."
    )


def _swap_last(x):
    axes = list(range(len(x.shape)))
    axes[-1], axes[-2] = axes[-2], axes[-1]
    return ops.transpose(x, axes)
