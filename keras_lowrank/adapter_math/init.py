"""The initialisers (default/gaussian, PiSSA, OLoRA) and adapters expressed
relative to the original kernel.

Part of `keras_lowrank.adapter_math` (conventions in its docstring).
"""

import math

import keras
from keras import ops

from keras_lowrank.adapter_math.lowrank import _swap_last
from keras_lowrank.adapter_math.lowrank import lowrank_delta


# --- Initialisers -------------------------------------------------------------


def token_row_factors(token_ids, vocab, width):
    """`A` (`vocab×n`, one-hot: `A[ids[i], i] = 1`) and `B = 0` (`n×width`)
    of a token-rows adapter, so that `ΔW = A·B` is `B`'s rows placed at
    `token_ids` and zero elsewhere: `W[ids] += B`, exactly (every product is
    with 1 or 0).

    Example:

    >>> a, b = token_row_factors([2, 0], vocab=3, width=4)
    >>> keras.ops.convert_to_numpy(a).tolist()
    [[0.0, 1.0], [0.0, 0.0], [1.0, 0.0]]
    """
    n = len(token_ids)
    a = ops.transpose(ops.one_hot(ops.array(list(token_ids), "int32"), vocab))
    return ops.cast(a, "float32"), ops.zeros((n, width), "float32")



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
