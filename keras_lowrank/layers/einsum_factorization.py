"""A true rank-r factorisation of an `EinsumDense` kernel, from its equation.

For `x ⊗ W -> y` written as `"<input>,<kernel>-><output>"`, each kernel axis
is one of:

- an *input* axis: in the input, not in the output (contracted: the `d` side),
- an *output* axis: in the output, not in the input (the `k` side),
- a *batch* axis: in input, kernel and output alike (each entry gets its own
  rank-r update).

`A` has shape `(*batch, *in, r)` and `B` has shape `(*batch, r, *out)`, so
`ΔW = A·B` has rank r between the kernel's input side and its output side:
for a 384 → 12 heads × 32 projection at r=4, 4·(384 + 384) = 3,072 parameters
(Keras's built-in EinsumDense LoRA uses `kernel.shape[:-1] + (r,)`, 18,560).
The adapter path is two einsums, `x·A` then `(x·A)·B`.
"""

import dataclasses
import functools
import string

from keras_lowrank.layers.layout import KernelLayout


@dataclasses.dataclass(frozen=True)
class EinsumFactorization:
    """The two factor equations of an EinsumDense equation.

    Attributes:
        equation: the layer's equation.
        a_equation: `"<input>,<A>-><mid>"`, the input meeting `A`.
        b_equation: `"<mid>,<B>-><output>"`, the intermediate meeting `B`.
        delta_equation: `"<A>,<B>-><kernel>"`, `ΔW` in the kernel layout.
        batch_axes, in_axes, out_axes: kernel axis indices of each kind.
        unit_spec: letters of DoRA's per-output-unit tensor (batch + out).
        output_spec: letters of the output (may contain `...`).
    """

    equation: str
    a_equation: str
    b_equation: str
    delta_equation: str
    batch_axes: tuple
    in_axes: tuple
    out_axes: tuple
    unit_spec: str
    output_spec: str

    def layout(self, kernel_shape):
        return KernelLayout(
            kernel_shape, self.batch_axes, self.in_axes, self.out_axes
        )


def factorize(equation, path=None):
    """Derives `A`'s and `B`'s equations from an EinsumDense equation.

    The parse is cached per equation (layers call this in every forward
    pass); errors are raised afresh with the caller's `path`.

    Args:
        equation: e.g. `"abc,cde->abde"`.
        path: the layer path, for error messages.

    Returns:
        An `EinsumFactorization`.

    Example:

    >>> f = factorize("abc,cde->abde")
    >>> f.a_equation, f.b_equation
    ('abc,cr->abr', 'abr,rde->abde')
    """
    try:
        return _factorize_cached(equation)
    except ValueError as error:
        at = f"keras_lowrank: layer '{path}'" if path else "keras_lowrank"
        raise ValueError(str(error).replace("keras_lowrank", at, 1)) from None


@functools.lru_cache(maxsize=None)
def _factorize_cached(equation):
    at = "keras_lowrank"
    try:
        inputs, rest = equation.replace(" ", "").split(",")
        kernel, output = rest.split("->")
    except ValueError:
        raise ValueError(
            f"{at}: cannot read the einsum equation {equation!r}; expected "
            "'<input>,<kernel>-><output>', such as 'abc,cd->abd'. Exclude "
            "this layer, or give it a valid equation."
        ) from None
    if "..." in kernel:
        raise ValueError(
            f"{at}: the kernel spec of {equation!r} has '...'; adapters need "
            "every kernel axis named. Exclude this layer."
        )
    repeated = sorted({c for c in kernel if kernel.count(c) > 1})
    if repeated:
        raise ValueError(
            f"{at}: kernel axis {repeated[0]!r} appears twice in "
            f"{equation!r}, so the kernel is not a plain input x output map. "
            "Exclude this layer."
        )
    in_letters = inputs.replace("...", "")
    out_letters = output.replace("...", "")
    batch, contracted, free = [], [], []
    for axis, letter in enumerate(kernel):
        in_input, in_output = letter in in_letters, letter in out_letters
        if in_input and in_output:
            batch.append(axis)
        elif in_input:
            contracted.append(axis)
        elif in_output:
            free.append(axis)
        else:
            raise ValueError(
                f"{at}: kernel axis {letter!r} of {equation!r} is summed "
                "within the kernel alone; this kernel has no input/output "
                "factorisation. Exclude this layer."
            )
    if not contracted or not free:
        raise ValueError(
            f"{at}: the equation {equation!r} has no "
            + ("contracted" if not contracted else "output")
            + " kernel axis, so the kernel has no low-rank update. Exclude "
            "this layer."
        )
    used = set(equation)
    rank_letter = next(c for c in "r" + string.ascii_letters if c not in used)
    pick = lambda axes: "".join(kernel[i] for i in axes)  # noqa: E731
    batch_s, in_s, out_s = pick(batch), pick(contracted), pick(free)
    a_spec = batch_s + in_s + rank_letter
    b_spec = batch_s + rank_letter + out_s
    mid = "".join(c for c in inputs if c not in in_s) + rank_letter
    # Keep "..." intact when removing letters (it contains no letters).
    return EinsumFactorization(
        equation=equation,
        a_equation=f"{inputs},{a_spec}->{mid}",
        b_equation=f"{mid},{b_spec}->{output}",
        delta_equation=f"{a_spec},{b_spec}->{kernel}",
        batch_axes=tuple(batch),
        in_axes=tuple(contracted),
        out_axes=tuple(free),
        unit_spec=batch_s + out_s,
        output_spec=output,
    )


def units_broadcast(factorization, ndim):
    """How to lay a per-output-unit tensor over an output of rank `ndim`.

    Returns:
        `(perm, shape_fn)`: transpose the unit tensor by `perm`, then reshape
        it to `shape_fn(unit_shape)` to broadcast against the output.
    """
    spec = factorization.output_spec
    if "..." in spec:
        head, tail = spec.split("...")
        spec = head + "." * (ndim - len(head) - len(tail)) + tail
    units = factorization.unit_spec
    ordered = [c for c in spec if c in units]
    perm = tuple(units.index(c) for c in ordered)

    def shape_fn(unit_shape):
        sizes = dict(zip(units, unit_shape))
        return tuple(sizes.get(c, 1) if c in units else 1 for c in spec)

    return perm, shape_fn
