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
    # Scale the rank-r intermediate, not the output: the same product, but
    # the elementwise multiply (and its gradient) touches N·r values instead
    # of N·k. Eager backends (torch) do not fuse it away: on MiniLM's FFN
    # (N=1024, k=1536, r=8) it was a separate 11 ms op per call under load.
    h = ops.multiply(ops.cast(h, dtype), ops.cast(scale, dtype))
    return contract_b(h, ops.cast(b, dtype))


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


# --- DoRA -------------------------------------------------------------------


def dora_weight_norm(w, a, b, scale):
    """`‖W + s·A·B‖` per output unit (over the input axis), without `W + s·A·B`.

    `‖w_j + s·(AB)_j‖² = ‖w_j‖² + s·Σ_r B_rj·(2·(AᵀW)_rj + s·(AᵀA·B)_rj)`:
    besides `W` itself the temporaries are `AᵀW` (r×k), `AᵀA` (r×r) and
    `AᵀA·B` (r×k), never a d×k matrix, and `W` is only read (no transposed
    copy). The result carries no gradient: DoRA treats the norm as a
    constant in the backward pass (paper §4.3, as PEFT does).

    Args:
        w: kernel in matrix form `(..., d, k)`.
        a: `(..., d, r)`.
        b: `(..., r, k)`.
        scale: the float `s`.

    Returns:
        float32 tensor `(..., k)`.

    Example:

    >>> import numpy as np
    >>> w = np.array([[3.0], [4.0]], "float32")
    >>> a = np.zeros((2, 1), "float32"); b = np.zeros((1, 1), "float32")
    >>> keras.ops.convert_to_numpy(dora_weight_norm(w, a, b, 1.0))
    array([5.], dtype=float32)
    """
    w = ops.stop_gradient(ops.cast(w, "float32"))
    a = ops.stop_gradient(ops.cast(a, "float32"))
    b = ops.stop_gradient(ops.cast(b, "float32"))
    a_t = _swap_last(a)
    a_t_w = ops.matmul(a_t, w)  # (..., r, k)
    gram_b = ops.matmul(ops.matmul(a_t, a), b)  # (..., r, k)
    inner = ops.add(ops.multiply(a_t_w, 2.0), ops.multiply(gram_b, scale))
    total = ops.add(
        column_sq_norm(w),
        ops.multiply(ops.sum(ops.multiply(b, inner), axis=-2), scale),
    )
    return ops.stop_gradient(ops.sqrt(ops.maximum(total, 0.0)))


# The largest temporary `column_sq_norm` makes on eager backends, in elements
# (4 MiB in float32).
_SQ_NORM_BLOCK = 2**20


def column_sq_norm(w, block_elements=None):
    """`Σ_i w_ij²` per output unit of a matrix-form kernel, in float32,
    with no d×k temporary.

    XLA (JAX) fuses `sum(square(w))` into one pass. Eager PyTorch and
    TensorFlow's `tf.function` materialise `square(w)`, and PyTorch's
    `vector_norm` over a non-last axis takes a slow path (4096×4096 on 2 CPU
    cores: 68 ms, against 3.6 ms for the same reduction in row blocks); so
    there the rows are summed in blocks of at most `block_elements` values.

    Args:
        w: kernel in matrix form `(..., d, k)`, any float dtype.
        block_elements: largest block, in elements (default 2**20).

    Returns:
        float32 tensor `(..., k)`.

    Example:

    >>> import numpy as np
    >>> w = np.array([[3.0, 1.0], [4.0, 0.0]], "float32")
    >>> keras.ops.convert_to_numpy(column_sq_norm(w, block_elements=2))
    array([25.,  1.], dtype=float32)
    """
    w = ops.convert_to_tensor(w)
    d, k = w.shape[-2], w.shape[-1]
    lead = math.prod(w.shape[:-2])
    rows = max(1, (block_elements or _SQ_NORM_BLOCK) // max(1, lead * k))
    if keras.backend.backend() == "jax" or rows >= d:
        return ops.sum(ops.square(ops.cast(w, "float32")), axis=-2)
    total = None
    for start in range(0, d, rows):
        block = ops.cast(w[..., start : start + rows, :], "float32")
        # `multiply`, not `square`: torch's `pow` is 6x slower on CPU.
        part = ops.sum(ops.multiply(block, block), axis=-2)
        total = part if total is None else ops.add(total, part)
    return total


def dora_column_norm(w):
    """`‖w_j‖` per output unit of a matrix-form kernel: DoRA's initial `m`."""
    return ops.sqrt(column_sq_norm(w))


def dora_scaled_b(b, ratio, rank_axis):
    """`B·diag(m/‖·‖)`: DoRA's ratio applied on the rank side of the update.

    `(m/‖·‖)·s·(x·A)·B = s·(x·A)·(B·diag(m/‖·‖))`: scaling the `r×k` factor
    instead of the `n×k` adapter output costs `r·k` multiplies instead of
    `n·k`, and keeps the ratio out of the large products of the backward
    pass (on XLA CPU, scaling the output made a DoRA step up to 1.7× a LoRA
    step; scaling `B` brings it to about 1.07×).

    Args:
        b: factor `B` in its stored layout `(*batch, r, *out)`.
        ratio: `m/‖W0 + s·A·B‖`, shaped `(*batch, *out)`.
        rank_axis: the rank axis of `B` (the number of batch axes).

    Returns:
        float32 tensor shaped like `b`.

    Example:

    >>> import numpy as np
    >>> b = np.ones((2, 3), "float32"); ratio = np.array([1, 2, 3], "float32")
    >>> keras.ops.convert_to_numpy(dora_scaled_b(b, ratio, 0))[1]
    array([1., 2., 3.], dtype=float32)
    """
    ratio = ops.expand_dims(ops.cast(ratio, "float32"), rank_axis)
    return ops.multiply(ops.cast(b, "float32"), ratio)


def dora_combine(base, base_dropped, scaled_lowrank, ratio):
    """DoRA's output from its parts, without forming the adapted kernel.

    `y = x·W + (m/‖·‖ − 1)·(x_d·W) + (m/‖·‖)·s·(x_d·A)·B`, where `x_d` is the
    input after adapter dropout (equal to `x` without dropout). The ratio is
    a constant of the backward pass (the norm carries no gradient), so `m`
    gets `Σ dy·(x_d·W + s·(x_d·A)·B)/‖·‖` and the factors get LoRA's
    gradients scaled by the ratio.

    Args:
        base: `x·W` (pre-bias), plus whatever other adapters already added.
        base_dropped: `x_d·W`; pass `base` itself when there is no dropout
            and no other adapter: the output is then
            `ratio·(x·W) + scaled_lowrank`.
        scaled_lowrank: `(m/‖·‖)·s·(x_d·A)·B`, computed as
            `s·(x_d·A)·dora_scaled_b(B, ...)`.
        ratio: `m / ‖W + s·A·B‖`, broadcastable to the output.

    Example:

    >>> import numpy as np
    >>> y = np.ones((1, 2), "float32"); low = np.zeros((1, 2), "float32")
    >>> keras.ops.convert_to_numpy(dora_combine(y, y, low, np.float32(2.0)))
    array([[2., 2.]], dtype=float32)
    """
    base = ops.convert_to_tensor(base)
    ratio = ops.cast(ratio, base.dtype)
    if base_dropped is base:
        return ops.add(ops.multiply(ratio, base), scaled_lowrank)
    return ops.add(
        ops.add(base, ops.multiply(ratio - 1.0, base_dropped)),
        scaled_lowrank,
    )


def dora_merged_kernel(w, delta, magnitude, norm):
    """`(m/‖W + ΔW‖)·(W + ΔW)`, matrix form, float32 math, `W`'s dtype.

    The kernel of a layer whose only adapter is DoRA, once merged.
    """
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


def dora_merge_delta(w0, delta, magnitude, norm):
    """What merging a DoRA adapter adds to the kernel: `(c − 1)·W0 + c·ΔW`.

    `c = m / ‖W0 + ΔW‖` per output unit and `W0` is the kernel without any
    merged adapter. Every adapter of a layer acts on `W0` side by side (a
    LoRA adapter adds `ΔW`, a DoRA adapter adds this), so adapters merge and
    unmerge in any order and any subset, exactly. With DoRA alone,
    `W0 + dora_merge_delta(...)` is `dora_merged_kernel(W0, ...)`.

    Args:
        w0: the unmerged base kernel in matrix form `(..., d, k)`.
        delta: `s·A·B`, `(..., d, k)`, float32.
        magnitude: `m`, `(..., k)`.
        norm: `‖W0 + ΔW‖`, `(..., k)` (from `dora_weight_norm`).

    Returns:
        float32 `(..., d, k)`.

    Example:

    >>> import numpy as np
    >>> w0 = np.eye(2, dtype="float32"); delta = np.zeros((2, 2), "float32")
    >>> m = np.array([2.0, 1.0], "float32"); n = np.ones(2, "float32")
    >>> keras.ops.convert_to_numpy(dora_merge_delta(w0, delta, m, n))
    array([[1., 0.],
           [0., 0.]], dtype=float32)
    """
    c = ops.expand_dims(ops.divide(ops.cast(magnitude, "float32"), norm), -2)
    return ops.add(
        ops.multiply(c - 1.0, ops.cast(w0, "float32")), ops.multiply(c, delta)
    )


def unmerged_base_kernel(w, merged):
    """`W0`, the kernel without its merged adapters, from the kernel `W`.

    With merged LoRA deltas `ΔW_i` and merged DoRA adapters `j` (ratio
    `c_j = m_j/‖W0 + ΔW_j‖`, the norm stored when merging), the kernel is
    `W = W0·(1 + Σ_j (c_j − 1)) + Σ_i ΔW_i + Σ_j c_j·ΔW_j` column by column,
    hence `W0 = (W − Σ_i ΔW_i − Σ_j c_j·ΔW_j) / (1 + Σ_j (c_j − 1))`.

    Args:
        w: kernel in matrix form `(..., d, k)`.
        merged: list of `(delta, ratio)`, one per merged adapter: `delta` is
            `s·A·B` (float32, `(..., d, k)`), `ratio` is `m/norm` (`(..., k)`)
            for DoRA and `None` for LoRA.

    Returns:
        float32 `(..., d, k)`.

    Example:

    >>> import numpy as np
    >>> w0 = np.eye(2, dtype="float32"); delta = np.ones((2, 2), "float32")
    >>> m = np.array([2.0, 1.0], "float32"); n = np.ones(2, "float32")
    >>> dora = dora_merge_delta(w0, delta, m, n)
    >>> merged = keras.ops.add(w0 + delta, dora)  # a LoRA and a DoRA merged
    >>> back = unmerged_base_kernel(merged, [(delta, None), (delta, m / n)])
    >>> bool(np.allclose(keras.ops.convert_to_numpy(back), w0))
    True
    """
    w = ops.cast(w, "float32")
    rho = None
    for delta, ratio in merged:
        if ratio is None:
            w = ops.subtract(w, delta)
            continue
        c = ops.expand_dims(ops.cast(ratio, "float32"), -2)
        w = ops.subtract(w, ops.multiply(c, delta))
        # rho = 1 + Σ (c_j − 1), started at the first DoRA adapter.
        rho = c if rho is None else ops.add(rho, c - 1.0)
    if rho is None:
        return w
    return ops.divide(w, rho)


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


def pissa_factors(w, rank, scale, niter=None, seed=None):
    """PiSSA: the top-r singular triplets of `W` become the adapter.

    `W = U·S·Vᵀ`; `A = U_r·sqrt(S_r/s)`, `B = sqrt(S_r/s)·V_rᵀ`, so that
    `s·A·B` is the best rank-r approximation of `W` and the frozen kernel
    becomes the residual `W − s·A·B`. This is PEFT's `init_lora_weights=
    "pissa"` in the Keras layout (PEFT's `lora_A` is our `Aᵀ`).

    Args:
        w: kernel in matrix form `(..., d, k)`.
        rank: `r`.
        scale: `s`.
        niter: `None` for the exact SVD, or the number of power iterations of
            a randomised SVD (PEFT's `"pissa_niter_<n>"`; much faster on
            large kernels, approximate top-r subspace).
        seed: an int or `keras.random.SeedGenerator` for the randomised SVD.

    Returns:
        `(a, b, residual)` in float32, matrix form.

    Example:

    >>> import numpy as np
    >>> w = np.diag([3.0, 2.0, 1.0]).astype("float32")
    >>> a, b, res = pissa_factors(w, 1, 1.0)
    >>> np.round(keras.ops.convert_to_numpy(res), 6).tolist()
    [[0.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0]]
    """
    w32 = ops.cast(w, "float32")
    if niter is None:
        u, s_vals, vt = ops.svd(w32, full_matrices=False, compute_uv=True)
    else:
        u, s_vals, vt = randomized_svd(w32, rank, niter, seed=seed)
    u_r = u[..., :, :rank]
    s_r = s_vals[..., :rank]
    vt_r = vt[..., :rank, :]
    root = ops.sqrt(s_r / scale)
    a = u_r * ops.expand_dims(root, -2)
    b = ops.expand_dims(root, -1) * vt_r
    residual = w32 - lowrank_delta(a, b, scale)
    return a, b, residual


def randomized_svd(w, rank, niter=2, seed=None):
    """A rank-`r` SVD of `w` by random projection (Halko et al. 2011).

    The same algorithm as `torch.svd_lowrank(w, q=rank, niter=niter)`, which
    PEFT's `"pissa_niter_<n>"` uses: a Gaussian sketch of the column space,
    `niter` power iterations re-orthonormalised by QR, and an exact SVD of
    the small `r × k` projection. Only `d×r` and `r×k` matrices are formed
    besides `w`.

    Args:
        w: float32 `(..., d, k)`.
        rank: `r`, the number of triplets returned.
        niter: number of power iterations (more: closer to the exact SVD).
        seed: an int or `keras.random.SeedGenerator`.

    Returns:
        `(u, s, vt)` with shapes `(..., d, r)`, `(..., r)`, `(..., r, k)`.

    Example:

    >>> import numpy as np
    >>> w = np.diag([4.0, 2.0, 1.0, 0.5]).astype("float32")
    >>> u, s, vt = randomized_svd(w, 2, niter=4, seed=0)
    >>> np.round(keras.ops.convert_to_numpy(s), 2).tolist()
    [4.0, 2.0]
    """
    w = ops.cast(w, "float32")
    wt = _swap_last(w)
    sketch_shape = tuple(w.shape[:-2]) + (w.shape[-1], rank)
    omega = keras.random.normal(sketch_shape, dtype="float32", seed=seed)
    q, _ = ops.qr(ops.matmul(w, omega), mode="reduced")
    for _ in range(int(niter)):
        z, _ = ops.qr(ops.matmul(wt, q), mode="reduced")
        q, _ = ops.qr(ops.matmul(w, z), mode="reduced")
    u_small, s_vals, vt = ops.svd(
        ops.matmul(_swap_last(q), w), full_matrices=False, compute_uv=True
    )
    return ops.matmul(q, u_small), s_vals, vt


def olora_factors(w, rank, scale):
    """OLoRA: an orthonormal basis of `W`'s output space becomes `B`.

    With the output-major kernel `Wᵀ = Q·R` (PEFT's `weight = Q·R`):
    `B = Q[:, :r]ᵀ` and `A = R[:r]ᵀ`, unscaled as in PEFT's `olora_init`, and
    the frozen kernel becomes `W − s·A·B`.

    Args:
        w: kernel in matrix form `(..., d, k)`.
        rank: `r`.
        scale: `s`.

    Returns:
        `(a, b, residual)` in float32, matrix form.

    Example:

    >>> import numpy as np
    >>> w = np.array([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]], "float32")
    >>> a, b, res = olora_factors(w, 2, 0.5)
    >>> bool(np.allclose(keras.ops.convert_to_numpy(res), 0.5 * w, atol=1e-6))
    True
    """
    w32 = ops.cast(w, "float32")
    q, r_mat = ops.qr(_swap_last(w32), mode="reduced")  # Wᵀ (k×d) = Q·R
    b = _swap_last(q[..., :, :rank])  # (r, k)
    a = _swap_last(r_mat[..., :rank, :])  # (d, r)
    residual = w32 - lowrank_delta(a, b, scale)
    return a, b, residual


def pissa_niter(init):
    """The power-iteration count of `"pissa_niter_<n>"`, else `None`.

    Example:

    >>> pissa_niter("pissa_niter_4"), pissa_niter("pissa")
    (4, None)
    """
    if isinstance(init, str) and init.startswith("pissa_niter_"):
        digits = init[len("pissa_niter_") :]
        if digits.isdigit():
            return int(digits)
    return None


def kernel_factors(init, w, rank, scale, seed=None):
    """Data-dependent factors: `"pissa"`, `"pissa_niter_<n>"` or `"olora"`.

    Args:
        init: the init's name.
        w: kernel in matrix form `(..., d, k)`.
        rank: `r`.
        scale: `s`.
        seed: int or `keras.random.SeedGenerator`, for the randomised SVD.

    Returns:
        `(a, b, residual)`, float32, matrix form; see `pissa_factors` and
        `olora_factors`.

    Example:

    >>> import numpy as np
    >>> w = np.random.default_rng(0).normal(size=(5, 4)).astype("float32")
    >>> a, b, res = kernel_factors("olora", w, 2, 1.0)
    >>> bool(np.allclose(keras.ops.convert_to_numpy(res + a @ b), w, atol=1e-5))
    True
    """
    if init == "pissa":
        return pissa_factors(w, rank, scale)
    if pissa_niter(init) is not None:
        return pissa_factors(w, rank, scale, niter=pissa_niter(init), seed=seed)
    if init == "olora":
        return olora_factors(w, rank, scale)
    raise ValueError(
        f"keras_lowrank: init {init!r} does not use the kernel; use "
        "initial_factors()."
    )


# --- Adapters relative to the original kernel --------------------------------


def original_kernel_factors(a, b, a0, b0):
    """A PiSSA/OLoRA adapter as a plain LoRA of rank 2r on the original kernel.

    PiSSA and OLoRA train on the residual `W_res = W − s·A0·B0` (`A0`, `B0`
    the initial factors). After training, relative to the original `W`:
    `W_res + s·A·B = W + s·(A·B − A0·B0) = W + s·[A, A0]·[B; −B0]`. The
    factors are concatenated along the rank axis, with `−B0` as in PEFT's
    `subtract_mutated_init`, so a file holding them applies to the
    unmodified base model (keep `s` by scaling alpha, see
    `alpha_for_rank`). A DoRA magnitude carries over unchanged, since
    `‖W_res + s·A·B‖ = ‖W + s·A'·B'‖`.

    Args:
        a, b: current factors, matrix form `(..., d, r)` and `(..., r, k)`.
        a0, b0: initial factors, same shapes.

    Returns:
        `(a2, b2)`, float32, shapes `(..., d, 2r)` and `(..., 2r, k)`.

    Example:

    >>> import numpy as np
    >>> a = np.ones((3, 1), "float32"); b = np.ones((1, 2), "float32")
    >>> a2, b2 = original_kernel_factors(a, b, a, b)
    >>> float(keras.ops.max(keras.ops.abs(keras.ops.matmul(a2, b2))))
    0.0
    """
    a2 = ops.concatenate([ops.cast(a, "float32"), ops.cast(a0, "float32")], -1)
    b2 = ops.concatenate(
        [ops.cast(b, "float32"), ops.negative(ops.cast(b0, "float32"))], -2
    )
    return a2, b2


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
