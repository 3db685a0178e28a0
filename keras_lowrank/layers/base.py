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

Each adapter has a name, an `AdapterSpec` and its variables (`A`, `B`, and for
DoRA the magnitude `m` and the norm kept while merged). A layer can hold
several; the active ones add up; merged ones live inside the kernel.

Subclasses describe only their own geometry (see the "geometry" methods at the
end); every formula comes from `keras_lowrank.adapter_math`.
"""

import contextlib
import inspect

import keras
from keras import ops

from keras_lowrank import adapter_math
from keras_lowrank.layers import quantized
from keras_lowrank.layers import sharding
from keras_lowrank.spec import AdapterSpec
from keras_lowrank.spec import check_adapter_name
from keras_lowrank.spec import where

SUPPORTED_DTYPES = ("float16", "bfloat16", "float32", "float64")


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
        for name, spec in pending.items():
            self.add_adapter(name, spec, restore=name in merged)
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
        """`{"A": ..., "B": ...}` (plus `"magnitude"`, `"norm"` for DoRA)."""
        self._known(name)
        out = {}
        for key in ("A", "B", "magnitude", "norm"):
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
        rewrites_kernel = spec.init in ("pissa", "olora") and not restore
        if rewrites_kernel and self.quantization_mode is not None:
            raise ValueError(
                f"{where(path)}: init={spec.init!r} rewrites the kernel, "
                f"which is quantized ({self.quantization_mode!r}) and cannot "
                "be rewritten. Adapt the float model first, then "
                "`model.quantize(...)`: the residual kernel gets quantized."
            )
        if spec.init in ("pissa", "olora") and self._lowrank.merged:
            raise ValueError(
                f"{where(path)}: init={spec.init!r} rewrites the kernel, "
                "which holds merged adapters now. `unmerge` first."
            )
        values = None if restore else self._initial_values(spec, seed)
        created = []
        try:
            with self._unlocked_scope():
                for key, shape, trainable in self._variable_plan(spec, layout):
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
        self._lowrank.specs[name] = spec
        self._lowrank.active.append(name)
        self._refresh_trainable()

    def delete_adapter(self, name):
        """Removes adapter `name` and its variables (unmerging it first)."""
        self._known(name)
        if name in self._lowrank.merged:
            self.unmerge([name])
        self.forget_adapter(name)

    def forget_adapter(self, name):
        """Removes adapter `name` and its variables and leaves the kernel as
        it is (so a merged adapter stays in the kernel: what `unload` wants).
        """
        self._known(name)
        if name in self._lowrank.merged:
            self._lowrank.merged.remove(name)
        with self._unlocked_scope():
            for key in ("A", "B", "magnitude", "norm"):
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

        For LoRA this is `s·A·B`; for DoRA it is the full change
        `(m/‖W+s·A·B‖)·(W+s·A·B) − W` relative to the current kernel.
        """
        spec = self.adapter_spec(name)
        layout = self._layout()
        variables = self.adapter_variables(name)
        delta = adapter_math.lowrank_delta(
            layout.a_to_matrix(variables["A"]),
            layout.b_to_matrix(variables["B"]),
            spec.scale,
        )
        if spec.method == "dora":
            w = layout.to_matrix(self._float_kernel())
            norm = adapter_math.dora_weight_norm(
                w,
                layout.a_to_matrix(variables["A"]),
                layout.b_to_matrix(variables["B"]),
                spec.scale,
            )
            magnitude = layout.units_to_matrix(variables["magnitude"])
            merged = adapter_math.dora_merged_kernel(w, delta, magnitude, norm)
            delta = ops.cast(merged, "float32") - ops.cast(w, "float32")
        return layout.from_matrix(delta)

    def merge(self, names=None):
        """Folds adapters (default: every active, unmerged one) into the
        kernel. Merging an adapter twice does nothing the second time.

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
        for name in names:
            if name in self._lowrank.merged:
                continue
            spec = self._lowrank.specs[name]
            variables = self.adapter_variables(name)
            a = layout.a_to_matrix(variables["A"])
            b = layout.b_to_matrix(variables["B"])
            w = layout.to_matrix(kernel)
            delta = adapter_math.lowrank_delta(a, b, spec.scale)
            if spec.method == "dora":
                norm = adapter_math.dora_weight_norm(w, a, b, spec.scale)
                magnitude = layout.units_to_matrix(variables["magnitude"])
                new_w = adapter_math.dora_merged_kernel(w, delta, magnitude, norm)
                variables["norm"].assign(layout.units_from_matrix(norm))
            else:
                new_w = adapter_math.merge_kernel(w, delta)
            kernel.assign(layout.from_matrix(new_w))
            self._lowrank.merged.append(name)
        self._refresh_trainable()

    def unmerge(self, names=None):
        """Takes merged adapters (default: all) back out of the kernel, in
        the reverse order of merging."""
        names = list(self._lowrank.merged) if names is None else list(names)
        kernel = self._kernel_variable()
        layout = self._layout()
        for name in reversed(list(self._lowrank.merged)):
            if name not in names:
                continue
            spec = self._lowrank.specs[name]
            variables = self.adapter_variables(name)
            a = layout.a_to_matrix(variables["A"])
            b = layout.b_to_matrix(variables["B"])
            w = layout.to_matrix(kernel)
            delta = adapter_math.lowrank_delta(a, b, spec.scale)
            if spec.method == "dora":
                new_w = adapter_math.dora_unmerged_kernel(
                    w,
                    delta,
                    layout.units_to_matrix(variables["magnitude"]),
                    layout.units_to_matrix(variables["norm"]),
                )
                variables["norm"].assign(ops.zeros_like(variables["norm"]))
            else:
                new_w = adapter_math.unmerge_kernel(w, delta)
            kernel.assign(layout.from_matrix(new_w))
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

    # --- Keras hooks --------------------------------------------------------

    def quantized_call(self, *args, **kwargs):
        # Keras calls this instead of `call` on a quantized layer; the base
        # path inside `call` uses Keras's quantized matmul (see `quantized`).
        return self.call(*args, **kwargs)

    def call(self, inputs, training=None):
        base = self._base_output(inputs)
        outputs = base
        for name in self._lowrank.active:
            if name not in self._lowrank.merged:
                outputs = self._add_adapter_output(
                    outputs, base, inputs, name, training
                )
        return self._finish_output(outputs)

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
        variables = self.adapter_variables(name)
        dropped = adapter_math.adapter_dropout(
            inputs, spec.dropout, training, self._dropout_seed(name)
        )
        lowrank = adapter_math.lowrank_contribution(
            dropped,
            variables["A"],
            variables["B"],
            spec.scale,
            contract_a=self._contract_a,
            contract_b=self._contract_b,
            dtype=self.compute_dtype,
        )
        lowrank = ops.cast(lowrank, outputs.dtype)
        if spec.method == "lora":
            return ops.add(outputs, lowrank)
        layout = self._layout()
        norm = adapter_math.dora_weight_norm(
            layout.to_matrix(self._float_kernel()),
            layout.a_to_matrix(variables["A"]),
            layout.b_to_matrix(variables["B"]),
            spec.scale,
        )
        ratio = ops.divide(
            ops.cast(variables["magnitude"], "float32"),
            layout.units_from_matrix(norm),
        )
        # Without dropout x_d·W is the x·W already computed: no second matmul.
        base_dropped = base if dropped is inputs else self._base_output(dropped)
        return adapter_math.dora_combine(
            outputs,
            base_dropped,
            lowrank,
            self._units_to_output(ratio, len(outputs.shape)),
        )

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
        return plan

    def _initial_values(self, spec, seed):
        layout = self._layout()
        values = {}
        if spec.init in ("pissa", "olora"):
            a, b, residual = adapter_math.kernel_factors(
                spec.init,
                layout.to_matrix(self._float_kernel()),
                spec.rank,
                spec.scale,
            )
            values["A"] = layout.a_from_matrix(a)
            values["B"] = layout.b_from_matrix(b)
            values["kernel"] = layout.from_matrix(residual)
            kernel_for_norm = residual
        else:
            a, b = self._data_free_factors(spec, layout, seed)
            values["A"], values["B"] = a, b
            kernel_for_norm = None
        if spec.method == "dora":
            w = (
                layout.to_matrix(self._float_kernel())
                if kernel_for_norm is None
                else kernel_for_norm
            )
            # m starts at ‖W + s·A·B‖ so the adapted layer starts at the base.
            norm = adapter_math.dora_weight_norm(
                w,
                layout.a_to_matrix(values["A"]),
                layout.b_to_matrix(values["B"]),
                spec.scale,
            )
            values["magnitude"] = layout.units_from_matrix(norm)
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
                var.trainable = key != "norm" and name in live
        bias = getattr(self, "bias", None)
        if isinstance(bias, keras.Variable):
            bias.trainable = any(
                self._lowrank.specs[n].bias == "all" for n in live
            )

    def _float_kernel(self):
        if self.quantization_mode is not None:
            return quantized.dequantized_kernel(self)
        return self._kernel_variable()

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
