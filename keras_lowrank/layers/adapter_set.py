"""`AdapterSet`: the adapter state of one layer, in one object.

Every adapter layer holds one, as `layer._lowrank`. It owns the adapters'
specs, their variables (kept as attributes of the layer, `lowrank_<key>_<name>`,
so Keras tracks, saves and trains them), the active and merged names, and
every operation on them: add, delete, forget, activate, delta, merge,
unmerge, the trainability policy, the DoRA norm bookkeeping, the initial
values and the adapters' part of the layer config. The layer itself keeps the
Keras hooks and the forward pass (see `base` and `forward`); the kernel
arithmetic lives in `merging`.

It is plain Python state, deliberately not tracked by Keras: the variables
are tracked as layer attributes.
"""

import contextlib

import keras
from keras import ops

from keras_lowrank import errors
from keras_lowrank import keras_private
from keras_lowrank.layers import merging
from keras_lowrank.layers import sharding
from keras_lowrank.layers.token_rows import check_token_rows
from keras_lowrank.spec import AdapterSpec
from keras_lowrank.spec import check_adapter_name
from keras_lowrank.spec import check_seed
from keras_lowrank.spec import where

# The variables an adapter may own, by key: the factors, DoRA's magnitude and
# the norm it keeps while merged, and the initial factors of PiSSA/OLoRA.
ADAPTER_KEYS = ("A", "B", "magnitude", "norm", "A0", "B0")


def path_of(layer):
    """The layer's path (`None` until built or placed in a model), else its
    name: what error messages call the layer."""
    return getattr(layer, "path", None) or getattr(layer, "name", None)


def var_attr(key, name):
    """The layer attribute (and variable name) of adapter `name`'s `key`."""
    return f"lowrank_{key}_{name}"


class AdapterSet:
    """The named adapters of one layer.

    Args:
        layer: the adapter layer that holds this set (as `layer._lowrank`).
        original_class: the plain Keras class the layer had before it became
            an adapter layer (what `revert` gives back).

    Example:

    >>> from keras_lowrank import LowRankDense, AdapterSpec
    >>> layer = LowRankDense(4, adapter=AdapterSpec(rank=2))
    >>> layer.build((None, 3))
    >>> adapters = layer._lowrank
    >>> adapters.names, adapters.active, adapters.merged
    (['default'], ['default'], [])
    >>> sorted(adapters.variables("default"))
    ['A', 'B']
    """

    def __init__(self, layer, original_class):
        self.layer = layer
        self.original_class = original_class
        self.specs = {}  # name -> AdapterSpec
        self.active = []  # names whose contribution is added in `call`
        self.merged = []  # names currently folded into the kernel
        self.seed = None  # SeedGenerator for adapter dropout, made on demand
        self.replay = {}  # name -> dropout seed drawn outside a remat call
        # Adapters recorded by the constructor, created at the end of build.
        self.pending = {}
        self.pending_active = []
        self.pending_merged = []
        self.from_config = False
        # While the model's adapters are stacked for serving, the
        # `AdapterStack` that `call` computes with instead (see
        # `adapter_stack`); nothing trains then.
        self.stack = None
        # The siblings that may share this layer's `x·A` product
        # (`shared_input.InputGroup`), formed by every refresh.
        self.input_group = None

    # --- reading ---------------------------------------------------------------

    @property
    def path(self):
        return path_of(self.layer)

    @property
    def names(self):
        return list(self.specs)

    def known(self, name):
        """`name`, or the one "no adapter named ..." error."""
        if name not in self.specs:
            raise errors.unknown_adapter(self.path, name, self.specs)
        return name

    def spec(self, name):
        return self.specs[self.known(name)]

    def variables(self, name):
        """`{key: variable}` of adapter `name` (no name check)."""
        out = {}
        for key in ADAPTER_KEYS:
            var = getattr(self.layer, var_attr(key, name), None)
            if var is not None:
                out[key] = var
        return out

    def live(self):
        """Active, unmerged names: what `call` adds."""
        return [n for n in self.active if n not in self.merged]

    # --- construction ------------------------------------------------------------

    def record(self, adapters, active, merged, from_config):
        """Records the adapters a standalone layer creates in `build`."""
        path = self.path
        self.from_config = from_config
        self.pending = {
            check_adapter_name(name, path): (
                spec
                if isinstance(spec, AdapterSpec)
                else AdapterSpec.from_config(spec, path)
            )
            for name, spec in adapters.items()
        }
        for spec in self.pending.values():
            spec.validate(path)
            self.layer.check_spec(spec, path)
        self.pending_active = (
            list(active) if active is not None else list(self.pending)
        )
        self.pending_merged = list(merged or [])

    def build_pending(self):
        """Creates the recorded adapters; called at the end of `build`.

        A layer rebuilt from a config (a `.keras` file) gets its adapters in
        their saved state: merged ones are marked merged without touching the
        kernel, because the saved kernel already holds them.
        """
        pending, merged = self.pending, self.pending_merged
        for name, spec in pending.items():
            skip = name in merged or (self.from_config and spec.rewrites_kernel)
            self.add(name, spec, restore=skip)
            if skip and name not in merged and spec.method == "dora":
                # Neutral until the saved values arrive: A = B = 0, m = ‖W‖.
                merging.set_initial_magnitude(self, name, spec)
        self.active = [n for n in self.pending_active if n in pending]
        self.merged = [n for n in merged if n in pending]
        self.pending = {}
        self.refresh_trainable()

    def config(self):
        """The adapters' part of the layer config (`.keras` format)."""
        specs = self.specs or self.pending or {}
        built = bool(self.specs)
        return {
            "adapters": {name: spec.get_config() for name, spec in specs.items()},
            "active_adapters": list(self.active if built else self.pending_active),
            "merged_adapters": list(self.merged if built else self.pending_merged),
        }

    # --- adding and removing -------------------------------------------------------

    def add(self, name, spec, seed=None, restore=False):
        """See `LowRankLayer.add_adapter`."""
        layer, path = self.layer, self.path
        check_adapter_name(name, path)
        if not isinstance(spec, AdapterSpec):
            raise TypeError(
                f"{where(path)}: spec must be an AdapterSpec, got "
                f"{type(spec).__name__}. Use keras_lowrank.AdapterSpec(rank=8)."
            )
        if name in self.specs:
            raise ValueError(
                f"{where(path)}: an adapter named {name!r} already exists. "
                "Choose another name, or `delete_adapter` it first."
            )
        check_seed(seed, path)
        spec.validate(path)
        layout = layer._layout()
        check_token_rows(type(layer), layout, spec, path)
        layout.check_rank(spec.rank, path)
        layer.check_spec(spec, path)
        if spec.rewrites_kernel and not restore:
            self._check_kernel_rewritable(spec)
        values = None if restore else merging.initial_values(self, spec, seed)
        created = []
        try:
            with self.unlocked():
                for key, shape, trainable in _variable_plan(spec, layout):
                    # float32 and never autocast: cast at use, and DoRA's
                    # ratio m/‖·‖ is formed in float32 under any policy.
                    # Created under a layout derived from the kernel's when
                    # a keras.distribution is active (see `sharding`).
                    var = sharding.create_adapter_variable(
                        layer, key, var_attr(key, name), shape, trainable,
                        layout,
                    )
                    setattr(layer, var_attr(key, name), var)
                    created.append(key)
                if spec.dropout and self.seed is None:
                    layer.lowrank_seed = keras.random.SeedGenerator(
                        seed if isinstance(seed, int) else None
                    )
                    self.seed = layer.lowrank_seed
        except Exception:
            with self.unlocked():
                for key in created:
                    delattr(layer, var_attr(key, name))
            raise
        if values is not None:
            kernel = layer._kernel_variable()
            for key, value in values.items():
                if key == "kernel":
                    kernel.assign(ops.cast(value, kernel.dtype))
                else:
                    getattr(layer, var_attr(key, name)).assign(value)
            if spec.method == "dora":
                merging.set_initial_magnitude(self, name, spec)
        self.specs[name] = spec
        self.active.append(name)
        self.refresh_trainable()

    def _check_kernel_rewritable(self, spec):
        path, mode = self.path, self.layer.quantization_mode
        if mode is not None:
            raise ValueError(
                f"{where(path)}: init={spec.init!r} rewrites the kernel, "
                f"which is quantized ({mode!r}) and cannot be rewritten. "
                "Adapt the float model first, then `model.quantize(...)`: "
                "the residual kernel gets quantized."
            )
        if self.merged:
            raise ValueError(
                f"{where(path)}: init={spec.init!r} rewrites the kernel, "
                "which holds merged adapters now. `unmerge` first."
            )
        self.check_no_dora(f"init={spec.init!r} rewrites the kernel")

    def delete(self, name):
        """See `LowRankLayer.delete_adapter`."""
        spec = self.spec(name)
        if spec.rewrites_kernel:
            self.check_no_dora(
                f"deleting the init={spec.init!r} adapter {name!r} restores "
                "the kernel",
                exclude=name,
            )
        if name in self.merged:
            self.unmerge([name])
        if spec.rewrites_kernel:
            merging.restore_rewritten_kernel(self, name, spec)
        self.forget(name)

    def forget(self, name):
        """See `LowRankLayer.forget_adapter`."""
        self.known(name)
        if name in self.merged:
            self.merged.remove(name)
            # What is merged stays in the kernel: the backup is no longer
            # the kernel's base once nothing is marked merged.
            merging.sync_backup(self)
        with self.unlocked():
            for key in ADAPTER_KEYS:
                if hasattr(self.layer, var_attr(key, name)):
                    keras_private.delete_variable(self.layer, var_attr(key, name))
        del self.specs[name]
        if name in self.active:
            self.active.remove(name)
        self.refresh_trainable()

    def drop_seed(self):
        """Removes the dropout seed generator (before `revert`)."""
        if self.seed is not None:
            with self.unlocked():
                delattr(self.layer, "lowrank_seed")
            self.seed = None

    # --- activation --------------------------------------------------------------

    def set_active(self, names):
        """See `LowRankLayer.set_active_adapters`."""
        names = list(names)
        for name in names:
            self.known(name)
        for name in self.merged:
            if name not in names:
                raise ValueError(
                    f"{where(self.path)}: adapter {name!r} is merged into the"
                    " kernel; `unmerge` before switching it off."
                )
        self.active = names
        self.refresh_trainable()

    def restore_state(self, active, merged):
        """See `LowRankLayer.restore_state`."""
        for name in list(active) + list(merged):
            self.known(name)
        self.active = list(active)
        self.merged = list(merged)
        merging.sync_backup(self)
        self.refresh_trainable()

    # --- merging -------------------------------------------------------------------

    def delta(self, name):
        return merging.delta(self, self.known(name))

    def merge(self, names=None):
        names = self.active if names is None else list(names)
        for name in names:
            self.known(name)
            if name not in self.active:
                raise ValueError(
                    f"{where(self.path)}: adapter {name!r} is not active; "
                    "only active adapters can be merged (`set_adapter` it)."
                )
        if any(name not in self.merged for name in names):
            self.layer.check_mergeable()
        merging.merge(self, list(names))
        self.refresh_trainable()

    def unmerge(self, names=None):
        names = list(self.merged) if names is None else list(names)
        for name in names:
            self.known(name)
        merging.unmerge(self, names)
        self.refresh_trainable()

    # --- trainability --------------------------------------------------------------

    def refresh_trainable(self):
        """Factors train while active and unmerged; the kernel never does;
        the bias trains when an active adapter asks for `bias="all"`.

        A stacked layer (serving) trains nothing. A frozen layer
        (`layer.trainable = False`) keeps every variable
        frozen: a parent model collects its sublayers' variables by their
        own flags, so a factor flagged trainable here would still train."""
        layer = self.layer
        for variable in layer._frozen_base_variables():
            variable.trainable = False
        live = self.live() if layer.trainable and self.stack is None else []
        for name in self.specs:
            for key, var in self.variables(name).items():
                var.trainable = (
                    key in self.specs[name].trainable_keys and name in live
                )
        bias = getattr(layer, "bias", None)
        if isinstance(bias, keras.Variable):
            bias.trainable = any(self.specs[n].bias == "all" for n in live)

    # --- helpers -----------------------------------------------------------------------

    @contextlib.contextmanager
    def unlocked(self):
        """Lets the built layer gain or lose variables, under its own path.

        Keras locks a built layer's state; adding adapters after build is a
        deliberate exception (Keras's own `enable_lora` does the same). The
        name scope makes the new variables' paths `<layer.path>/<name>`.
        """
        layer = self.layer
        parent, _, leaf = (layer.path or layer.name).rpartition("/")
        with keras_private.unlocked_state(layer):
            with keras.name_scope(leaf, override_parent=parent):
                yield

    def check_no_dora(self, action, exclude=None):
        """Refuses kernel rewrites while a DoRA adapter, whose norm is taken
        of the kernel, is on the layer."""
        for other, spec in self.specs.items():
            if other != exclude and spec.method == "dora":
                raise ValueError(
                    f"{where(self.path)}: {action}, which would change the "
                    f"DoRA adapter {other!r} (its norm is taken of the "
                    "kernel). Delete the DoRA adapter first, or add the "
                    "PiSSA/OLoRA adapter before it."
                )


def _variable_plan(spec, layout):
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
