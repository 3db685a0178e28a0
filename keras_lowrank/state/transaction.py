"""Every verb is a transaction: all of it happens, or none of it.

A verb that changes a model (`adapt`, `unload`, `merge`, `unmerge`,
`set_adapter`, `delete_adapter`, `disable_adapters`, `combine`, and the file
loaders) runs its changes inside

    with transaction(model, "merge", kernels=layers):
        ...change layers, kernels and `model._keras_lowrank`...

On entry the transaction takes a `Snapshot` of everything the verb may
change; when the block raises anything at all (a refusal, `MemoryError`, a
bad file, `KeyboardInterrupt`), the snapshot is put back and the error goes
on. When the block ends normally, the transaction runs
`keras_lowrank.state.refresh.refresh` (active set, trainability, compiled
functions, optimizer), still under its protection.

What the snapshot holds, and puts back exactly:

- the model's class (plain or adapted) and its `ModelState` (options,
  active set, owned values and their stash);
- for each of `layers` (default: every adapted layer; pass the plain layers
  a verb will convert too): its class, its adapters in order with their
  specs and the values of all their variables, and its active and merged
  adapters. Adapters the verb deleted are created again with their exact
  values; adapters it added are removed;
- the trainable flag of every layer and every weight of the model;
- the values of the weights adapters own (heads, biases), and of
  `variables`;
- the kernels of `kernels`: a verb lists the layers whose kernel it may
  write. Kernels are large, so nothing else is copied: merge and unmerge
  write kernels, and so do adapters whose `spec.rewrites_kernel` is true
  (PiSSA, OLoRA, `pissa_niter_<n>`) when they are created or deleted.
- the model's optimizer object.

How a verb uses it:

1. check its arguments (cheap refusals need no snapshot);
2. `with transaction(model, "<verb>", layers=..., kernels=...,
   variables=...):` around every change; set `model._keras_lowrank.active`
   rather than each layer's active list (the refresh pushes it);
3. nothing after the block but freeing memory (`gc.collect()`).

A transaction opened while another is open on the same model (`install`
inside `combine`) joins it: it adds what it protects to the outer snapshot,
and the outer transaction rolls back and refreshes. Verbs that change the
adapters are refused inside `disable_adapters` (its exit could not put the
model back otherwise); pass `while_disabled=True` for the ones that only
read, or for `disable_adapters` itself.

Verbs that write files (`save_adapter`, `export_peft_adapter`) only read
the model: they gather what they write inside `transaction(...,
read_only=True)` (no refresh afterwards: a callback may save in the middle
of `fit`) and write the file or folder atomically after the block.
"""

import contextlib
import copy

import keras
import numpy as np

from keras_lowrank import keras_private
from keras_lowrank.layers import LowRankLayer
from keras_lowrank.layers import adapter_class_for
from keras_lowrank.layers import quantized as quantization
from keras_lowrank.layers import shared_input
from keras_lowrank.state import owned
from keras_lowrank.io.keras_file import AdaptedModel
from keras_lowrank.state.model_state import adapted_layers
from keras_lowrank.io.keras_file import mark_adapted
from keras_lowrank.state.model_state import state_of
from keras_lowrank.io.keras_file import unmark_adapted
from keras_lowrank.state import stacks
from keras_lowrank.state.model_state import adapted_visits
from keras_lowrank.state.refresh import follow_graph
from keras_lowrank.state.refresh import refresh
from keras_lowrank.surgery import freezing
from keras_lowrank.surgery.walk import sublayers
from keras_lowrank.surgery.walk import walk

# id(model) -> the open outermost transaction's Snapshot.
_OPEN = {}


@contextlib.contextmanager
def transaction(
    model, verb, layers=None, kernels=(), variables=(), while_disabled=False,
    read_only=False, while_stacked=False, switch_only=False,
):
    """Runs the block as one all-or-nothing change of `model`.

    Args:
        model: the model the verb changes (adapted or not yet).
        verb: the verb's name, for messages (`"merge"`).
        layers: the layers whose adapter state the verb may change (default:
            every adapted layer of `model`; adapted layers are always
            included).
        kernels: the layers whose kernel the verb may write.
        variables: further variables whose values the verb may change.
        while_disabled: allow the verb inside `disable_adapters` (and
            `per_example_adapters`).
        while_stacked: allow the verb while the adapters are stacked for
            serving (it switches adapters or replaces their values; verbs
            that add, delete, merge or unmerge adapters are refused then).
        switch_only: the verb only changes which adapters are active
            (`set_adapter`): it neither adds, deletes nor writes adapters,
            so the snapshot skips their values and the stacks' slots (a
            switch among stacked adapters then copies almost nothing).
        read_only: the verb only reads the model (`save_adapter`,
            `export_peft_adapter`; at most it adopts a cloned model's
            state): allowed inside `disable_adapters`, and no refresh after
            the block, so saving from a callback in the middle of `fit`
            leaves the running train function alone.

    Yields:
        The `Snapshot` (`.before`: the trainable variables' ids on entry).

    Example:

    >>> import keras, keras_lowrank
    >>> from keras_lowrank.state.transaction import transaction
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8),
    ...                           keras.layers.Dense(2)])
    >>> _ = keras_lowrank.adapt(model, rank=2)
    >>> try:
    ...     with transaction(model, "example"):
    ...         model._keras_lowrank.active = []
    ...         raise MemoryError("out of memory")
    ... except MemoryError:
    ...     pass
    >>> model._keras_lowrank.active
    ['default']
    """
    outer = _OPEN.get(id(model))
    if outer is not None:
        outer.extend(layers or (), kernels, variables)
        yield outer
        return
    if not (while_disabled or read_only):
        check_not_disabled(model, verb)
    if not (while_stacked or read_only):
        check_not_stacked(model, verb)
    snapshot = Snapshot(model, layers or (), kernels, variables, switch_only)
    _OPEN[id(model)] = snapshot
    try:
        yield snapshot
        if not read_only:
            refresh(model, snapshot.before, snapshot.frozen_before)
    except BaseException:
        snapshot.restore()
        raise
    finally:
        del _OPEN[id(model)]


def check_not_disabled(model, verb):
    """Raises if `model` is inside `disable_adapters` or
    `per_example_adapters`: `verb` would change adapters that the context's
    exit must put back as they were."""
    state = state_of(model, required=False)
    if state is not None and state.rows is not None:
        raise ValueError(
            f"keras_lowrank: {verb}() was called inside "
            f"`keras_lowrank.per_example_adapters(model, ...)` on model "
            f"'{model.name}', where each row of the batch has its adapter. "
            f"Leave the context first, then call {verb}()."
        )
    if state is not None and state.disabled:
        raise ValueError(
            f"keras_lowrank: {verb}() was called inside "
            f"`keras_lowrank.disable_adapters(model)` on model "
            f"'{model.name}'. The context switches every adapter off for its "
            "duration and puts them back on exit; leave the context first, "
            f"then call {verb}()."
        )


def check_not_stacked(model, verb):
    """Raises if `model`'s adapters are stacked for serving: `verb` would
    add, delete, merge or unmerge adapters, which the stacks copy."""
    state = state_of(model, required=False)
    if state is not None and state.stacked is not None:
        raise ValueError(
            f"keras_lowrank: {verb}() was called while the adapters of model "
            f"'{model.name}' are stacked for serving "
            "(keras_lowrank.stack_adapters). Call "
            f"keras_lowrank.unstack_adapters(model), then {verb}(), then "
            "stack_adapters again."
        )


class Snapshot:
    """Everything a verb may change in a model; `restore()` puts it back.

    See the module docstring for what is kept. Built by `transaction`.
    """

    def __init__(self, model, layers=(), kernels=(), variables=(),
                 switch_only=False):
        self.model = model
        self.switch_only = switch_only
        self.model_class = type(model)
        self.state = state_of(model, required=False)
        self.state_dict = (
            None if self.state is None else copy.deepcopy(self.state.__dict__)
        )
        self.frozen_before = (
            [] if self.state is None else list(self.state.frozen_before)
        )
        self.before = freezing.trainable_ids(model)
        self.optimizer = getattr(model, "optimizer", None)
        self.layer_flags = [(v.layer, v.layer.trainable) for v in walk(model)]
        self.weight_flags = [(w, w.path, w.trainable) for w in model.weights]
        self.layers = {}
        self.values = {}
        self.quantized = {}
        owned_keys = [] if self.state is None else owned.all_keys(self.state)
        owned_vars = owned.resolve(model, owned_keys).values() if owned_keys else ()
        stacked = stacks.stack_variables(model, routing_only=switch_only)
        self.extend(list(adapted_layers(model)) + list(layers), kernels,
                    list(variables) + list(owned_vars) + stacked)

    def extend(self, layers=(), kernels=(), variables=()):
        """Adds more to the snapshot (a joined transaction's share). What is
        already in it keeps its first value."""
        for layer in layers:
            if id(layer) not in self.layers:
                self.layers[id(layer)] = (
                    layer, type(layer),
                    _adapters_of(layer, values=not self.switch_only),
                )
        for layer in kernels:
            self._keep(adapter_class_for(layer).kernel_variable(layer))
            # merge(quantized="dequantize") swaps an integer kernel for a
            # float one: a rollback must quantize it again, exactly.
            if id(layer) not in self.quantized:
                saved = quantization.backup(layer)
                if saved is not None:
                    self.quantized[id(layer)] = (layer, saved)
        for variable in variables:
            self._keep(variable)

    def _keep(self, variable):
        if id(variable) not in self.values:
            self.values[id(variable)] = (variable, _to_numpy(variable))

    def restore(self):
        """Puts the model back as it was when the snapshot was taken."""
        model = self.model
        for layer, cls, saved in self.layers.values():
            _restore_layer(layer, cls, saved)
        for variable, value in self.values.values():
            variable.assign(value)
        for layer, saved in self.quantized.values():
            quantization.restore_backup(layer, saved)
        if self.state is None:
            unmark_adapted(model)
            if getattr(model, "_keras_lowrank", None) is not None:
                del model._keras_lowrank
        else:
            self.state.__dict__.clear()
            self.state.__dict__.update(copy.deepcopy(self.state_dict))
            if getattr(model, "_keras_lowrank", None) is not self.state:
                model._keras_lowrank = self.state
            if issubclass(self.model_class, AdaptedModel):
                mark_adapted(model)
        if type(model) is not self.model_class:
            keras_private.swap_class(model, self.model_class)
        # The stacks (serving) are derived from the state: bring them back
        # in step with the state put back (a stacking that failed half-way
        # leaves none behind).
        if self.state is None or self.state.stacked is None:
            stacks.remove(adapted_visits(model))
        else:
            stacks.sync(model, self.state)
        shared_input.sync(model, adapted_visits(model))
        self._restore_flags()
        if self.optimizer is not None and model.optimizer is not self.optimizer:
            model.optimizer = self.optimizer
        follow_graph(model)
        if freezing.trainable_ids(model) != self.before:
            # Adapters created again have new variables: an optimizer built
            # for the old ones cannot train them.
            freezing.refresh_optimizer(model, self.before)

    def _restore_flags(self):
        # Containers first (outer before inner), then leaves: setting a
        # container's flag recurses into every layer under it, so leaves
        # must come last to keep their own flags.
        for leaves in (False, True):
            for layer, flag in self.layer_flags:
                if (not sublayers(layer)) == leaves:
                    layer.trainable = flag
        by_path = {}
        alive = {id(w) for w in self.model.weights}
        for weight, path, flag in self.weight_flags:
            if id(weight) in alive:
                weight.trainable = flag
            else:
                by_path[path] = flag
        if by_path:  # variables of adapters that were created again
            for weight in self.model.weights:
                if weight.path in by_path:
                    weight.trainable = by_path[weight.path]


def _adapters_of(layer, values=True):
    """`(adapters, active, merged)` of an adapter layer, `adapters` being
    `[(name, spec, {key: array})]` in order (`{}` without `values`); `None`
    for a plain layer."""
    if not isinstance(layer, LowRankLayer):
        return None
    adapters = [
        (
            name,
            layer.adapter_spec(name),
            {k: _to_numpy(v) for k, v in layer.adapter_variables(name).items()}
            if values else {},
        )
        for name in layer.adapter_names
    ]
    return adapters, layer.active_adapters, layer.merged_adapters


def _restore_layer(layer, cls, saved):
    """Gives `layer` back its class and adapters (kernels are restored with
    the other values afterwards: nothing here writes one)."""
    if saved is None:
        if isinstance(layer, LowRankLayer):
            for name in layer.adapter_names:
                layer.forget_adapter(name)
            type(layer).revert(layer)
        return
    adapters, active, merged = saved
    cls.become(layer)
    current = layer.adapter_names
    names = [name for name, _, _ in adapters]
    # Keep the longest common prefix; the rest goes and comes back in order
    # (variable creation order is the order of `model.weights`).
    keep = 0
    while keep < min(len(current), len(names)) and current[keep] == names[keep]:
        keep += 1
    for name in current[keep:]:
        layer.forget_adapter(name)
    for name, spec, _ in adapters[keep:]:
        layer.add_adapter(name, spec, restore=True)
    for name, _, values in adapters:
        variables = layer.adapter_variables(name)
        for key, value in values.items():
            variables[key].assign(value)
    layer.restore_state(active, merged)


def _to_numpy(variable):
    return np.array(keras.ops.convert_to_numpy(variable))
