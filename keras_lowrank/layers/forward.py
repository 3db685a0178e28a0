"""The forward pass of an adapter layer: the side path `s·(x·A)·B`, DoRA,
the inference fold and rematerialisation with adapter dropout.

DoRA and mixed precision: inside `call` Keras hands layers their kernel in
the compute dtype, so the norm `‖W0 + s·A·B‖` is always taken of the kernel
rounded to the compute dtype (then in float32), in `call`, at creation (the
initial `m`) and when merging alike. The adapter's own variables are float32
and never autocast. So `m/‖·‖` is exactly 1 right after creation and the
initial output equals the base output under every dtype policy.

(PEFT scales the outputs of the adapters before a DoRA adapter too when there
is no dropout, and not when there is; with a single adapter, the only case
PEFT files hold, both agree.)
"""

import math

import keras
from keras import ops

from keras_lowrank import adapter_math
from keras_lowrank import keras_private
from keras_lowrank.layers import merging
from keras_lowrank.layers import shared_input


def call(layer, inputs, training=None):
    """`activation(x·W + Σ adapters + bias)` for the active, unmerged adapters."""
    aset = layer._lowrank
    if aset.stack is not None:  # serving: see `adapter_stack`
        return layer._finish_output(aset.stack.output(inputs, training))
    pending = aset.live()
    if pending and folds_for_inference(layer, inputs, pending, training):
        kernel = ops.cast(layer._kernel_variable(), "float32")
        for name in pending:
            kernel = ops.add(kernel, merging.delta(aset, name))
        return layer._finish_output(layer._kernel_output(inputs, kernel))
    base = layer._base_output(inputs)
    outputs = base
    parts = shared_input.own_parts(layer, inputs, pending, training)
    if parts is not None:  # `x·(s·A)` from the siblings' fused product
        for name, h in zip(pending, parts):
            b = ops.cast(aset.variables(name)["B"], layer.compute_dtype)
            outputs = ops.add(
                outputs, ops.cast(layer._contract_b(h, b), outputs.dtype)
            )
        return layer._finish_output(outputs)
    for name in pending:
        outputs = _add_adapter_output(layer, outputs, base, inputs, name, training)
    return layer._finish_output(outputs)


def folds_for_inference(layer, inputs, pending, training):
    """Whether this inference call computes `x·(W + ΣΔW)` instead of
    `x·W + Σ s·(x·A)·B`.

    Both are exact; they differ in memory traffic. The side path re-reads
    the `N×d` input and adds an `N×k` output to another (two thin products);
    folding forms and adds one `d×k` matrix. So it folds when
    `N·(d + k) >= c·d·k`, `c` measured per backend (`FOLD_THRESHOLDS`):
    on MiniLM (N = 1024) under PyTorch and TensorFlow every projection
    folds; under JAX the 384→384 ones fold and the 384↔1536 ones stay on
    the side path; for generation (a few rows) the side path everywhere.
    On MiniLM under PyTorch the side path alone made unmerged inference
    1.27x the base model's. Only for `training=False` (as
    `predict` passes; `fit` passes `training=True`, and training never forms
    `W + ΔW`), for plain LoRA adapters on a float32 compute dtype (a bfloat16
    `W + ΔW` would round small updates away) and an unquantized kernel, and
    with the input shape known.
    """
    if training is not False or not layer._folds_in_inference:
        return False
    if layer.quantization_mode is not None or layer.compute_dtype != "float32":
        return False
    if any(layer._lowrank.specs[name].method != "lora" for name in pending):
        return False
    shape = tuple(inputs.shape)
    if any(n is None for n in shape):
        return False
    layout = layer._layout()
    rows = math.prod(shape) // max(1, layout.d * math.prod(layout.batch_shape))
    # The side path re-reads the input and adds to the output, about
    # N·(d + k) values more than the base; folding forms and adds one d×k
    # matrix. Fold when that moves less, as weighed on this backend.
    threshold = FOLD_THRESHOLDS.get(keras.config.backend(), 1.0)
    return rows * (layout.d + layout.k) >= threshold * layout.d * layout.k


# `c` in `N·(d + k) >= c·d·k` where it is not 1: how much more side-path
# traffic than folding traffic this backend bears before folding pays.
# JAX: unmerged MiniLM inference (8×128, LoRA r=8 on every projection,
# `scripts/bench_inference_fold.py`, a 2-core Xeon, 2026-12-08) was 1.15x
# the base folding all, 1.11-1.13x folding none and 1.08x folding only the
# 384→384 projections (N·(d+k)/(d·k) = 5.3) with the 384↔1536 ones (3.3) on
# the side path (a 2-core EPYC: 1.21x folding all, 1.13-1.18x none). On the
# 384→1536 shape alone, jitted, folding was the cheaper: what a whole model
# streams through the cache decides. PyTorch and TensorFlow were fastest
# folding all (1.10x / 1.07x).
FOLD_THRESHOLDS = {"jax": 4.0}


def rematerialized(layer, keras_remat, layer_call):
    """See `LowRankLayer.rematerialized_call`."""
    aset = layer._lowrank

    def remat_call(*call_args, **call_kwargs):
        seeds = _draw_dropout_seeds(aset, call_kwargs.get("training"))

        def inner(*tensors):
            drawn = tensors[len(call_args):]
            aset.replay = dict(zip(seeds, drawn))
            try:
                return layer_call(*tensors[: len(call_args)], **call_kwargs)
            finally:
                aset.replay = {}

        remat_fn = keras_remat(inner, *call_args, **call_kwargs)
        return remat_fn(*call_args, *seeds.values())

    return remat_call


def _draw_dropout_seeds(aset, training):
    if not training or aset.seed is None:
        return {}
    return {
        name: aset.seed.next()
        for name in aset.live()
        if aset.specs[name].dropout
    }


def _dropout_seed(aset, name):
    if name in aset.replay:
        return keras_private.FixedSeed(aset.replay[name])
    return aset.seed


def _add_adapter_output(layer, outputs, base, inputs, name, training):
    aset = layer._lowrank
    spec = aset.specs[name]
    variables = aset.variables(name)
    dropped = adapter_math.adapter_dropout(
        inputs, spec.dropout, training, _dropout_seed(aset, name)
    )
    b = variables["B"]
    if spec.method == "dora":
        layout = layer._layout()
        norm = merging.dora_norm(aset, spec, variables)
        ratio = ops.divide(variables["magnitude"], layout.units_from_matrix(norm))
        b = adapter_math.dora_scaled_b(b, ratio, len(layout.batch_shape))
    lowrank = side_output(layer, dropped, variables["A"], b, spec, outputs.dtype)
    if spec.method == "lora":
        return ops.add(outputs, lowrank)
    # Without dropout x_d·W is the x·W already computed: no second matmul.
    base_dropped = base if dropped is inputs else layer._base_output(dropped)
    if aset.merged:
        base_dropped = _unmerged_base_output(layer, dropped, base_dropped)
    return adapter_math.dora_combine(
        outputs,
        base_dropped,
        lowrank,
        layer._units_to_output(ratio, len(outputs.shape)),
    )


def side_output(layer, x, a, b, spec, dtype):
    """`s·(x·A)·B` through the layer's contractions, cast to `dtype`."""
    part = adapter_math.lowrank_contribution(
        x,
        a,
        b,
        spec.scale,
        contract_a=layer._contract_a,
        contract_b=layer._contract_b,
        dtype=layer.compute_dtype,
    )
    return ops.cast(part, dtype)


def _unmerged_base_output(layer, x, y):
    """`x·W0` from `y = x·W`, W holding merged adapters, in low rank.

    `x·W = (x·W0)·(1 + Σ_j (c_j − 1)) + Σ_i s·(x·A_i)·B_i
    + Σ_j c_j·s·(x·A_j)·B_j` over merged LoRA adapters `i` and DoRA adapters
    `j` (see `adapter_math.unmerged_base_kernel`), solved for `x·W0` per
    output unit, with no kernel-sized temporary.
    """
    aset = layer._lowrank
    rho = None
    for name in aset.merged:
        spec = aset.specs[name]
        variables = aset.variables(name)
        part = side_output(layer, x, variables["A"], variables["B"], spec, y.dtype)
        if spec.method == "dora":
            c = ops.cast(
                layer._units_to_output(
                    ops.divide(variables["magnitude"], variables["norm"]),
                    len(y.shape),
                ),
                y.dtype,
            )
            part = ops.multiply(c, part)
            rho = c if rho is None else ops.add(rho, c - 1.0)
        y = ops.subtract(y, part)
    return y if rho is None else ops.divide(y, rho)
