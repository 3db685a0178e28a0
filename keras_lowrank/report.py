"""`report(model)`: what was adapted, at what cost, in numbers and as a table."""

import dataclasses
import math

from keras_lowrank.state import stacks
from keras_lowrank.state.model_state import adapted_visits
from keras_lowrank.state.model_state import state_of


@dataclasses.dataclass(frozen=True)
class AdapterRow:
    """One adapter on one layer.

    Attributes:
        path: the layer's path inside the model.
        adapter: the adapter's name.
        kernel_shape: the base kernel's shape.
        dk: the kernel's size `d·k` (times any batch axes).
        rdk: the adapter's factor size `r·(d+k)` (times any batch axes);
            for token rows, the rows' size `n·k`.
        params: every variable the adapter trains (factors, DoRA
            magnitude; for token rows, the rows' change).
        rank, alpha, scaling, method: the adapter's options; `method` is
            `"tokens"` for a token-rows adapter.
        active, merged: its state on this layer.
        experts: for an MoE expert kernel `(E, d, k)`, `E` (its factors are
            `E` separate `r·(d+k)`); 0 for other layers.
    """

    path: str
    adapter: str
    kernel_shape: tuple
    dk: int
    rdk: int
    params: int
    rank: int
    alpha: float
    scaling: str
    method: str
    active: bool
    merged: bool
    experts: int = 0


@dataclasses.dataclass(frozen=True)
class AdapterReport:
    """The result of `report()`; `print()` it for a table.

    Attributes:
        rows: one `AdapterRow` per adapter per layer, in model order.
        trainable_params: parameters that train now.
        frozen_params: parameters that do not.
        adapter_params: parameters held by all adapters.
        adapted_kernel_params: `d·k` summed over the adapted kernels.
        stacked_values: values in the serving stacks (`stack_adapters`):
            copies of the adapters, counted in neither total.
    """

    rows: tuple
    trainable_params: int
    frozen_params: int
    adapter_params: int
    adapted_kernel_params: int
    stacked_values: int = 0

    @property
    def total_params(self):
        return self.trainable_params + self.frozen_params

    def __str__(self):
        header = (
            "path", "adapter", "kernel", "d·k", "r·(d+k)", "rank", "alpha",
            "scaling", "method", "state",
        )
        body = [
            (
                row.path,
                row.adapter,
                "x".join(str(n) for n in row.kernel_shape),
                f"{row.dk:,}",
                f"{row.rdk:,}",
                str(row.rank),
                f"{row.alpha:g}",
                row.scaling,
                row.method,
                "merged" if row.merged else ("active" if row.active else "off"),
            )
            for row in self.rows
        ]
        experts = any(row.experts for row in self.rows)
        if experts:
            # MoE models only: each expert's share of the factors, which is
            # what one token routed to it trains.
            header += ("per expert",)
            body = [
                cells + (f"{row.rdk // row.experts:,}" if row.experts else "",)
                for cells, row in zip(body, self.rows)
            ]
        widths = [
            max(len(str(cell)) for cell in column)
            for column in zip(header, *body)
        ]
        line = lambda cells: "  ".join(  # noqa: E731
            str(c).ljust(w) for c, w in zip(cells, widths)
        ).rstrip()
        total = self.total_params or 1
        lines = [line(header), line("-" * w for w in widths)]
        lines += [line(cells) for cells in body]
        lines += [
            "",
            f"adapter parameters:   {self.adapter_params:,} "
            f"({100 * self.adapter_params / max(self.adapted_kernel_params, 1):.2f}% "
            f"of the {self.adapted_kernel_params:,} adapted kernel parameters)",
            f"trainable parameters: {self.trainable_params:,} "
            f"({100 * self.trainable_params / total:.2f}% of {self.total_params:,})",
            f"frozen parameters:    {self.frozen_params:,}",
        ]
        if experts:
            lines.append(
                "expert kernels: a step changes only the factors of the "
                "experts that received tokens"
            )
        if self.stacked_values:
            lines.append(
                f"stacked for serving:  {self.stacked_values:,} values "
                "(copies of the adapters; unstack_adapters frees them)"
            )
        return "\n".join(lines)

    def _repr_pretty_(self, printer, cycle):
        printer.text(str(self))


def _is_expert_kernel(layer):
    from keras_lowrank.layers import LowRankExpertKernel

    return isinstance(layer, LowRankExpertKernel)


def report(model):
    """Per adapted layer: path, kernel shape, `d·k`, `r·(d+k)`, rank, alpha,
    scaling; and the totals, trainable and frozen.

    Args:
        model: an adapted model.

    Returns:
        An `AdapterReport`; `print(report(model))` shows a table.

    Example:

    >>> import keras, keras_lowrank
    >>> model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(32),
    ...                           keras.layers.Dense(2)])
    >>> r = keras_lowrank.report(keras_lowrank.adapt(model, rank=4))
    >>> r.rows[0].dk, r.rows[0].rdk, r.trainable_params
    (512, 192, 192)
    """
    state_of(model)
    rows = []
    adapted_kernels = 0
    for visit in adapted_visits(model):
        layer = visit.layer
        layout = layer.lowrank_layout
        batch = math.prod(layout.batch_shape)
        dk = batch * layout.d * layout.k
        adapted_kernels += dk
        for name in layer.adapter_names:
            spec = layer.adapter_spec(name)
            params = sum(
                math.prod(var.shape)
                for key, var in layer.adapter_variables(name).items()
                if key in spec.trainable_keys
            )
            rows.append(
                AdapterRow(
                    path=visit.path,
                    adapter=name,
                    kernel_shape=tuple(layout.kernel_shape),
                    dk=dk,
                    # A token-rows adapter's A is a fixed selection: its
                    # size is its rows, n·width.
                    rdk=batch * spec.rank * (
                        layout.k if spec.is_token_rows else layout.d + layout.k
                    ),
                    params=int(params),
                    rank=spec.rank,
                    alpha=float(spec.alpha),
                    scaling=spec.scaling,
                    method="tokens" if spec.is_token_rows else spec.method,
                    active=name in layer.active_adapters,
                    merged=name in layer.merged_adapters,
                    experts=batch if _is_expert_kernel(layer) else 0,
                )
            )
    trainable = sum(math.prod(w.shape) for w in model.trainable_weights)
    stacked = sum(math.prod(v.shape) for v in stacks.stack_variables(model))
    frozen = sum(math.prod(w.shape) for w in model.non_trainable_weights) - stacked
    return AdapterReport(
        rows=tuple(rows),
        trainable_params=int(trainable),
        frozen_params=int(frozen),
        adapter_params=int(sum(row.params for row in rows)),
        adapted_kernel_params=int(adapted_kernels),
        stacked_values=int(stacked),
    )
