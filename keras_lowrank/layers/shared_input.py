"""One `x·[s₁A₁|s₂A₂|…]` product for sibling adapter layers that read the
same input: attention's query/key/value, an MLP's gate/up.

Three thin `N×d×r` products of one input cost about what one `N×d×3r`
product costs, in the forward pass and twice more in the backward pass
(`dA` and the input gradient, whose three adds become one). Measured on
three 384→384 LoRA layers of one 1024×384 input, forward and backward:
0.63x the separate products on JAX, 0.84x on PyTorch
(see docs/benchmark.md).

How it stays exact and safe:

- A group is the adapted matrix-form siblings (Dense, matrix-form
  EinsumDense) of one parent layer with the same input size, formed by
  `sync` after every verb (the refresh). Where the parent is a Functional or
  Sequential model, its graph says which siblings read one tensor, so a
  chain (`Dense(16)` into `Dense(16)`) is never grouped. Inside a subclassed
  layer (KerasHub's attention and MLP blocks) that is only known when the
  members are called, so the first member called computes every member's
  `x·(s·A)` and keeps them with `x`; a member takes its part only when it
  is called with that very tensor (`is`), in the same forward pass (the
  outermost Keras call, or the `StatelessScope` JAX's trainer runs the model
  in: no variable can change in between), with the same `training` flag.
- A member that reads another tensor (cross-attention's key/value read the
  encoder; Gemma's `ffw_linear` beside its gates; a member called in a
  separate Keras call), or that does not read the product at all, leaves
  the group at that call and computes alone from then on, until the next
  verb forms the groups again; the rest keep sharing. The cost is its
  columns in that one product, and in the graph traced at that call (a
  `fit` on JAX or TensorFlow traced in one call keeps them, unread).
- Only plain LoRA adapters without active dropout fuse (DoRA needs each
  layer's own norm; dropout draws a mask per adapter). A member that does
  not qualify at a call computes alone; the others still share.
- The product is `adapter_math.shared_projections` (each part `x·(s·A)`,
  the scale folded into the `d×r` factor); `B` is applied by each member,
  so the output is the plain formula's up to rounding (tested against it).
"""

import weakref

from keras import ops

from keras_lowrank import adapter_math
from keras_lowrank import keras_private


class InputGroup:
    """Sibling adapter layers that may read one input (see the module
    docstring).

    Args:
        layers: the member layers (`LowRankLayer`s with a matrix-form `A`
            contraction over the same input size).

    Example:

    >>> import keras, keras_lowrank
    >>> x = keras.Input((4,)); q = keras.layers.Dense(3, name="q")
    >>> k = keras.layers.Dense(3, name="k")
    >>> model = keras.Model(x, keras.layers.Add()([q(x), k(x)]))
    >>> _ = keras_lowrank.adapt(model, targets=["q", "k"], rank=2)
    >>> sorted(m.name for m in model.get_layer("q")._lowrank.input_group.members())
    ['k', 'q']
    """

    def __init__(self, layers):
        self._members = [weakref.ref(layer) for layer in layers]
        self.fusing = True
        self.fused_products = 0  # how many fused products were formed
        self._cache = None

    def members(self):
        return [m for m in (ref() for ref in self._members) if m is not None]

    def leave(self, layers):
        """`layers` compute alone from now on; a group of one stops."""
        gone = {id(layer) for layer in layers}
        for layer in layers:
            layer._lowrank.input_group = None
        self._members = [
            ref for ref in self._members
            if ref() is not None and id(ref()) not in gone
        ]
        if len(self._members) < 2:
            for layer in self.members():
                layer._lowrank.input_group = None
            self._members = []
            self.fusing = False
            self._cache = None


class _Fused:
    def __init__(self, context, inputs, training, parts):
        self.context = context
        self.inputs = inputs
        self.training = training
        self.parts = parts  # id(layer) -> (pending names, [x·(s·A) per name])


def sync(model, visits):
    """Forms the input groups of `model`'s adapted layers (`visits`:
    `model_state.adapted_visits(model)`), replacing any earlier ones."""
    groups = {}
    for visit in visits:
        layer = visit.layer
        layer._lowrank.input_group = None
        contracted = layer._rows_contraction()
        if contracted is None or layer._lowrank.stack is not None:
            continue
        parent = visit.parents[-1] if visit.parents else model
        key = (id(parent), contracted, layer._layout().d)
        groups.setdefault(key, []).append(layer)
    for members in groups.values():
        for sharing in _by_graph_input(members):
            if len(sharing) > 1:
                group = InputGroup(sharing)
                for layer in sharing:
                    layer._lowrank.input_group = group


def _by_graph_input(members):
    """`members` split by the tensor each reads in its parent's Functional
    graph; as one list when any of them has none (a subclassed parent)."""
    inputs = []
    for layer in members:
        try:
            inputs.append(id(layer.input))
        except (AttributeError, ValueError):
            return [members]
    split = {}
    for layer, key in zip(members, inputs):
        split.setdefault(key, []).append(layer)
    return list(split.values())


def fusable(layer, pending, training):
    """Whether `layer`'s side path may come from its group's fused product."""
    aset = layer._lowrank
    if aset.input_group is None or aset.stack is not None or aset.replay:
        return False
    for name in pending:
        spec = aset.specs[name]
        if spec.method != "lora" or (spec.dropout and training):
            return False
    return bool(pending)


def own_parts(layer, inputs, pending, training):
    """`[x·(s·A)]` for `layer`'s pending adapters from its group's fused
    product, or `None` when `layer` computes its side path alone."""
    group = layer._lowrank.input_group
    if group is None or not group.fusing or not fusable(layer, pending, training):
        return None
    context = keras_private.current_call_scope()
    fused = group._cache
    if fused is not None and id(layer) in fused.parts:
        names, parts = fused.parts.pop(id(layer))
        same = (
            fused.context is context and fused.inputs is inputs
            and fused.training == training and names == tuple(pending)
        )
        if not fused.parts:
            group._cache = None
        if not same:
            group.leave([layer])
            return None
        return parts
    if fused is not None and fused.parts:
        # Members that did not read the last product leave.
        unread = [m for m in group.members() if id(m) in fused.parts]
        group._cache = None
        group.leave(unread)
        if not group.fusing:
            return None
    return _fuse(group, layer, inputs, training, context)


def _fuse(group, layer, inputs, training, context):
    """The caller `layer` forms the product for every member that qualifies
    now (its own adapters are `layer._lowrank.live()`, the `pending` of
    `forward.call`); keeps the others' parts for them."""
    d = layer._layout().d
    dtype = layer.compute_dtype
    members = [layer] + [
        m for m in group.members()
        if m is not layer and m.compute_dtype == dtype
        and fusable(m, m._lowrank.live(), training)
    ]
    if len(members) < 2:
        return None
    owners = [(m, tuple(m._lowrank.live())) for m in members]
    factors, scales = [], []
    for member, names in owners:
        aset = member._lowrank
        for name in names:
            factors.append(ops.reshape(aset.variables(name)["A"], (d, -1)))
            scales.append(aset.specs[name].scale)
    pieces = iter(adapter_math.shared_projections(
        inputs, factors, scales, dtype, layer._rows_contraction()
    ))
    parts = {
        id(member): (names, [next(pieces) for _ in names])
        for member, names in owners
    }
    group.fused_products += 1
    own = parts.pop(id(layer))[1]
    group._cache = _Fused(context, inputs, training, parts)
    return own
