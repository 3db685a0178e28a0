"""`AdapterMethods`: the public adapter methods of every adapter layer.

Each is a thin delegation to the layer's `AdapterSet` (`layer._lowrank`),
which holds the state and does the work; `LowRankLayer` (see `base`)
inherits them and keeps the Keras hooks. Kept apart so that each module has
one job: this one is the layer's adapter API and its documentation.
"""

from keras_lowrank.layers import merging
from keras_lowrank.layers import quantized
from keras_lowrank.spec import where


class AdapterMethods:
    """The adapter methods of `LowRankLayer`s (not used on its own).

    Example:

    >>> from keras_lowrank import LowRankDense
    >>> layer = LowRankDense(4, rank=2)
    >>> layer.build((None, 3))
    >>> layer.adapter_names, layer.active_adapters, layer.merged_adapters
    (['default'], ['default'], [])
    """

    @property
    def adapter_names(self):
        """Names of all adapters on this layer, in creation order."""
        return self._lowrank.names

    @property
    def active_adapters(self):
        """Names of the adapters whose contribution `call` adds (or which
        are merged into the kernel)."""
        return list(self._lowrank.active)

    @property
    def merged_adapters(self):
        """Names of the adapters currently folded into the kernel."""
        return list(self._lowrank.merged)

    @property
    def lowrank_layout(self):
        """The `KernelLayout` of this layer's kernel."""
        return self._layout()

    def adapter_spec(self, name):
        """The `AdapterSpec` of adapter `name`."""
        return self._lowrank.spec(name)

    def adapter_variables(self, name):
        """`{"A": ..., "B": ...}`, plus `"magnitude"`, `"norm"` for DoRA and
        `"A0"`, `"B0"` (the initial factors) for PiSSA/OLoRA."""
        return self._lowrank.variables(self._lowrank.known(name))

    def add_adapter(self, name, spec, seed=None, restore=False):
        """Adds adapter `name` with options `spec` (an `AdapterSpec`).

        Args:
            name: the adapter's name (letters, digits, `_`, `-`).
            spec: an `AdapterSpec`.
            seed: optional int seed (in `[0, 2**32)`) for the initial factors.
            restore: create the variables without initialising them (their
                values are about to be loaded from a file); PiSSA/OLoRA then
                leave the kernel untouched.

        The new adapter is active alone unless other adapters are active, in
        which case it is added to the active set.

        Example:

        >>> from keras_lowrank import LowRankDense, AdapterSpec
        >>> layer = LowRankDense(4, adapter=AdapterSpec(rank=2))
        >>> layer.build((None, 3))
        >>> layer.add_adapter("second", AdapterSpec(rank=1))
        >>> layer.adapter_names
        ['default', 'second']
        """
        self._lowrank.add(name, spec, seed=seed, restore=restore)

    def delete_adapter(self, name):
        """Removes adapter `name` and its variables (unmerging it first).

        A PiSSA/OLoRA adapter gives back what its init took from the kernel
        (`W_res + s·A0·B0 = W`), so the layer returns to its original kernel.
        """
        self._lowrank.delete(name)

    def forget_adapter(self, name):
        """Removes adapter `name` and its variables and leaves the kernel as
        it is (so a merged adapter stays in the kernel: what `unload` wants).
        """
        self._lowrank.forget(name)

    def set_active_adapters(self, names):
        """Makes exactly `names` (a list, possibly empty) active.

        Merged adapters must stay active: unmerge before deactivating them.
        """
        self._lowrank.set_active(names)

    def restore_state(self, active, merged):
        """Sets the active and merged adapters as saved, without touching the
        kernel (a loaded kernel already holds the merged adapters)."""
        self._lowrank.restore_state(active, merged)

    def delta(self, name):
        """`ΔW` of adapter `name` in the kernel's own layout (float32).

        For LoRA this is `s·A·B`; for DoRA it is what merging adds,
        `(c − 1)·W0 + c·s·A·B` with `c = m/‖W0 + s·A·B‖`, `W0` being the
        kernel without merged adapters. Merging adapter `name` adds exactly
        this to the kernel.
        """
        return self._lowrank.delta(name)

    def merge(self, names=None):
        """Folds adapters (default: every active, unmerged one) into the
        kernel. Merging an adapter twice does nothing the second time.

        Exact for any subset in any order (see `merging`). A DoRA adapter
        keeps the norm it used in its `norm` variable while merged, which is
        what `unmerge` needs to take it out again.

        A bfloat16 or float16 kernel cannot hold `W0 + ΔW` exactly, so
        subtracting `ΔW` again would change the base kernel for good. While
        anything is merged into such a kernel the layer keeps the exact
        unmerged kernel in a non-trainable variable, `lowrank_unmerged_kernel`
        (saved in `.keras` files while merged), and a full `unmerge` puts it
        back bit for bit. float32/float64 kernels keep no copy.

        A quantized kernel is refused: merging into it would be lossy and
        could not be undone. `dequantize()` it first.
        """
        self._lowrank.merge(names)

    def unmerge(self, names=None):
        """Takes merged adapters (default: all) back out of the kernel, in
        the reverse order of merging; bit for bit on a bfloat16/float16
        kernel once nothing is merged any more (see `merge`)."""
        self._lowrank.unmerge(names)

    def check_mergeable(self):
        """Raises if the kernel is quantized (see `merge`)."""
        if self.quantization_mode is None:
            return
        raise ValueError(
            f"{where(self.path)}: the kernel is quantized "
            f"({self.quantization_mode!r}); merging adapters into it would be "
            "lossy and could not be undone. Use "
            "keras_lowrank.merge(model, quantized='dequantize') (float kernel,"
            " exact) or keras_lowrank.unload(model, quantized='requantize') "
            "(merged, then quantized again; the error is reported)."
        )

    def dequantize(self):
        """Turns a quantized kernel into the float kernel it stands for, in
        place (the layer stops being quantized; merging is then exact).

        Returns:
            `(mode, config)` to quantize the layer the same way again, or
            `(None, None)` if it was not quantized.
        """
        return quantized.dequantize(self)

    def adapter_for_original_kernel(self, name):
        """Adapter `name` as options and values that apply to the original
        kernel: what an adapter file should hold.

        For LoRA and DoRA with data-free inits this is the adapter itself.
        PiSSA/OLoRA train on the residual kernel `W_res = W − s·A0·B0`; their
        equivalent on the original `W` is the plain adapter of rank 2r with
        `A' = [A, A0]`, `B' = [B; −B0]` and alpha scaled to keep `s` (see
        `adapter_math.original_kernel_factors`); a DoRA magnitude carries
        over unchanged. If `2r` exceeds `min(d, k)` the factors are
        recompressed to rank `min(d, k)`, which is exact.

        Args:
            name: the adapter's name.

        Returns:
            `(spec, values)`: an `AdapterSpec` with a data-free init and a
            dict of float32 tensors in the stored layouts (`"A"`, `"B"`,
            plus `"magnitude"` for DoRA).

        Example:

        >>> from keras_lowrank import LowRankDense
        >>> layer = LowRankDense(6, rank=2, init="pissa")
        >>> layer.build((None, 5))
        >>> spec, values = layer.adapter_for_original_kernel("default")
        >>> spec.rank, spec.init, tuple(values["A"].shape)
        (4, 'default', (5, 4))
        """
        return merging.for_original_kernel(self._lowrank, self._lowrank.known(name))
