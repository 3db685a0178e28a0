"""The LoRA formulas: scaling, the low-rank side output, `ΔW`, merging, combining.

Part of `keras_lowrank.adapter_math` (conventions in its docstring).
"""

import math
import numbers

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
    h = ops.cast(contract_a(x, ops.cast(a, dtype)), dtype)
    # Scale the rank-r intermediate, not the output: the same product, but
    # the elementwise multiply (and its gradient) touches N·r values instead
    # of N·k. Eager backends (torch) do not fuse it away: on MiniLM's FFN
    # (N=1024, k=1536, r=8) it was a separate 11 ms op per call under load.
    # `s = 1` (alpha = rank, the default) needs no multiply at all: one op
    # less forward and backward per layer and call.
    if not _is_one(scale):
        h = ops.multiply(h, ops.cast(scale, dtype))
    return contract_b(h, ops.cast(b, dtype))


def _is_one(scale):
    return isinstance(scale, numbers.Real) and scale == 1.0


def flat_matmul(x, w, contracted_ndim=1, out_shape=None):
    """`x` contracted over its last `contracted_ndim` axes with the matrix
    `w` (`d×n`), as a single 2-D matmul over the flattened leading axes.

    Same result as `einsum`/batched `matmul`, but the backward pass stays two
    plain 2-D products. A rank-3 `(batch, seq, d)·(d, r)` product makes XLA
    on CPU transpose the `(batch·seq)×k` output gradient before computing
    `dB` (and `dA`): measured on one MiniLM FFN layer (JAX, CPU), 2 extra
    transposes and 87 MB accessed instead of 68 MB; on the whole MiniLM with
    every linear layer adapted at r=8, 1.54x the floor's step instead of
    1.22x.

    Args:
        x: `(*lead, *contracted)`.
        w: `(d, n)` with `d` the product of the contracted sizes.
        contracted_ndim: how many trailing axes of `x` are contracted.
        out_shape: the trailing output shape (default `(n,)`).

    Returns:
        `(*lead, *out_shape)`.
    """
    lead = tuple(ops.shape(x)[: len(x.shape) - contracted_ndim])
    y = ops.matmul(ops.reshape(x, (-1, w.shape[0])), w)
    return ops.reshape(y, lead + tuple(out_shape or (w.shape[1],)))


def shared_projections(x, factors, scales, dtype, contracted_ndim=1):
    """`[x·(s₁·A₁), x·(s₂·A₂), …]` from one product `x·[s₁A₁|s₂A₂|…]`: the
    rank-r intermediates of adapters that read the same input.

    One `N×d×Σr` product costs about what one `N×d×r` product does on a
    CPU, forward and backward (see `layers.shared_input`). Each scale is
    folded into its `d×r` factor (in the factor's float32, before the cast
    to `dtype`), not into the `N×r` intermediate; `s = 1` skips it.

    Args:
        x: `(*lead, *contracted)`, the input all the factors read.
        factors: `A` factors, each `(d, r_i)` with `d` the product of the
            contracted sizes.
        scales: the float `s_i` of each factor.
        dtype: the compute dtype the factors are cast to.
        contracted_ndim: how many trailing axes of `x` are contracted.

    Returns:
        A list of `(*lead, r_i)` tensors, one per factor.

    Example:

    >>> import numpy as np
    >>> x = np.ones((2, 3), "float32")
    >>> parts = shared_projections(
    ...     x, [np.ones((3, 1), "float32"), np.ones((3, 2), "float32")],
    ...     [2.0, 1.0], "float32")
    >>> [keras.ops.convert_to_numpy(p)[0].tolist() for p in parts]
    [[6.0], [3.0, 3.0]]
    """
    columns = []
    for a, scale in zip(factors, scales):
        if not _is_one(scale):
            a = ops.multiply(a, scale)
        columns.append(ops.cast(a, dtype))
    h = flat_matmul(x, ops.concatenate(columns, axis=-1), contracted_ndim)
    sizes = [c.shape[-1] for c in columns]
    cuts = [sum(sizes[: i + 1]) for i in range(len(sizes) - 1)]
    return list(ops.split(h, cuts, axis=-1))


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
    if _is_one(scale):
        return ops.matmul(a, b)
    # The scale goes on the smaller factor, not on the `d×k` product: one
    # kernel-sized pass less per merge and per folded inference call.
    if math.prod(a.shape) <= math.prod(b.shape):
        return ops.matmul(ops.multiply(a, scale), b)
    return ops.matmul(a, ops.multiply(b, scale))


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

    Exact (to float rounding) whenever `A·B` has rank at most `rank`: it also
    re-expresses a product stored at a needlessly high rank.

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


def alpha_for_rank(alpha, rank, new_rank, scaling="standard"):
    """The alpha that keeps `s` unchanged when the rank becomes `new_rank`.

    `"standard"`: `alpha·new_rank/rank`; `"rslora"`:
    `alpha·sqrt(new_rank/rank)` (PEFT doubles alpha, or multiplies it by
    `sqrt(2)`, when it saves PiSSA/OLoRA as a rank-2r LoRA).

    Example:

    >>> alpha_for_rank(16, 8, 16)
    32.0
    >>> round(alpha_for_rank(16, 8, 16, "rslora") / math.sqrt(16), 6)
    5.656854
    """
    if scaling == "rslora":
        return float(alpha) * math.sqrt(new_rank / rank)
    scaling_factor(alpha, rank, scaling)  # validates `scaling`
    return float(alpha) * new_rank / rank


def _swap_last(x):
    axes = list(range(len(x.shape)))
    axes[-1], axes[-2] = axes[-2], axes[-1]
    return ops.transpose(x, axes)
