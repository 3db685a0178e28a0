"""The spectral arithmetic of a weight update, in NumPy float64.

An update `ΔW` here is a stack of matrices `(*batch, d, k)`: the kernel in
the matrix form its adapter factors use (see `keras_lowrank.layers.layout`).
Each batch entry gets its own rank-r adapter, so "rank r" means the top r
singular values *of every entry*, and energies add up over the entries.

The analysis runs on the host in float64: it is offline work, and the small
singular values that decide "how low is the rank" are exactly the ones
float32 rounding would blur. That is why `product_svd` repeats, in NumPy,
the QR-core trick of `adapter_math.truncate_product` (which stays in
`keras.ops`, on the device, for `combine`).

Example:

>>> import numpy as np
>>> s = singular_values(np.diag([3.0, 4.0, 0.0]))
>>> s.tolist()
[4.0, 3.0, 0.0]
>>> round(energy_at(s, 1), 2), rank_for_energy(s, 0.99)
(0.64, 2)
"""

import numpy as np


def singular_values(matrix):
    """Singular values of `(*batch, d, k)`, descending: `(*batch, min(d, k))`.

    Args:
        matrix: array-like of rank ≥ 2.

    Example:

    >>> singular_values(np.ones((2, 3))).round(3).tolist()
    [2.449, 0.0]
    """
    return np.linalg.svd(np.asarray(matrix, np.float64), compute_uv=False)


def product_svd(a, b):
    """The thin SVD of `A·B` without forming it: `(U, S, Vt)` with
    `A·B = U·diag(S)·Vt`, of width `min(d, R, k)`.

    With `A = Q_a·R_a` and `Bᵀ = Q_b·R_b`, `A·B = Q_a·(R_a·R_bᵀ)·Q_bᵀ`, and
    the SVD of the small `R×R` core gives `A·B`'s: for an adapter of rank
    `R` this costs `O((d + k)·R²)` instead of the `O(d·k·min(d, k))` of an
    SVD of the d×k product.

    Args:
        a: `(*batch, d, R)`.
        b: `(*batch, R, k)`.

    Example:

    >>> a = np.array([[1.0], [2.0]]); b = np.array([[3.0, 0.0, 4.0]])
    >>> u, s, vt = product_svd(a, b)
    >>> bool(np.allclose(u * s[..., None, :] @ vt, a @ b)), s.round(3).tolist()
    (True, [11.18])
    """
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    q_a, r_a = np.linalg.qr(a)
    q_b, r_b = np.linalg.qr(np.swapaxes(b, -1, -2))
    core = r_a @ np.swapaxes(r_b, -1, -2)
    u, s, vt = np.linalg.svd(core, full_matrices=False)
    width = min(a.shape[-2], a.shape[-1], b.shape[-1])
    return (
        (q_a @ u)[..., :width],
        s[..., :width],
        (vt @ np.swapaxes(q_b, -1, -2))[..., :width, :],
    )


def energies(s):
    """Cumulative energy fraction at ranks 1, 2, …: `(min(d, k),)`, summed
    over batch entries (all ones for a zero update)."""
    squares = np.square(np.asarray(s, np.float64)).reshape(-1, np.shape(s)[-1])
    total = squares.sum()
    if total == 0.0:
        return np.ones(squares.shape[-1])
    return np.cumsum(squares.sum(axis=0)) / total


def energy_at(s, rank):
    """Fraction of `‖ΔW‖²_F` the best rank-`rank` approximation keeps
    (Eckart–Young): `Σ_{i≤r} σ_i² / Σ σ_i²`; 1.0 at or above full rank."""
    cumulative = energies(s)
    if rank <= 0:
        return 0.0
    return float(cumulative[min(int(rank), cumulative.shape[0]) - 1])


def rank_for_energy(s, energy):
    """The smallest rank whose approximation keeps at least `energy` of the
    squared Frobenius norm (a relative slack of 1e-12 absorbs rounding)."""
    cumulative = energies(s)
    return int(np.searchsorted(cumulative, energy * (1.0 - 1e-12)) + 1)


def tail_error(s, rank):
    """`‖ΔW − ΔW_r‖_F / ‖ΔW‖_F` for the best rank-`rank` `ΔW_r`: the
    Eckart–Young error, `sqrt(1 − energy_at(s, rank))` (0.0 for a zero
    update)."""
    return float(np.sqrt(max(0.0, 1.0 - energy_at(s, rank))))


def stable_rank(s):
    """`‖ΔW‖²_F / ‖ΔW‖²_2`: how many directions carry the energy, robust to
    tiny singular values (0.0 for a zero update). For a stack, the largest
    singular value of any entry is the denominator."""
    s = np.asarray(s, np.float64)
    top = float(s.max()) if s.size else 0.0
    if top == 0.0:
        return 0.0
    return float(np.square(s).sum() / top**2)


def effective_rank(s):
    """Roy & Vetterli's effective rank: `exp(H(p))` with `p_i = σ_i / Σσ`
    (0.0 for a zero update); equals r for r equal singular values."""
    s = np.asarray(s, np.float64).ravel()
    total = s.sum()
    if total == 0.0:
        return 0.0
    p = s[s > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


def truncate(u, s, vt, rank):
    """Balanced rank-`rank` factors of a thin SVD: `A = U_r·√S_r`,
    `B = √S_r·V_rᵀ`, so `A·B = ΔW_r` and neither factor dominates (what
    training from `B = 0` would not give, but the product is the same).

    Example:

    >>> u, s, vt = np.linalg.svd(np.diag([4.0, 1.0]))
    >>> a, b = truncate(u, s, vt, 1)
    >>> (a @ b).tolist()
    [[4.0, 0.0], [0.0, 0.0]]
    """
    root = np.sqrt(s[..., :rank])
    return u[..., :, :rank] * root[..., None, :], root[..., :, None] * vt[..., :rank, :]
