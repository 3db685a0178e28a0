"""Stacked adapters: many adapters of one layer in one pair of tensors, and
the side output when each row of a batch picks its own (the gather that
Punica and S-LoRA serve with).

A stack holds `S` adapters of one layer as `A (S, d, R)` and `B (S, R, k)`
(matrix form, see the package docstring), every adapter padded with zeros to
the largest rank `R` and its scale folded into `B`, so slot `i` stands for
`ΔW_i = A_i·B_i` exactly. Slot 0 is all zeros: the base model.
"""

import keras
import numpy as np
from keras import ops


def stacked_slot(a, b, scale, rank, batch_ndim=0):
    """One adapter's slot of a stack: `A` and `s·B` padded with zeros from
    rank `r` to `rank`, in float32 NumPy (`A·(s·B) = s·A·B` exactly: the
    padded directions contribute zeros).

    Args:
        a: `A`, in the layer's factor layout (rank on the last axis).
        b: `B`, in the layer's factor layout (rank on axis `batch_ndim`).
        scale: the adapter's `s`.
        rank: the stack's rank `R ≥ r`.
        batch_ndim: how many batch axes lead `B` (its rank axis follows).

    Returns:
        `(a, b)` NumPy arrays with rank `rank`.

    Example:

    >>> import numpy as np
    >>> a, b = stacked_slot(np.ones((3, 1)), np.ones((1, 2)), 0.5, 2)
    >>> a.shape, b.shape, float((a @ b)[0, 0])
    ((3, 2), (2, 2), 0.5)
    """
    a = np.asarray(keras.ops.convert_to_numpy(a), np.float32)
    b = np.asarray(keras.ops.convert_to_numpy(b), np.float64) * float(scale)
    pad = int(rank) - a.shape[-1]
    if pad < 0:
        raise ValueError(
            f"keras_lowrank: an adapter of rank {a.shape[-1]} does not fit a "
            f"stack of rank {rank}."
        )
    a = np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, pad)])
    widths = [(0, 0)] * b.ndim
    widths[batch_ndim] = (0, pad)
    return a, np.pad(b, widths).astype(np.float32)


def routed_factors(a_stack, b_stack, slot):
    """The factors of one slot of a stack: `A[slot]`, `B[slot]` (a traced
    integer `slot` works: switching slots changes a value, not a graph).

    Example:

    >>> import numpy as np
    >>> a, b = routed_factors(np.ones((2, 3, 1)), np.ones((2, 1, 4)), 1)
    >>> tuple(a.shape), tuple(b.shape)
    ((3, 1), (1, 4))
    """
    return ops.take(a_stack, slot, axis=0), ops.take(b_stack, slot, axis=0)


def rows_lowrank_contribution(x, a_stack, b_stack, rows, contracted_ndim=1,
                              out_shape=None, dtype=None):
    """`(x_n·A_{rows[n]})·B_{rows[n]}` for every row `n` of `x`: each row of
    the batch through its own adapter, in one batched product.

    Gathers each row's factors (`N×d×R` and `N×R×k` values: the adapters'
    size times the batch, not the kernel's) and runs two batched matmuls; no
    Python loop over adapters or sub-batches, and no `W + ΔW` is formed.

    Args:
        x: `(N, *middle, *contracted)`, rows on the first axis.
        a_stack: `(S, d, R)`, `d` the product of the contracted sizes.
        b_stack: `(S, R, k)`, scales folded in.
        rows: `(N,)` integer slot of each row (0 is the base: zeros).
        contracted_ndim: how many trailing axes of `x` meet `A`.
        out_shape: the trailing output shape (default `(k,)`).
        dtype: the dtype the factors are cast to (default `x.dtype`).

    Returns:
        `(N, *middle, *out_shape)`.

    Example:

    >>> import numpy as np
    >>> a = np.stack([np.zeros((3, 1)), np.ones((3, 1))]).astype("float32")
    >>> b = np.ones((2, 1, 2), "float32")
    >>> x = np.ones((2, 3), "float32")
    >>> out = rows_lowrank_contribution(x, a, b, np.array([1, 0]))
    >>> keras.ops.convert_to_numpy(out).tolist()
    [[3.0, 3.0], [0.0, 0.0]]
    """
    dtype = keras.backend.standardize_dtype(dtype or x.dtype)
    n = ops.shape(x)[0]
    lead = tuple(ops.shape(x)[: len(x.shape) - contracted_ndim])
    d, k = a_stack.shape[1], b_stack.shape[2]
    a_rows = ops.cast(ops.take(a_stack, rows, axis=0), dtype)
    b_rows = ops.cast(ops.take(b_stack, rows, axis=0), dtype)
    h = ops.matmul(ops.reshape(ops.cast(x, dtype), (n, -1, d)), a_rows)
    y = ops.matmul(h, b_rows)
    return ops.reshape(y, lead + tuple(out_shape or (k,)))
