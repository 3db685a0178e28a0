"""`LowRankLayer`: the per-layer adapter state shared by all adapter layers.

A `LowRankDense` *is* a `keras.layers.Dense` (likewise for EinsumDense,
Embedding and Conv), with named adapters added. A layer gets there in one of
two ways:

- standalone: `LowRankDense(64, rank=8)` creates a frozen kernel and the
  factors in `build`;
- in place: `LowRankDense.from_layer(dense, rank=8)` (what `adapt()` uses)
  turns an existing, built `Dense` into a `LowRankDense` by changing its class
  and adding the factors. The kernel variable is the same object before and
  after: nothing is copied, and the parent model, which may be subclassed or a
  KerasHub model whose sublayers cannot be swapped, keeps working.

Each adapter has a name, an `AdapterSpec` and its variables (`A`, `B`, for
DoRA the magnitude `m` and the norm kept while merged, for PiSSA/OLoRA the
initial factors `A0`, `B0`). A layer can hold several; the active ones add
up; merged ones live inside the kernel.

Several adapters act on the same base kernel `W0` (the kernel with nothing
merged) side by side: a LoRA adapter adds `s·A·B`, a DoRA adapter adds
`(c − 1)·W0 + c·s·A·B` with `c = m/‖W0 + s·A·B‖`. Merging any subset, in any
order, therefore leaves the output unchanged. (PEFT scales the outputs of the
adapters before a DoRA adapter too when there is no dropout, and not when
there is; with a single adapter, the only case PEFT files hold, both agree.)

DoRA and mixed precision: inside `call` Keras hands layers their kernel in
the compute dtype, so the norm `‖W0 + s·A·B‖` is always taken of the kernel
rounded to the compute dtype (then in float32), in `call`, at creation (the
initial `m`) and when merging alike. The adapter's own variables are float32
and never autocast. So `m/‖·‖` is exactly 1 right after creation and the
initial output equals the base output under every dtype policy.

Subclasses describe only their own geometry (see the "geometry" methods at the
end); every formula comes from `keras_lowrank.adapter_math`.
"""

import contextlib
import inspect
import math

import keras
from keras import ops

from keras_lowrank import adapter_math
from keras_lowrank.layers import quantized
from keras_lowrank.layers import sharding
from keras_lowrank.spec import AdapterSpec
from keras_lowrank.spec import check_adapter_name
from keras_lowrank.spec import where

SUPPORTED_DTYPES = ("float16", "bfloat16", "float32", "float64")

# The variables an adapter may own, by key: the factors, DoRA's magnitude and
# the norm it keeps while merged, and the initial factors of PiSSA/OLoRA.
ADAPTER_KEYS = ("A", "B", "magnitude", "norm", "A0", "B0")
TRAINABLE_KEYS = ("A", "B", "magnitude")


class _AdapterState:
    """Plain Python state of one layer's adapters (deliberately not tracked by
    Keras: the variables themselves are tracked as layer attributes)."""

    def __init__(self, original_class):
        self.original_class = original_class
        self.specs = {}  # name -> AdapterSpec
        self.active = []  # names whose contribution is added in `call`
        self.merged = []  # names currently folded into the kernel
        self.seed = None  # SeedGenerator for adapter dropout, made on demand
        self.replay = {}  # name -> dropout seed drawn outside a remat call


class LowRankLayer:
    """Mixin holding named low-rank adapters on a kernel layer.

    Not used directly: use `LowRankDense`, `LowRankEinsumDense`,
    `LowRankEmbedding` or `LowRankConv1D/2D/3D`.
    """

    # The plain Keras class each adapter class extends; set by subclasses.
    base_class = None

    # --- construction -----------------------------------------------------

    def _init_adapters(
        self,
        rank,
        alpha,
        scaling,
        dropout,
        method,
        init,
        bias,
        adapter_name,
        adapters,
        active_adapters,
        merged_adapters,
    ):
        """Records the adapters a standalone layer creates in `build`.

        Everything that can be checked before the kernel exists is checked
        here, so a bad option fails at construction, naming the layer.
        """
        path = _path_of(self)
        self._lowrank = _AdapterState(self.base_class)
        # Adapters given as a dict come from a config: their values are about
        # to be loaded, so kernel inits (an SVD or QR per layer) are skipped.
        self._lowrank_from_config = adapters is not None
        if adapters is None:
            spec = AdapterSpec.checked(
                path,
                rank=rank,
                alpha=alpha,
                scaling=scaling,
                dropout=dropout,
                method=method,
                init=init,
                bias=bias,
            )
            adapters = {check_adapter_name(adapter_name, path): spec}
        self._lowrank_pending = {
            check_adapter_name(name, path): (
                spec
                if isinstance(spec, AdapterSpec)
                else AdapterSpec.from_config(spec, path)
            )
            for name, spec in adapters.items()
        }
        self._check_options(self, path)
        for spec in self._lowrank_pending.values():
            spec.validate(path)
            self.check_spec(spec, path)
        self._lowrank_pending_active = (
            list(active_adapters)
            if active_adapters is not None
            else list(self._lowrank_pending)
        )
        self._lowrank_pending_merged = list(merged_adapters or [])
        quantized.install_layer_hook(self)

    def _build_adapters(self):
        """Creates the recorded adapters; called at the end of `build`.

        A layer rebuilt from a config (a `.keras` file) gets its adapters in
        their saved state: merged ones are marked merged without touching the
        kernel, because the saved kernel already holds them.
        """
        pending = getattr(self, "_lowrank_pending", None) or {}
        merged = self._lowrank_pending_merged
        from_config = getattr(self, "_lowrank_from_config", False)
        for name, spec in pending.items():
            skip = name in merged or (from_config and spec.rewrites_kernel)
            self.add_adapter(name, spec, restore=skip)
            if skip and name not in merged and spec.method == "dora":
                # Neutral until the saved values arrive: A = B = 0, m = ‖W‖.
                self._set_initial_magnitude(name, spec)
        self._lowrank.active = [
            n for n in self._lowrank_pending_active if n in pending
        ]
        self._lowrank.merged = [n for n in merged if n in pending]
        self._lowrank_pending = {}
        self._refresh_trainable()

    @classmethod
    def from_layer(
        cls,
        layer,
        rank=8,
        alpha=None,
        scaling="standard",
        dropout=0.0,
        method="lora",
        init="default",
        bias="none",
        adapter_name="default",
        seed=None,
    ):
        """Turns a built `base_class` layer into this class, in place.

        The layer keeps its identity, kernel variable, bias, activation, dtype
        policy and name; an adapter named `adapter_name` is added and the
        kernel is frozen. The same object is returned.

        Args:
            layer: a built instance of exactly `cls.base_class`.
            rank, alpha, scaling, dropout, method, init, bias: the adapter's
                options (see `AdapterSpec`).
            adapter_name: the adapter's name.
            seed: optional int seed for the factors' initialisation.

        Returns:
            `layer`, now an instance of `cls`.

        Example:

        >>> dense = keras.layers.Dense(16)
        >>> dense.build((None, 8))
        >>> from keras_lowrank import LowRankDense
        >>> adapted = LowRankDense.from_layer(dense, rank=2)
        >>> adapted is dense, type(dense).__name__
        (True, 'LowRankDense')
        """
        path = _path_of(layer)
        spec = AdapterSpec.checked(
            path,
            rank=rank,
            alpha=alpha,
            scaling=scaling,
            dropout=dropout,
            method=method,
            init=init,
            bias=bias,
        )
        cls.check_convertible(layer)
        was_plain = not isinstance(layer, LowRankLayer)
        cls.become(layer)
        try:
            layer.add_adapter(adapter_name, spec, seed=seed)
        except Exception:
            # Leave a layer that was plain exactly as it was; a layer that
            # already had adapters keeps them.
            if was_plain:
                cls.revert(layer)
            raise
        return layer

    @classmethod
    def check_convertible(cls, layer, path=None):
        """Raises unless `layer` can become an instance of `cls` in place.

        Args:
            layer: the candidate layer.
            path: how to name the layer in errors (default: `layer.path`).
        """
        path = path or _path_of(layer)
        if isinstance(layer, LowRankLayer):
            if not isinstance(layer, cls):
                raise TypeError(
                    f"{where(path)}: the layer is a {type(layer).__name__} "
                    f"already, not a {cls.__name__}. Use "
                    f"`{type(layer).__name__}.from_layer` or its "
                    "`add_adapter` method to add another adapter."
                )
            return
        if type(layer) is not cls.base_class:
            kind = (
                "a subclass, whose own `call` would be lost"
                if isinstance(layer, cls.base_class)
                else "another kind of layer"
            )
            raise TypeError(
                f"{where(path)}: {cls.__name__} adapts exactly "
                f"`keras.layers.{cls.base_class.__name__}` layers, not "
                f"{type(layer).__name__} ({kind}). Leave this layer out of "
                "`targets`, or adapt the plain Keras layers inside it."
            )
        if not layer.built:
            raise ValueError(
                f"{where(path)}: the layer is not built, so it has no kernel "
                "to adapt yet. Build the model first (call it on data or call "
                "`model.build(input_shape)`), then adapt it."
            )
        cls._check_options(layer, path)

    @classmethod
    def _check_options(cls, layer, path):
        """Refuses layer options without a low-rank adapter: built-in LoRA,
        kernel constraints, non-float dtypes, quantization, and geometries
        without a true rank-r factorisation. Works on unbuilt layers too."""
        if getattr(layer, "lora_enabled", False) or getattr(
            layer, "lora_rank", None
        ):
            raise ValueError(
                f"{where(path)}: Keras's built-in LoRA is enabled on this "
                "layer (`lora_rank`/`enable_lora`). Use one or the other: "
                "rebuild the layer without `lora_rank`/`enable_lora`, then "
                "adapt it."
            )
        if getattr(layer, "kernel_constraint", None) is not None or getattr(
            layer, "embeddings_constraint", None
        ) is not None:
            raise ValueError(
                f"{where(path)}: the layer has a kernel constraint, which a "
                "low-rank update would bypass. Remove `kernel_constraint` "
                "(or `embeddings_constraint`) from the layer, or exclude it."
            )
        dtype = keras.backend.standardize_dtype(layer.dtype_policy.variable_dtype)
        if layer.quantization_mode is None and dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"{where(path)}: unsupported dtype {dtype!r}; adapters need a "
                f"floating-point kernel ({', '.join(SUPPORTED_DTYPES)}). Use "
                "a float dtype policy for this layer, or exclude it."
            )
        quantized.check_mode(
            layer.quantization_mode, path, "adapt a layer quantized with"
        )
        cls._check_geometry(layer, path)

    @classmethod
    def _check_geometry(cls, layer, path):
        """Subclass hook: refuse layer configurations without a true rank-r
        factorisation (grouped convolutions, for instance)."""

    @classmethod
    def become(cls, layer):
        """Changes `layer`'s class to `cls` and gives it empty adapter state."""
        if isinstance(layer, LowRankLayer):
            return
        original = type(layer)
        layer.__class__ = cls
        layer._lowrank = _AdapterState(original)
        layer._lowrank_pending = {}
        quantized.install_layer_hook(layer)
        _refresh_call_signature(layer)

    @classmethod
    def revert(cls, layer):
        """Undoes `become` on a layer that holds no adapter (any more)."""
        if not isinstance(layer, LowRankLayer):
            return
        if layer._lowrank.specs:
            raise ValueError(
                f"{where(_path_of(layer))}: delete its adapters before "
                "turning it back into a plain layer."
            )
        original = layer._lowrank.original_class
        if layer._lowrank.seed is not None:
            _untrack(layer, "lowrank_seed")
        del layer._lowrank
        del layer._lowrank_pending
        # Caches a subclass may have set while it held adapters.
        layer.__dict__.pop("_lowrank_factorization", None)
        quantized.remove_layer_hook(layer)
        layer.__class__ = original
        _refresh_call_signature(layer)

    # --- trainability -------------------------------------------------------

    @property
    def trainable(self):
        return keras.layers.Layer.trainable.fget(self)

    @trainable.setter
    def trainable(self, value):
        # Keras's setter flips every variable created trainable, the frozen
        # kernel included: `model.trainable = False; model.trainable = True`
        # (freeze, then unfreeze a backbone) would silently turn LoRA into
        # full fine-tuning. Re-apply the adapters' policy instead.
        keras.layers.Layer.trainable.fset(self, value)
        if value and getattr(self, "_lowrank", None) is not None:
            if self._lowrank.specs:
                self._refresh_trainable()

    # --- adapters ---------------------------------------------------------

    @property
    def adapter_names(self):
        """Names of all adapters on this layer, in creation order."""
        return list(self._lowrank.specs)

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
        return self._lowrank.specs[self._known(name)]

    def adapter_variables(self, name):
        """`{"A": ..., "B": ...}`, plus `"magnitude"`, `"norm"` for DoRA and
        `"A0"`, `"B0"` (the initial factors) for PiSSA/OLoRA."""
        return self._variables_of(self._known(name))

    def _variables_of(self, name):
        out = {}
        for key in ADAPTER_KEYS:
            var = getattr(self, _var_attr(key, name), None)
            if var is not None:
                out[key] = var
        return out

    def add_adapter(self, name, spec, seed=None, restore=False):
        """Adds adapter `name` with options `spec` (an `AdapterSpec`).

        Args:
            name: the adapter's name (letters, digits, `_`, `-`).
            spec: an `AdapterSpec`.
            seed: optional int seed for the initial factors.
            restore: create the variables without initialising them (their
                values are about to be loaded from a file); PiSSA/OLoRA then
                leave the kernel untouched.

        The new adapter is active alone unless other adapters are active, in
        which case it is added to the active set.

        Example:

        >>> from keras_lowrank import LowRankDense, AdapterSpec
        >>> layer = LowRankDense(4, rank=2)
        >>> layer.build((None, 3))
        >>> layer.add_adapter("second", AdapterSpec(rank=1))
        >>> layer.adapter_names
        ['default', 'second']
        """
        path = _path_of(self)
        check_adapter_name(name, path)
        if not isinstance(spec, AdapterSpec):
            raise TypeError(
                f"{where(path)}: spec must be an AdapterSpec, got "
                f"{type(spec).__name__}. Use keras_lowrank.AdapterSpec(rank=8)."
            )
        if name in self._lowrank.specs:
            raise ValueError(
                f"{where(path)}: an adapter named {name!r} already exists. "
                "Choose another name, or `delete_adapter` it first."
            )
        spec.validate(path)
        layout = self._layout()
        if spec.rank > layout.max_rank:
            raise ValueError(
                f"{where(path)}: rank {spec.rank} is larger than "
                f"min(d, k) = min({layout.d}, {layout.k}) = {layout.max_rank}"
                " for this kernel, so it is not low-rank. Use a rank of at "
                f"most {layout.max_rank}."
            )
        self.check_spec(spec, path)
        if spec.rewrites_kernel and not restore:
            if self.quantization_mode is not None:
                raise ValueError(
                    f"{where(path)}: init={spec.init!r} rewrites the kernel, "
                    f"which is quantized ({self.quantization_mode!r}) and "
                    "cannot be rewritten. Adapt the float model first, then "
                    "`model.quantize(...)`: the residual kernel gets "
                    "quantized."
                )
            if self._lowrank.merged:
                raise ValueError(
                    f"{where(path)}: init={spec.init!r} rewrites the kernel, "
                    "which holds merged adapters now. `unmerge` first."
                )
            self._check_no_dora(f"init={spec.init!r} rewrites the kernel")
        values = None if restore else self._initial_values(spec, seed)
        created = []
        try:
            with self._unlocked_scope():
                for key, shape, trainable in self._variable_plan(spec, layout):
                    # float32 and never autocast: cast at use, and DoRA's
                    # ratio m/‖·‖ is formed in float32 under any policy.
                    # Created under a layout derived from the kernel's when a
                    # keras.distribution is active (see `sharding`).
                    var = sharding.create_adapter_variable(
                        self, key, f"lowrank_{key}_{name}", shape, trainable,
                        layout,
                    )
                    setattr(self, _var_attr(key, name), var)
                    created.append(key)
                if spec.dropout and self._lowrank.seed is None:
                    self.lowrank_seed = keras.random.SeedGenerator(
                        seed if isinstance(seed, int) else None
                    )
                    self._lowrank.seed = self.lowrank_seed
        except Exception:
            with self._unlocked_scope():
                for key in created:
                    delattr(self, _var_attr(key, name))
            raise
        if values is not None:
            for key, value in values.items():
                if key == "kernel":
                    self._kernel_variable().assign(
                        ops.cast(value, self._kernel_variable().dtype)
                    )
                else:
                    getattr(self, _var_attr(key, name)).assign(value)
            if spec.method == "dora":
                self._set_initial_magnitude(name, spec)
        self._lowrank.specs[name] = spec
        self._lowrank.active.append(name)
        self._refresh_trainable()

    def delete_adapter(self, name):
        """Removes adapter `name` and its variables (unmerging it first).

        A PiSSA/OLoRA adapter gives back what its init took from the kernel
        (`W_res + s·A0·B0 = W`), so the layer returns to its original kernel.
        """
        spec = self.adapter_spec(name)
        if spec.rewrites_kernel:
            self._check_no_dora(
                f"deleting the init={spec.init!r} adapter {name!r} restores "
                "the kernel",
                exclude=name,
            )
        if name in self._lowrank.merged:
            self.unmerge([name])
        if spec.rewrites_kernel:
            layout = self._layout()
            variables = self._variables_of(name)
            kernel = self._kernel_variable()
            restored = adapter_math.merge_kernel(
                layout.to_matrix(kernel),
                adapter_math.lowrank_delta(
                    layout.a_to_matrix(variables["A0"]),
                    layout.b_to_matrix(variables["B0"]),
                    spec.scale,
                ),
            )
            kernel.assign(layout.from_matrix(restored))
        self.forget_adapter(name)

    def forget_adapter(self, name):
        """Removes adapter `name` and its variables and leaves the kernel as
        it is (so a merged adapter stays in the kernel: what `unload` wants).
        """
        self._known(name)
        if name in self._lowrank.merged:
            self._lowrank.merged.remove(name)
        with self._unlocked_scope():
            for key in ADAPTER_KEYS:
                if hasattr(self, _var_attr(key, name)):
                    _delete_variable(self, _var_attr(key, name))
        del self._lowrank.specs[name]
        if name in self._lowrank.active:
            self._lowrank.active.remove(name)
        self._refresh_trainable()

    def set_active_adapters(self, names):
        """Makes exactly `names` (a list, possibly empty) active.

        Merged adapters must stay active: unmerge before deactivating them.
        """
        names = list(names)
        for name in names:
            self._known(name)
        for name in self._lowrank.merged:
            if name not in names:
                raise ValueError(
                    f"{where(_path_of(self))}: adapter {name!r} is merged into the"
                    " kernel; `unmerge` before switching it off."
                )
        self._lowrank.active = names
        self._refresh_trainable()

    def restore_state(self, active, merged):
        """Sets the active and merged adapters as saved, without touching the
        kernel (a loaded kernel already holds the merged adapters)."""
        for name in list(active) + list(merged):
            self._known(name)
        self._lowrank.active = list(active)
        self._lowrank.merged = list(merged)
        self._refresh_trainable()

    def delta(self, name):
        """`ΔW` of adapter `name` in the kernel's own layout (float32).

        For LoRA this is `s·A·B`; for DoRA it is what merging adds,
        `(c − 1)·W0 + c·s·A·B` with `c = m/‖W0 + s·A·B‖`, `W0` being the
        kernel without merged adapters. Merging adapter `name` adds exactly
        this to the kernel.
        """
        spec = self.adapter_spec(name)
        layout = self._layout()
        w0 = self._base_matrix() if spec.method == "dora" else None
        delta, _ = self._merge_delta(name, w0)
        return layout.from_matrix(delta)

    def merge(self, names=None):
        """Folds adapters (default: every active, unmerged one) into the
        kernel. Merging an adapter twice does nothing the second time.

        Exact for any subset in any order: see the module docstring. A DoRA
        adapter keeps the norm it used in its `norm` variable while merged,
        which is what `unmerge` needs to take it out again.

        A quantized kernel is refused: merging into it would be lossy and
        could not be undone. `dequantize()` it first.
        """
        names = self._lowrank.active if names is None else list(names)
        for name in names:
            self._known(name)
            if name not in self._lowrank.active:
                raise ValueError(
                    f"{where(_path_of(self))}: adapter {name!r} is not active; "
                    "only active adapters can be merged (`set_adapter` it)."
                )
        if any(name not in self._lowrank.merged for name in names):
            self.check_mergeable()
        kernel = self._kernel_variable()
        layout = self._layout()
        for name in list(names):
            if name in self._lowrank.merged:
                continue
            dora = self._lowrank.specs[name].method == "dora"
            w0 = self._base_matrix() if dora else None
            delta, norm = self._merge_delta(name, w0)
            w = layout.to_matrix(kernel)
            kernel.assign(
                layout.from_matrix(adapter_math.merge_kernel(w, delta))
            )
            if dora:
                self._variables_of(name)["norm"].assign(
                    layout.units_from_matrix(norm)
                )
            self._lowrank.merged.append(name)
        self._refresh_trainable()

    def unmerge(self, names=None):
        """Takes merged adapters (default: all) back out of the kernel, in
        the reverse order of merging."""
        names = list(self._lowrank.merged) if names is None else list(names)
        for name in names:
            self._known(name)
        kernel = self._kernel_variable()
        layout = self._layout()
        for name in reversed(list(self._lowrank.merged)):
            if name not in names:
                continue
            dora = self._lowrank.specs[name].method == "dora"
            w0 = self._base_matrix() if dora else None
            delta, _ = self._merge_delta(name, w0)
            w = layout.to_matrix(kernel)
            kernel.assign(
                layout.from_matrix(adapter_math.unmerge_kernel(w, delta))
            )
            if dora:
                norm = self._variables_of(name)["norm"]
                norm.assign(ops.zeros(norm.shape, "float32"))
            self._lowrank.merged.remove(name)
        self._refresh_trainable()

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
        spec = self.adapter_spec(name)
        variables = self._variables_of(name)
        values = {
            key: ops.convert_to_tensor(variables[key])
            for key in ("A", "B", "magnitude")
            if key in variables
        }
        if not spec.rewrites_kernel:
            return spec, values
        layout = self._layout()
        a, b = adapter_math.original_kernel_factors(
            layout.a_to_matrix(variables["A"]),
            layout.b_to_matrix(variables["B"]),
            layout.a_to_matrix(variables["A0"]),
            layout.b_to_matrix(variables["B0"]),
        )
        rank = min(2 * spec.rank, layout.max_rank)
        if rank < 2 * spec.rank:
            a, b = adapter_math.truncate_product(a, b, rank)
        alpha = adapter_math.alpha_for_rank(
            spec.alpha, spec.rank, rank, spec.scaling
        )
        values["A"] = layout.a_from_matrix(a)
        values["B"] = layout.b_from_matrix(b)
        return spec.replace(rank=rank, alpha=alpha, init="default"), values

    # --- Keras hooks --------------------------------------------------------

    def quantized_call(self, *args, **kwargs):
        # Keras calls this instead of `call` on a quantized layer; the base
        # path inside `call` uses Keras's quantized matmul (see `quantized`).
        return self.call(*args, **kwargs)

    # Whether `call` may add LoRA adapters to the kernel in inference (see
    # `_folds_for_inference`); layers that implement `_kernel_output` say so.
    _folds_in_inference = False

    def call(self, inputs, training=None):
        pending = [
            name for name in self._lowrank.active if name not in self._lowrank.merged
        ]
        if pending and self._folds_for_inference(inputs, pending, training):
            kernel = ops.cast(self._kernel_variable(), "float32")
            for name in pending:
                kernel = ops.add(kernel, self.delta(name))
            return self._finish_output(self._kernel_output(inputs, kernel))
        base = self._base_output(inputs)
        outputs = base
        for name in pending:
            outputs = self._add_adapter_output(outputs, base, inputs, name, training)
        return self._finish_output(outputs)

    def _folds_for_inference(self, inputs, pending, training):
        """Whether this inference call computes `x·(W + ΣΔW)` instead of
        `x·W + Σ s·(x·A)·B`.

        Both are exact; they differ in memory traffic. The side path adds an
        `N×k` output to another and runs two thin products; folding adds one
        `d×k` matrix to the kernel. With `N ≥ d` input rows folding moves
        less memory: on MiniLM (N = 1024, d = 384) under PyTorch the side
        path made unmerged inference 1.27x the base model's. Only for
        `training=False` (as `predict` passes; `fit` passes `training=True`,
        and training never forms `W + ΔW`), for plain LoRA adapters on a
        float32 compute dtype (a bfloat16 `W + ΔW` would round small updates
        away) and an unquantized kernel, and with the input shape known.
        """
        if training is not False or not self._folds_in_inference:
            return False
        if self.quantization_mode is not None or self.compute_dtype != "float32":
            return False
        if any(self._lowrank.specs[name].method != "lora" for name in pending):
            return False
        shape = tuple(inputs.shape)
        if any(n is None for n in shape):
            return False
        layout = self._layout()
        rows = math.prod(shape) // max(1, layout.d * math.prod(layout.batch_shape))
        return rows >= layout.d

    def rematerialized_call(self, layer_call, *args, **kwargs):
        """Keras's rematerialisation (`keras.RematScope`), made to work with
        `training` and with adapter dropout.

        Keras rematerialises `layer_call(*args, **kwargs)` as a whole. Two
        things break that for layers taking `training` (plain Keras layers
        included): `jax.checkpoint` turns the Python `training` flag into a
        traced value, and TensorFlow's `recompute_grad` refuses keyword
        arguments in graph mode. And dropout drawn from a stateful seed inside
        the rematerialised function either leaks a traced seed (JAX) or draws
        a different mask when recomputed. So the keyword arguments are bound
        outside, and each adapter's dropout seed is drawn outside and passed
        in, so the recomputation replays the same mask.
        """
        keras_remat = super().rematerialized_call

        def call(*call_args, **call_kwargs):
            seeds = self._draw_dropout_seeds(call_kwargs.get("training"))

            def rematerialized(*tensors):
                drawn = tensors[len(call_args):]
                self._lowrank.replay = dict(zip(seeds, drawn))
                try:
                    return layer_call(*tensors[: len(call_args)], **call_kwargs)
                finally:
                    self._lowrank.replay = {}

            remat_fn = keras_remat(rematerialized, *call_args, **call_kwargs)
            return remat_fn(*call_args, *seeds.values())

        return call

    def _draw_dropout_seeds(self, training):
        if not training or self._lowrank.seed is None:
            return {}
        return {
            name: self._lowrank.seed.next()
            for name in self._lowrank.active
            if name not in self._lowrank.merged
            and self._lowrank.specs[name].dropout
        }

    def _dropout_seed(self, name):
        if name in self._lowrank.replay:
            return _ReplayedSeed(self._lowrank.replay[name])
        return self._lowrank.seed

    def _add_adapter_output(self, outputs, base, inputs, name, training):
        spec = self._lowrank.specs[name]
        variables = self._variables_of(name)
        dropped = adapter_math.adapter_dropout(
            inputs, spec.dropout, training, self._dropout_seed(name)
        )
        b = variables["B"]
        if spec.method == "dora":
            layout = self._layout()
            norm = self._dora_norm(spec, variables)
            ratio = ops.divide(
                variables["magnitude"], layout.units_from_matrix(norm)
            )
            b = adapter_math.dora_scaled_b(b, ratio, len(layout.batch_shape))
        lowrank = self._side_output(dropped, variables["A"], b, spec, outputs.dtype)
        if spec.method == "lora":
            return ops.add(outputs, lowrank)
        # Without dropout x_d·W is the x·W already computed: no second matmul.
        base_dropped = base if dropped is inputs else self._base_output(dropped)
        if self._lowrank.merged:
            base_dropped = self._unmerged_base_output(dropped, base_dropped)
        return adapter_math.dora_combine(
            outputs,
            base_dropped,
            lowrank,
            self._units_to_output(ratio, len(outputs.shape)),
        )

    def _side_output(self, x, a, b, spec, dtype):
        """`s·(x·A)·B` through this layer's contractions, cast to `dtype`."""
        part = adapter_math.lowrank_contribution(
            x,
            a,
            b,
            spec.scale,
            contract_a=self._contract_a,
            contract_b=self._contract_b,
            dtype=self.compute_dtype,
        )
        return ops.cast(part, dtype)

    def _unmerged_base_output(self, x, y):
        """`x·W0` from `y = x·W`, W holding merged adapters, in low rank.

        `x·W = (x·W0)·(1 + Σ_j (c_j − 1)) + Σ_i s·(x·A_i)·B_i
        + Σ_j c_j·s·(x·A_j)·B_j` over merged LoRA adapters `i` and DoRA
        adapters `j` (see `adapter_math.unmerged_base_kernel`), solved for
        `x·W0` per output unit, with no kernel-sized temporary.
        """
        rho = None
        for name in self._lowrank.merged:
            spec = self._lowrank.specs[name]
            variables = self._variables_of(name)
            part = self._side_output(x, variables["A"], variables["B"], spec, y.dtype)
            if spec.method == "dora":
                c = ops.cast(
                    self._units_to_output(
                        ops.divide(variables["magnitude"], variables["norm"]),
                        len(y.shape),
                    ),
                    y.dtype,
                )
                part = ops.multiply(c, part)
                rho = c if rho is None else ops.add(rho, c - 1.0)
            y = ops.subtract(y, part)
        return y if rho is None else ops.divide(y, rho)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "adapters": {
                    name: spec.get_config()
                    for name, spec in self._specs_for_config().items()
                },
                "active_adapters": list(self._active_for_config()),
                "merged_adapters": list(self._merged_for_config()),
            }
        )
        return config

    def _specs_for_config(self):
        pending = getattr(self, "_lowrank_pending", None)
        return self._lowrank.specs or pending or {}

    def _active_for_config(self):
        if self._lowrank.specs:
            return self._lowrank.active
        return getattr(self, "_lowrank_pending_active", [])

    def _merged_for_config(self):
        if self._lowrank.specs:
            return self._lowrank.merged
        return getattr(self, "_lowrank_pending_merged", [])

    def save_own_variables(self, store):
        # The base class writes its own variables under numeric keys; the
        # adapters go next to them under their names, so that a plain Keras
        # layer loading this file finds more variables than it has and fails
        # loudly instead of silently dropping the adapters.
        self._save_base_variables(store)
        for name in self._lowrank.specs:
            for key, var in self.adapter_variables(name).items():
                store[f"lowrank_{key}_{name}"] = var

    def load_own_variables(self, store):
        self._load_base_variables(store)
        for name in self._lowrank.specs:
            for key, var in self.adapter_variables(name).items():
                stored = f"lowrank_{key}_{name}"
                if stored not in store.keys():
                    raise ValueError(
                        f"{where(_path_of(self))}: the weights file has no "
                        f"{stored!r}. It was saved from a model without this "
                        "adapter; load it into a matching model."
                    )
                var.assign(store[stored])

    def _save_base_variables(self, store):
        """Writes the base layer's own variables as the base class would.

        Dense, EinsumDense and Embedding write a fixed list of variables by
        name, which leaves the adapters out; subclasses whose base class
        writes *every* variable override this."""
        super().save_own_variables(store)

    def _load_base_variables(self, store):
        super().load_own_variables(store)

    # --- internals ------------------------------------------------------------

    def _known(self, name):
        if name not in self._lowrank.specs:
            raise ValueError(
                f"{where(_path_of(self))}: no adapter named {name!r}; this "
                f"layer has {sorted(self._lowrank.specs)}."
            )
        return name

    @contextlib.contextmanager
    def _unlocked_scope(self):
        """Lets a built layer gain or lose variables, under its own path.

        Keras locks a built layer's state; adding adapters after build is a
        deliberate exception (Keras's own `enable_lora` does the same). The
        name scope makes the new variables' paths `<layer.path>/<name>`.
        """
        tracker = self._tracker
        was_locked = tracker.locked
        tracker.unlock()
        parent, _, leaf = (self.path or self.name).rpartition("/")
        try:
            with keras.name_scope(leaf, override_parent=parent):
                yield
        finally:
            if was_locked:
                tracker.lock()

    def _variable_plan(self, spec, layout):
        plan = [
            ("A", layout.a_shape(spec.rank), True),
            ("B", layout.b_shape(spec.rank), True),
        ]
        if spec.method == "dora":
            plan.append(("magnitude", layout.unit_shape, True))
            plan.append(("norm", layout.unit_shape, False))
        if spec.rewrites_kernel:
            # The initial factors: with them an adapter file can hold the
            # equivalent adapter on the original kernel (see
            # `adapter_for_original_kernel`) and `delete_adapter` can restore
            # the kernel.
            plan.append(("A0", layout.a_shape(spec.rank), False))
            plan.append(("B0", layout.b_shape(spec.rank), False))
        return plan

    def _initial_values(self, spec, seed):
        """Initial `A`, `B` (and `A0`, `B0`, `kernel` for PiSSA/OLoRA); the
        DoRA magnitude is set afterwards, from the final kernel."""
        layout = self._layout()
        values = {}
        if spec.rewrites_kernel:
            a, b, residual = adapter_math.kernel_factors(
                spec.init,
                layout.to_matrix(self._float_kernel()),
                spec.rank,
                spec.scale,
                seed=seed,
            )
            # A0/B0 get their own buffers: on JAX, two variables holding
            # the same array make `fit` fail ("donate the same buffer twice").
            values["A"] = layout.a_from_matrix(a)
            values["B"] = layout.b_from_matrix(b)
            values["A0"] = ops.copy(values["A"])
            values["B0"] = ops.copy(values["B"])
            values["kernel"] = layout.from_matrix(residual)
        else:
            values["A"], values["B"] = self._data_free_factors(
                spec, layout, seed
            )
        return values

    def _data_free_factors(self, spec, layout, seed):
        return adapter_math.initial_factors(
            spec.init,
            layout.a_shape(spec.rank),
            layout.b_shape(spec.rank),
            fan_in=layout.d,
            seed=seed,
        )

    def _refresh_trainable(self):
        """Factors train while active and unmerged; the kernel never does;
        the bias trains when an active adapter asks for `bias="all"`.

        A frozen layer (`layer.trainable = False`) keeps every variable
        frozen: a parent model collects its sublayers' variables by their
        own flags, so a factor flagged trainable here would still train."""
        self._kernel_variable().trainable = False
        live = [n for n in self._lowrank.active if n not in self._lowrank.merged]
        if not self.trainable:
            live = []
        for name in self._lowrank.specs:
            for key, var in self.adapter_variables(name).items():
                var.trainable = key in TRAINABLE_KEYS and name in live
        bias = getattr(self, "bias", None)
        if isinstance(bias, keras.Variable):
            bias.trainable = any(
                self._lowrank.specs[n].bias == "all" for n in live
            )

    def _float_kernel(self):
        if self.quantization_mode is not None:
            return quantized.dequantized_kernel(self)
        return self._kernel_variable()

    def _set_initial_magnitude(self, name, spec):
        """m = ‖W0 + s·A·B‖, computed exactly as `call` computes the norm, so
        that `m/‖·‖ = 1` and the adapted layer starts at the base layer."""
        norm = self._dora_norm(spec, self._variables_of(name))
        getattr(self, _var_attr("magnitude", name)).assign(
            self._layout().units_from_matrix(norm)
        )

    def _check_no_dora(self, action, exclude=None):
        """Refuses kernel rewrites while a DoRA adapter, whose norm is taken
        of the kernel, is on the layer."""
        for other, spec in self._lowrank.specs.items():
            if other != exclude and spec.method == "dora":
                raise ValueError(
                    f"{where(self.path)}: {action}, which would change the "
                    f"DoRA adapter {other!r} (its norm is taken of the "
                    "kernel). Delete the DoRA adapter first, or add the "
                    "PiSSA/OLoRA adapter before it."
                )

    def _merge_delta(self, name, w0):
        """What merging `name` adds to the kernel (matrix form, float32),
        and for DoRA the norm it uses (the stored one while merged)."""
        spec = self._lowrank.specs[name]
        variables = self._variables_of(name)
        layout = self._layout()
        delta = adapter_math.lowrank_delta(
            layout.a_to_matrix(variables["A"]),
            layout.b_to_matrix(variables["B"]),
            spec.scale,
        )
        if spec.method != "dora":
            return delta, None
        if name in self._lowrank.merged:
            norm = layout.units_to_matrix(
                ops.convert_to_tensor(variables["norm"])
            )
        else:
            norm = self._dora_norm(spec, variables)
        magnitude = layout.units_to_matrix(
            ops.convert_to_tensor(variables["magnitude"])
        )
        return adapter_math.dora_merge_delta(w0, delta, magnitude, norm), norm

    def _merged_terms(self):
        """`(delta, ratio)` of every merged adapter, for
        `adapter_math.unmerged_base_kernel`."""
        layout = self._layout()
        terms = []
        for name in self._lowrank.merged:
            spec = self._lowrank.specs[name]
            variables = self._variables_of(name)
            delta = adapter_math.lowrank_delta(
                layout.a_to_matrix(variables["A"]),
                layout.b_to_matrix(variables["B"]),
                spec.scale,
            )
            ratio = None
            if spec.method == "dora":
                ratio = layout.units_to_matrix(
                    ops.divide(variables["magnitude"], variables["norm"])
                )
            terms.append((delta, ratio))
        return terms

    def _base_matrix(self, rounded=False):
        """`W0`, the kernel without merged adapters, matrix form, float32.

        With `rounded=True` the kernel is first rounded to the compute dtype,
        as Keras hands it to `call` under a mixed precision policy: DoRA's
        norm is always taken of that.
        """
        kernel = self._float_kernel()
        if rounded:
            kernel = ops.cast(kernel, self.compute_dtype)
        w = self._layout().to_matrix(ops.cast(kernel, "float32"))
        if self._lowrank.merged:
            w = adapter_math.unmerged_base_kernel(w, self._merged_terms())
        return w

    def _dora_norm(self, spec, variables):
        """`‖W0 + s·A·B‖` per output unit, matrix form `(*batch, k)`."""
        layout = self._layout()
        return adapter_math.dora_weight_norm(
            self._base_matrix(rounded=True),
            layout.a_to_matrix(variables["A"]),
            layout.b_to_matrix(variables["B"]),
            spec.scale,
        )

    @classmethod
    def check_spec(cls, spec, path):
        """Raises if `spec` makes no sense for this layer type (an Embedding
        refuses dropout, say). Subclasses extend it."""

    # --- geometry: subclasses implement these ---------------------------------

    @classmethod
    def kernel_layout(cls, layer):
        """The `KernelLayout` of a built `base_class` (or adapter) layer."""
        raise NotImplementedError

    @classmethod
    def kernel_variable(cls, layer):
        """The variable holding `layer`'s kernel (plain or adapted)."""
        raise NotImplementedError

    def _layout(self):
        return type(self).kernel_layout(self)

    def _kernel_variable(self):
        return type(self).kernel_variable(self)

    def _base_output(self, inputs):
        """`x·W` before bias and activation, in the compute dtype."""
        raise NotImplementedError

    def _finish_output(self, outputs):
        """Adds the bias and applies the activation."""
        raise NotImplementedError

    def _kernel_output(self, inputs, kernel):
        """`x·kernel` for a float32 `kernel` in the layer's layout (layers
        with `_folds_in_inference`)."""
        raise NotImplementedError

    def _contract_a(self, x, a):
        """How the input meets `A` (stored layout)."""
        raise NotImplementedError

    def _contract_b(self, h, b):
        """How the rank-r intermediate meets `B` (stored layout)."""
        raise NotImplementedError

    def _units_to_output(self, units, ndim):
        """Reshapes a `unit_shape` tensor to broadcast against the output."""
        raise NotImplementedError


def _path_of(layer):
    """The layer's path (`None` until built or placed in a model), else its
    name: what error messages call the layer."""
    return getattr(layer, "path", None) or getattr(layer, "name", None)


class _ReplayedSeed(keras.random.SeedGenerator):
    """A dropout seed drawn before a rematerialised call, replayed inside it
    (and again when the backward pass recomputes it)."""

    def __init__(self, value):
        # No state variable: this seed never advances. (`_initial_seed` set:
        # the torch backend then draws from this seed, not its global RNG.)
        self._value = value
        self._initial_seed = 0

    def next(self, ordered=True):
        return self._value


def _var_attr(key, name):
    return f"lowrank_{key}_{name}"


def _delete_variable(layer, attr):
    """`delattr(layer, attr)` for a variable attribute, minus the
    `gc.collect()` Keras's `Layer.__delattr__` runs for every variable (up to
    a second each in a process holding a large model: deleting a 12-layer
    adapter took ~20 s). Model-level operations collect once at the end."""
    variable = getattr(layer, attr)
    layer._untrack_variable(variable)
    super(keras.layers.Layer, layer).__delattr__(attr)


def _untrack(layer, attr):
    with layer._unlocked_scope():
        delattr(layer, attr)


def _refresh_call_signature(layer):
    """Re-reads `call`'s signature after a class change.

    Keras inspects `call` once, in `Layer.__init__`, to learn whether it takes
    `training`. An Embedding or Conv layer that became an adapter layer now
    takes `training` (for adapter dropout), so the cached answer must be
    refreshed, or Keras would never pass it.
    """
    signature = inspect.signature(layer.call)
    layer._call_signature = signature
    layer.call_signature_parameters = [p.name for p in signature.parameters.values()]
    layer._call_has_training_arg = "training" in layer.call_signature_parameters
    layer._call_has_mask_arg = "mask" in layer.call_signature_parameters
    layer._call_has_context_arg = {
        arg: (arg in layer.call_signature_parameters)
        for arg in layer._call_context_args
    }
