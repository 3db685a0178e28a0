"""`LowRankLayer`: the Keras side of every adapter layer.

A `LowRankDense` *is* a `keras.layers.Dense` (likewise for EinsumDense,
Embedding and Conv), with named adapters added. A layer gets there in one of
two ways:

- standalone: `LowRankDense(64, adapter=AdapterSpec(rank=8))` (or the
  keywords, `LowRankDense(64, rank=8)`) creates a frozen kernel and the
  factors in `build`;
- in place: `LowRankDense.from_layer(dense, rank=8)` (what `adapt()` uses)
  turns an existing, built `Dense` into a `LowRankDense` by changing its class
  and adding the factors (see `convert`). The kernel variable is the same
  object before and after: nothing is copied.

Each adapter has a name, an `AdapterSpec` and its variables (`A`, `B`, for
DoRA the magnitude `m` and the norm kept while merged, for PiSSA/OLoRA the
initial factors `A0`, `B0`). A layer can hold several; the active ones add
up; merged ones live inside the kernel. All of that state is one
`AdapterSet`, `layer._lowrank`; this mixin keeps the Keras hooks (`build`
glue, `call`, `get_config`, saving, `trainable`), and the public methods
that delegate to it come from `adapter_methods.AdapterMethods`. The forward pass is in `forward`, the kernel arithmetic in
`merging`, every formula in `keras_lowrank.adapter_math`.

Subclasses describe only their own geometry (see the "geometry" methods at the
end).
"""

import keras

from keras_lowrank import keras_private
from keras_lowrank.layers import convert
from keras_lowrank.layers import forward
from keras_lowrank.layers import merging
from keras_lowrank.layers import quantize_hooks
from keras_lowrank.layers.adapter_methods import AdapterMethods
from keras_lowrank.layers.adapter_set import ADAPTER_KEYS  # noqa: F401
from keras_lowrank.layers.adapter_set import AdapterSet
from keras_lowrank.layers.adapter_set import path_of
from keras_lowrank.layers.adapter_set import var_attr
from keras_lowrank.spec import AdapterSpec
from keras_lowrank.spec import check_adapter_name
from keras_lowrank.spec import spec_from_arguments
from keras_lowrank.spec import split_adapter_options
from keras_lowrank.spec import where

SUPPORTED_DTYPES = convert.SUPPORTED_DTYPES


class LowRankLayer(AdapterMethods):
    """Mixin holding named low-rank adapters on a kernel layer.

    Not used directly: use `LowRankDense`, `LowRankEinsumDense`,
    `LowRankEmbedding` or `LowRankConv1D/2D/3D`.
    """

    # The plain Keras class each adapter class extends; set by subclasses.
    base_class = None
    # Read by `convert.is_adapter_layer`.
    _is_lowrank_layer = True

    # --- construction -----------------------------------------------------

    # `split_adapter_options(kwargs)` in each constructor, before the base
    # class sees `kwargs`; then `_init_adapters`.
    split_adapter_options = staticmethod(split_adapter_options)

    def _init_adapters(self, adapter, options, state):
        """Records the adapters a standalone layer creates in `build`.

        Args:
            adapter: the `adapter=` argument (an `AdapterSpec` or `None`).
            options: `AdapterSpec` keywords given instead (`rank=8`).
            state: `adapter_name` and the saved state (`adapters`,
                `active_adapters`, `merged_adapters`, as `get_config`
                writes them: used when loading, overriding the options).

        Everything that can be checked before the kernel exists is checked
        here, so a bad option fails at construction, naming the layer.
        """
        path = path_of(self)
        self._lowrank = AdapterSet(self, self.base_class)
        adapters = state["adapters"]
        owner = type(self).__name__
        if adapters is None:
            spec = spec_from_arguments(adapter, options, path, owner)
            adapters = {check_adapter_name(state["adapter_name"], path): spec}
        elif adapter is not None:
            raise TypeError(
                f"{where(path)}: {owner} got both adapter= and adapters= "
                "(the saved state). Pass one of them."
            )
        self._check_options(self, path)
        # Adapters given as a dict come from a config: their values are about
        # to be loaded, so kernel inits (an SVD or QR per layer) are skipped.
        self._lowrank.record(
            adapters,
            state["active_adapters"],
            state["merged_adapters"],
            from_config=state["adapters"] is not None,
        )
        quantize_hooks.install_layer_hook(self)

    def _build_adapters(self):
        """Creates the recorded adapters; called at the end of `build`."""
        self._lowrank.build_pending()

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
        adapter=None,
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
            adapter: an `AdapterSpec` instead of the option keywords.

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
        path = path_of(layer)
        given = dict(
            rank=rank, alpha=alpha, scaling=scaling, dropout=dropout,
            method=method, init=init, bias=bias,
        )
        defaults = dict(
            rank=8, alpha=None, scaling="standard", dropout=0.0,
            method="lora", init="default", bias="none",
        )
        if adapter is None:
            spec = AdapterSpec.checked(path, **given)
        else:
            changed = {k: v for k, v in given.items() if v != defaults[k]}
            spec = spec_from_arguments(
                adapter, changed, path, f"{cls.__name__}.from_layer"
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
        convert.check_convertible(cls, layer, path)

    @classmethod
    def _check_options(cls, layer, path):
        convert.check_options(cls, layer, path)

    @classmethod
    def _check_geometry(cls, layer, path):
        """Subclass hook: refuse layer configurations without a true rank-r
        factorisation (grouped convolutions, for instance)."""

    @classmethod
    def become(cls, layer):
        """Changes `layer`'s class to `cls` and gives it empty adapter state."""
        convert.become(cls, layer)

    @classmethod
    def revert(cls, layer):
        """Undoes `become` on a layer that holds no adapter (any more)."""
        convert.revert(layer)

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

    def _refresh_trainable(self):
        """Factors train while active and unmerged; the kernel never does;
        the bias trains when an active adapter asks for `bias="all"`."""
        self._lowrank.refresh_trainable()


    # --- Keras hooks --------------------------------------------------------

    def quantized_call(self, *args, **kwargs):
        # Keras calls this instead of `call` on a quantized layer; the base
        # path inside `call` uses Keras's quantized matmul (see `quantized`).
        return self.call(*args, **kwargs)

    # Whether `call` may add LoRA adapters to the kernel in inference (see
    # `forward.folds_for_inference`); layers with `_kernel_output` say so.
    _folds_in_inference = False

    def call(self, inputs, training=None):
        return forward.call(self, inputs, training)

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
        return forward.rematerialized(
            self, super().rematerialized_call, layer_call
        )

    def get_config(self):
        config = super().get_config()
        config.update(self._lowrank.config())
        return config

    def save_own_variables(self, store):
        # The base class writes its own variables under numeric keys; the
        # adapters go next to them under their names, so that a plain Keras
        # layer loading this file finds more variables than it has and fails
        # loudly instead of silently dropping the adapters.
        self._save_base_variables(store)
        for name in self._lowrank.specs:
            for key, var in self.adapter_variables(name).items():
                store[var_attr(key, name)] = var
        backup = getattr(self, merging.BACKUP_ATTR, None)
        if backup is not None:
            store[merging.BACKUP_ATTR] = backup

    def load_own_variables(self, store):
        merging.prepare_load(self._lowrank, list(store.keys()))
        self._load_base_variables(store)
        for name in self._lowrank.specs:
            for key, var in self.adapter_variables(name).items():
                stored = var_attr(key, name)
                if stored not in store.keys():
                    raise ValueError(
                        f"{where(path_of(self))}: the weights file has no "
                        f"{stored!r}. It was saved from a model without this "
                        "adapter; load it into a matching model."
                    )
                var.assign(store[stored])
        merging.finish_load(self._lowrank, store)

    def _save_base_variables(self, store):
        """Writes the base layer's own variables as the base class would.

        Dense, EinsumDense and Embedding write a fixed list of variables by
        name, which leaves the adapters out; subclasses whose base class
        writes *every* variable override this."""
        super().save_own_variables(store)

    def _load_base_variables(self, store):
        super().load_own_variables(store)

    # --- geometry: subclasses implement these ---------------------------------

    @classmethod
    def check_spec(cls, spec, path):
        """Raises if `spec` makes no sense for this layer type (an Embedding
        refuses dropout, say). Subclasses extend it."""

    @classmethod
    def kernel_layout(cls, layer):
        """The `KernelLayout` of a built `base_class` (or adapter) layer."""
        raise NotImplementedError

    @classmethod
    def kernel_variable(cls, layer):
        """The variable holding `layer`'s kernel (plain or adapted)."""
        return keras_private.kernel_of(layer)

    def _layout(self):
        return type(self).kernel_layout(self)

    def _frozen_base_variables(self):
        """The base weights an adapter layer never trains: its kernel
        (ReversibleEmbedding adds its separate output table)."""
        return [self._kernel_variable()]

    def _kernel_variable(self):
        return type(self).kernel_variable(self)

    def _data_free_factors(self, spec, layout, seed):
        """Initial `A`, `B` of a data-free init (Embedding overrides)."""
        from keras_lowrank import adapter_math

        return adapter_math.initial_factors(
            spec.init,
            layout.a_shape(spec.rank),
            layout.b_shape(spec.rank),
            fan_in=layout.d,
            seed=seed,
        )

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

    def _rows_contraction(self):
        """How many trailing input axes meet `A` when the layer is a plain
        matrix product on them (each row can then use its own adapter,
        `adapter_stack`), else `None`."""
        return None

    def _contract_b(self, h, b):
        """How the rank-r intermediate meets `B` (stored layout)."""
        raise NotImplementedError

    def _units_to_output(self, units, ndim):
        """Reshapes a `unit_shape` tensor to broadcast against the output."""
        raise NotImplementedError
