"""`KernelLayout`: how a layer's kernel splits into batch, input and output axes.

The adapter math works on matrices `(..., d, k)`. A Dense kernel already is
one; an EinsumDense kernel such as `(384, 12, 32)` has one input axis and two
output axes; a Conv2D kernel `(3, 3, 16, 32)` has three input axes (the window
and the input channels). The layout records which is which, so that factors
get their natural shapes (`A`: `(*batch, *in, r)`, `B`: `(*batch, r, *out)`)
and every kernel-level operation goes through `to_matrix`/`from_matrix`.
"""

import math

from keras import ops


class KernelLayout:
    """Which kernel axes are batch, input (contracted) and output axes.

    Args:
        kernel_shape: the kernel's shape.
        batch_axes: kernel axes shared by input, kernel and output.
        in_axes: kernel axes summed over with the input.
        out_axes: kernel axes that reach the output.

    Example:

    >>> layout = KernelLayout((384, 12, 32), (), (0,), (1, 2))
    >>> layout.a_shape(4), layout.b_shape(4)
    ((384, 4), (4, 12, 32))
    """

    def __init__(self, kernel_shape, batch_axes, in_axes, out_axes):
        self.kernel_shape = tuple(int(n) for n in kernel_shape)
        self.batch_axes = tuple(batch_axes)
        self.in_axes = tuple(in_axes)
        self.out_axes = tuple(out_axes)
        if sorted(self.batch_axes + self.in_axes + self.out_axes) != list(
            range(len(self.kernel_shape))
        ):
            raise ValueError(
                "keras_lowrank: every kernel axis must be exactly one of "
                f"batch/in/out; got kernel shape {self.kernel_shape} with "
                f"batch={self.batch_axes}, in={self.in_axes}, "
                f"out={self.out_axes}."
            )
        self.perm = self.batch_axes + self.in_axes + self.out_axes
        self.batch_shape = self._dims(self.batch_axes)
        self.in_shape = self._dims(self.in_axes)
        self.out_shape = self._dims(self.out_axes)
        self.d = math.prod(self.in_shape)
        self.k = math.prod(self.out_shape)

    def _dims(self, axes):
        return tuple(self.kernel_shape[i] for i in axes)

    @property
    def max_rank(self):
        """The largest rank a factorisation of this kernel can have."""
        return min(self.d, self.k)

    def check_rank(self, rank, path=None, fix=""):
        """Raises unless `1 <= rank <= min(d, k)`: the one rank rule.

        Args:
            rank: the adapter's rank (a positive int, checked by the spec).
            path: the layer, for the message.
            fix: more advice appended to the message (", or a rank_pattern
                for this layer").

        Example:

        >>> KernelLayout((5, 6), (), (0,), (1,)).check_rank(6, "dense")
        Traceback (most recent call last):
        ...
        ValueError: keras_lowrank: layer 'dense': rank 6 is larger than min(d, k) = min(5, 6) = 5 for this kernel (5, 6), so it is not low-rank. Use a rank of at most 5.
        """
        from keras_lowrank.spec import where

        if rank > self.max_rank:
            raise ValueError(
                f"{where(path)}: rank {rank} is larger than min(d, k) = "
                f"min({self.d}, {self.k}) = {self.max_rank} for this kernel "
                f"{self.kernel_shape}, so it is not low-rank. Use a rank of "
                f"at most {self.max_rank}{fix}."
            )

    @property
    def unit_shape(self):
        """One entry per output unit: the shape of DoRA's magnitude."""
        return self.batch_shape + self.out_shape

    def a_shape(self, rank):
        return self.batch_shape + self.in_shape + (rank,)

    def b_shape(self, rank):
        return self.batch_shape + (rank,) + self.out_shape

    def to_matrix(self, kernel):
        """Kernel → `(*batch, d, k)`."""
        x = kernel
        if self.perm != tuple(range(len(self.perm))):
            x = ops.transpose(x, self.perm)
        return ops.reshape(x, self.batch_shape + (self.d, self.k))

    def from_matrix(self, matrix):
        """`(*batch, d, k)` → kernel layout."""
        x = ops.reshape(matrix, self.batch_shape + self.in_shape + self.out_shape)
        if self.perm != tuple(range(len(self.perm))):
            inverse = [0] * len(self.perm)
            for position, axis in enumerate(self.perm):
                inverse[axis] = position
            x = ops.transpose(x, inverse)
        return x

    def a_to_matrix(self, a):
        return ops.reshape(a, self.batch_shape + (self.d, a.shape[-1]))

    def b_to_matrix(self, b):
        rank = b.shape[len(self.batch_shape)]
        return ops.reshape(b, self.batch_shape + (rank, self.k))

    def a_from_matrix(self, a):
        return ops.reshape(a, self.a_shape(a.shape[-1]))

    def b_from_matrix(self, b):
        return ops.reshape(b, self.b_shape(b.shape[-2]))

    def units_from_matrix(self, units):
        """`(*batch, k)` → `unit_shape`."""
        return ops.reshape(units, self.unit_shape)

    def units_to_matrix(self, units):
        return ops.reshape(units, self.batch_shape + (self.k,))
