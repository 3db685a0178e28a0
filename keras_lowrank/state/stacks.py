"""Keeps every layer's `AdapterStack` in step with the model's `ModelState`.

`ModelState.stacked` (the adapter names, in slot order) says whether the
adapters are stacked for serving; `ModelState.rows` whether each row of the
batch has its own. `sync` is the one place the layers' stacks are created,
routed and removed from that state: the refresh calls it after every verb
(step 1), so the stacks route to the active adapter, or to each row's.

Values: a stack is filled when it is created. While stacked, adapters
cannot be added, deleted, merged or trained (`transaction` and the layers
refuse), so the one verb that changes an adapter's values,
`load_adapter(model, path, name=existing)`, refills its slots (`refill`).
Switching adapters copies nothing: on a large model that keeps a switch at
the cost of assigning a few scalars. Values assigned to adapter variables
by hand while stacked reach the stacks only through `unstack_adapters` and
`stack_adapters`.
"""

from keras_lowrank import errors
from keras_lowrank.layers.adapter_stack import AdapterStack
from keras_lowrank.layers.adapter_stack import rows_unsupported
from keras_lowrank.state.model_state import adapted_visits


def sync(model, state):
    """Creates, fills and routes (or removes) the stacks of `model`'s
    adapted layers as `state.stacked` and `state.rows` say."""
    visits = adapted_visits(model)
    if state.stacked is None:
        remove(visits)
        return
    for visit in visits:
        aset = visit.layer._lowrank
        stack = aset.stack
        wanted = max(
            [aset.specs[n].rank for n in state.stacked if n in aset.specs] or [1]
        )
        if stack is not None and (stack.names, stack.rank) == (state.stacked, wanted):
            continue
        check_stackable(visit.path, visit.layer)
        if stack is not None:
            stack.remove()
        aset.stack = None
        aset.stack = AdapterStack(visit.layer, state.stacked)
    slot, rows = _routing(model, state)
    named = {name for name in state.rows or () if name is not None}
    for visit in visits:
        layer = visit.layer
        if rows is not None and not named & set(layer.adapter_names):
            # None of the batch's adapters is on this layer: every row is
            # the base model here, which needs no per-row product.
            layer._lowrank.stack.route(0)
            continue
        if rows is not None:
            reason = rows_unsupported(layer)
            if reason:
                raise ValueError(reason)
        layer._lowrank.stack.route(slot, rows)


def refill(model, name):
    """Copies adapter `name`'s values into its slot of every stack: what
    `load_adapter` into an existing adapter runs, the one verb that changes
    an adapter's values while the model is stacked."""
    for visit in adapted_visits(model):
        stack = visit.layer._lowrank.stack
        if stack is not None and name in visit.layer.adapter_names:
            stack.fill()


def remove(visits):
    """Deletes the stacks of the layers visited."""
    for visit in visits:
        aset = visit.layer._lowrank
        if aset.stack is not None:
            aset.stack.remove()
            aset.stack = None


def stack_variables(model, routing_only=False):
    """Every variable of `model`'s stacks (for a transaction's snapshot), or
    with `routing_only` just the slot variables (what switching writes)."""
    out = []
    for visit in adapted_visits(model):
        stack = visit.layer._lowrank.stack
        if stack is not None:
            out.extend(
                stack.routing_variables() if routing_only else stack.variables()
            )
    return out


def signature(visits):
    """Per layer, what a traced call of a stacked model depends on."""
    return tuple(
        visit.layer._lowrank.stack.signature()
        if visit.layer._lowrank.stack is not None else None
        for visit in visits
    )


def check_stackable(path, layer):
    """Raises unless every adapter of `layer` can be served from a stack:
    plain low-rank updates (LoRA, rsLoRA, any init that leaves the kernel
    alone), none merged."""
    if layer.merged_adapters:
        raise ValueError(
            f"keras_lowrank: layer '{path}' holds merged adapters "
            f"({layer.merged_adapters}); stacked serving adds the adapters "
            "to the base kernel. Call keras_lowrank.unmerge(model) first."
        )
    for name in layer.adapter_names:
        spec = layer.adapter_spec(name)
        if spec.method != "lora" or spec.rewrites_kernel:
            what = (
                "a DoRA adapter" if spec.method != "lora"
                else f"init={spec.init!r}, which rewrote the kernel"
            )
            raise ValueError(
                f"keras_lowrank: layer '{path}': adapter {name!r} is {what}; "
                "stacked serving needs plain low-rank updates on the base "
                "kernel. Merge it into the base (merge, then unload), or "
                "serve it unstacked with set_adapter."
            )


def _routing(model, state):
    """`(slot, rows)`: the slot every row uses, or each row's slot."""
    if state.rows is not None:
        return 0, [
            0 if name is None else state.stacked.index(name) + 1
            for name in state.rows
        ]
    active = [] if state.disabled else list(state.active)
    if not active:
        return 0, None
    if len(active) > 1:
        raise ValueError(
            f"keras_lowrank: the adapters of model '{model.name}' are "
            "stacked for serving, which runs one adapter per row; "
            f"{active} cannot be active together. Call "
            "keras_lowrank.unstack_adapters(model) first, or "
            "keras_lowrank.combine them into one adapter."
        )
    errors.check_known_adapter(model, active[0], state.stacked, "set_adapter")
    return state.stacked.index(active[0]) + 1, None
