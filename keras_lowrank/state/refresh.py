"""The one refresh every verb runs after it changed a model's adapters.

The model's `ModelState` is the source of truth for which adapters are
active (and whether `disable_adapters` switched them all off); each layer's
own active list is derived from it here, never set by a verb directly.
`refresh` then brings everything that depends on the adapter state up to
date, always in this order:

1. the active set: each adapted layer gets the model's active adapters that
   it holds (none while disabled), the values adapters own (task heads,
   biases) are swapped in (`owned.sync`), the stacks of a model served
   from stacked adapters are created, routed or removed (`stacks.sync`),
   and sibling layers that may read one input are grouped for one fused
   `x·[A₁|A₂|…]` product (`shared_input.sync`);
2. trainability (`freezing.set_flags`);
3. the compiled train/test/predict (and KerasHub generate) functions are
   dropped when what they were traced with changed (`graph_signature`:
   which adapters each layer computes or holds merged, their options, the
   variables, the trainable set); Keras re-traces them on the next call,
   unless the model had this graph before and its inference functions were
   kept for it (`compiled.follow`). A verb that only changes values
   (`load_adapter` into an existing adapter of the same shapes, or
   `set_adapter` while the adapters are stacked) keeps them: nothing
   recompiles;
4. a compiled model whose trainable variables changed gets a fresh
   optimizer of the same configuration (`freezing.refresh_optimizer`).

A model left without adapters (`unload`, deleting the last adapter) gets
the trainable flags of a plain model instead of steps 1–2.

Verbs do not call `refresh` themselves: `keras_lowrank.state.transaction`
calls it when a verb's `with transaction(...)` block ends without error,
inside the transaction, so a failing refresh is rolled back too.
"""

from keras_lowrank.integrations import moe
from keras_lowrank.layers import shared_input
from keras_lowrank.state import compiled
from keras_lowrank.state import owned
from keras_lowrank.state import stacks
from keras_lowrank.state.model_state import adapted_layers
from keras_lowrank.state.model_state import adapted_visits
from keras_lowrank.state.model_state import state_of
from keras_lowrank.surgery import freezing


def graph_signature(model, state):
    """Everything a traced train/predict function of `model` depends on
    besides variable *values*: per adapted layer its class, quantization,
    computed and merged adapters and their options, its stack (serving) and
    every variable's identity; the model's trainable and frozen variables,
    in order.

    While the adapters are stacked, which adapter is active (or whether all
    are disabled) is a variable's value, not part of the graph: that is what
    makes switching free."""
    stacked = state.stacked is not None
    visits = adapted_visits(model)
    layers = tuple(
        (
            id(layer), type(layer).__name__, getattr(layer, "quantization_mode", None),
            None if stacked else tuple(layer.active_adapters),
            tuple(layer.merged_adapters),
            tuple((n, layer.adapter_spec(n)) for n in layer.adapter_names),
            tuple(id(v) for v in layer.weights),
        )
        for layer in (visit.layer for visit in visits)
    )
    routing = ("stacked", stacks.signature(visits)) if stacked else (
        state.disabled, tuple(state.active)
    )
    return (
        routing, layers,
        tuple(id(v) for v in model.trainable_variables),
        tuple(id(v) for v in model.non_trainable_variables),
    )


def effective_active(state):
    """The adapters that apply now (`ModelState.applying`)."""
    return state.applying


def push_active(model, state):
    """Step 1: gives every adapted layer the active adapters it holds, in the
    model's order, swaps in the owned values of the active adapters, and
    brings the layers' stacks (serving) up to date (`stacks.sync`)."""
    active = effective_active(state)
    for layer in adapted_layers(model):
        names = layer.adapter_names
        wanted = [n for n in active if n in names]
        if layer.active_adapters != wanted:
            layer.set_active_adapters(wanted)
    owned.sync(model, state)
    stacks.sync(model, state)
    shared_input.sync(model, adapted_visits(model))


def refresh(model, before=None, frozen_before=()):
    """Brings `model` up to date with its adapter state (see the module
    docstring for the order).

    Args:
        model: the model a verb just changed.
        before: `freezing.trainable_ids(model)` taken before the change, or
            `None` to leave the optimizer alone.
        frozen_before: for a model that no longer holds adapters: the paths
            of the layers that were frozen before its first `adapt()`.

    Example:

    >>> import keras, keras_lowrank
    >>> from keras_lowrank.state.refresh import refresh
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8),
    ...                           keras.layers.Dense(2)])
    >>> _ = keras_lowrank.adapt(model, rank=2)
    >>> refresh(model)
    >>> model.layers[0].active_adapters
    ['default']
    """
    # Expert layers left with no adapter go back to their KerasHub class.
    moe.tidy(model)
    state = state_of(model, required=False)
    if state is None:
        freezing.set_plain_flags(model, frozen_before)
        compiled.forget(model)
    else:
        push_active(model, state)
        freezing.set_flags(model, state)
        follow_graph(model, state)
    if before is not None:
        freezing.refresh_optimizer(model, before)


def follow_graph(model, state=None):
    """Step 3 on its own: keeps, drops or brings back the compiled functions
    for the graph `model` has now (`compiled.follow`). A rollback runs it
    after putting the model back."""
    state = state_of(model, required=False) if state is None else state
    compiled.follow(model, None if state is None else graph_signature(model, state))
