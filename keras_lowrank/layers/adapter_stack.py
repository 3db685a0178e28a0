"""`AdapterStack`: one layer's adapters stacked for serving.

`keras_lowrank.stack_adapters(model)` gives every adapted layer one (as
`layer._lowrank.stack`). It holds a copy of the layer's adapters in two
variables, `A (S, *a_shape(R))` and `B (S, *b_shape(R))`: slot 0 is zeros
(the base model), slot `i` the model's `i`-th adapter padded with zeros to
the layer's largest rank `R`, its scale folded into `B`
(`adapter_math.stacked_slot`). A layer without that adapter keeps zeros in
its slot. Which slot applies is a variable too:

- `slot`, an int32 scalar: every row uses that slot (`set_adapter`);
- `rows`, int32 `(N,)`, while `per_row` is on: row `n` uses slot `rows[n]`
  (`per_example_adapters`), through `adapter_math.rows_lowrank_contribution`.

So switching adapters, or which rows use which, assigns a variable: the
traced graph is the same and nothing recompiles. The variables are
`lowrank_stack_*` attributes (tracked, so JAX's stateless calls see their
current values) but never saved: the layers write their base and adapter
variables by name.

Only inference: under `training=True` the layer refuses, since a stack is a
copy (training it would leave the adapters behind).
"""

import numpy as np
from keras import ops

from keras_lowrank import adapter_math
from keras_lowrank import errors
from keras_lowrank import keras_private
from keras_lowrank.layers import forward
from keras_lowrank.spec import where

A_ATTR, B_ATTR = "lowrank_stack_A", "lowrank_stack_B"
SLOT_ATTR, ROWS_ATTR = "lowrank_stack_slot", "lowrank_stack_rows"


class AdapterStack:
    """A layer's adapters stacked in slots (see the module docstring).

    Args:
        layer: the adapter layer.
        names: the model's adapter names; slot `i + 1` is `names[i]`.

    Example:

    >>> from keras_lowrank import LowRankDense
    >>> layer = LowRankDense(4, rank=2)
    >>> layer.build((None, 3))
    >>> stack = AdapterStack(layer, ["default"])
    >>> tuple(stack.a.shape), tuple(stack.b.shape), stack.rank
    ((2, 3, 2), (2, 2, 4), 2)
    >>> stack.remove()
    """

    def __init__(self, layer, names):
        aset = layer._lowrank
        self.layer = layer
        self.names = list(names)
        self.per_row = False
        self.rank = max(
            [aset.specs[n].rank for n in self.names if n in aset.specs] or [1]
        )
        layout = layer._layout()
        slots = len(self.names) + 1
        created = []
        try:
            with aset.unlocked():
                for attr, shape, dtype in (
                    (A_ATTR, (slots,) + layout.a_shape(self.rank), "float32"),
                    (B_ATTR, (slots,) + layout.b_shape(self.rank), "float32"),
                    (SLOT_ATTR, (), "int32"),
                ):
                    setattr(layer, attr, _variable(layer, attr, shape, dtype))
                    created.append(attr)
        except BaseException:
            self._delete(created)
            raise
        self.fill()

    @property
    def a(self):
        return getattr(self.layer, A_ATTR)

    @property
    def b(self):
        return getattr(self.layer, B_ATTR)

    @property
    def rows(self):
        return getattr(self.layer, ROWS_ATTR, None)

    def variables(self):
        """The stack's variables (what a transaction snapshots)."""
        attrs = (A_ATTR, B_ATTR, SLOT_ATTR, ROWS_ATTR)
        return [getattr(self.layer, a) for a in attrs if hasattr(self.layer, a)]

    def routing_variables(self):
        """The variables that say which slot applies (all a switch writes)."""
        attrs = (SLOT_ATTR, ROWS_ATTR)
        return [getattr(self.layer, a) for a in attrs if hasattr(self.layer, a)]

    def signature(self):
        """What a traced call depends on: slots, rank, the row mode."""
        return (
            tuple(self.names), self.rank, self.per_row,
            tuple(id(v) for v in self.variables()),
        )

    # --- values ----------------------------------------------------------------

    def fill(self):
        """Copies the layer's adapters into their slots (values only)."""
        aset, layout = self.layer._lowrank, self.layer._layout()
        a = np.zeros(self.a.shape, "float32")
        b = np.zeros(self.b.shape, "float32")
        for slot, name in enumerate(self.names, start=1):
            if name not in aset.specs:
                continue
            spec, factors = aset.specs[name], aset.variables(name)
            a[slot], b[slot] = adapter_math.stacked_slot(
                factors["A"], factors["B"], spec.scale, self.rank,
                len(layout.batch_shape),
            )
        self.a.assign(a)
        self.b.assign(b)

    def route(self, slot, rows=None):
        """Every row to `slot`, or (with `rows`, a list of slots, one per
        row) each row to its own. A `rows` variable of the same length is
        reused, so the traced graph stays the same."""
        getattr(self.layer, SLOT_ATTR).assign(slot)
        self.per_row = rows is not None
        if rows is None:
            return
        current = self.rows
        if current is None or tuple(current.shape) != (len(rows),):
            aset = self.layer._lowrank
            with aset.unlocked():
                if current is not None:
                    keras_private.delete_variable(self.layer, ROWS_ATTR)
                setattr(
                    self.layer, ROWS_ATTR,
                    _variable(self.layer, ROWS_ATTR, (len(rows),), "int32"),
                )
        self.rows.assign(np.asarray(rows, "int32"))

    def remove(self):
        """Deletes the stack's variables from the layer."""
        self._delete([a for a in (A_ATTR, B_ATTR, SLOT_ATTR, ROWS_ATTR)
                      if hasattr(self.layer, a)])

    def _delete(self, attrs):
        with self.layer._lowrank.unlocked():
            for attr in attrs:
                keras_private.delete_variable(self.layer, attr)

    # --- the forward pass --------------------------------------------------------

    def output(self, inputs, training):
        """`x·W + (x·A_slot)·B_slot` (per row while `per_row`), before the
        bias and activation; `x·(W + A_slot·B_slot)` when the unstacked
        layer would fold too (`forward.folds_for_inference`)."""
        layer = self.layer
        if training:
            raise errors.stacked_training(where(layer.path))
        if not self.per_row:
            a, b = self.routed()
            if forward.folds_for_inference(layer, inputs, [], training):
                # As unstacked: x·(W + A·B) moves less memory for many rows.
                layout = layer._layout()
                delta = adapter_math.lowrank_delta(
                    layout.a_to_matrix(a), layout.b_to_matrix(b), 1.0
                )
                kernel = ops.add(
                    ops.cast(layer._kernel_variable(), "float32"),
                    layout.from_matrix(delta),
                )
                return layer._kernel_output(inputs, kernel)
        base = layer._base_output(inputs)
        if self.per_row:
            side = self._rows_output(inputs)
        else:
            side = adapter_math.lowrank_contribution(
                inputs, a, b, 1.0,
                contract_a=layer._contract_a, contract_b=layer._contract_b,
                dtype=layer.compute_dtype,
            )
        return ops.add(base, ops.cast(side, base.dtype))

    def routed(self):
        """`(A, B)` of the slot every row uses (the scale is in `B`)."""
        return adapter_math.routed_factors(
            self.a, self.b, getattr(self.layer, SLOT_ATTR)
        )

    def _rows_output(self, inputs):
        layer, layout = self.layer, self.layer._layout()
        rows = self.rows
        if inputs.shape[0] is not None and inputs.shape[0] != rows.shape[0]:
            raise ValueError(
                f"{where(layer.path)}: per_example_adapters was given "
                f"{rows.shape[0]} adapter names, but this call has "
                f"{inputs.shape[0]} rows. Pass one name per row of the batch."
            )
        slots = self.a.shape[0]
        return adapter_math.rows_lowrank_contribution(
            inputs,
            ops.reshape(self.a, (slots, layout.d, self.rank)),
            ops.reshape(self.b, (slots, self.rank, layout.k)),
            rows,
            contracted_ndim=layer._rows_contraction(),
            out_shape=layout.out_shape,
            dtype=layer.compute_dtype,
        )


def rows_unsupported(layer):
    """Why `layer` cannot route rows to different adapters, or `None`."""
    if layer._rows_contraction() is None or layer._layout().batch_shape:
        return (
            f"{where(layer.path)}: a {type(layer).__name__} cannot give each "
            "row of a batch its own adapter (mixed batches cover Dense and "
            "matrix-form EinsumDense layers). Leave this layer out of the "
            "adapters you serve this way, or switch adapters with "
            "set_adapter."
        )
    return None


def _variable(layer, name, shape, dtype):
    return layer.add_weight(
        name=name, shape=shape, initializer="zeros", dtype=dtype,
        trainable=False, autocast=False,
    )
