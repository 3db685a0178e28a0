"""DoRA's formulas: the weight norm without `W + s·A·B`, recombination, merging.

Part of `keras_lowrank.adapter_math` (conventions in its docstring).
"""

import math

import keras
from keras import ops

from keras_lowrank.adapter_math.lowrank import _swap_last


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
