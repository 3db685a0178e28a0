"""Kernel arithmetic of an `AdapterSet`: initial values, delta, merge,
unmerge, the DoRA norm bookkeeping and the exact-kernel backup.

Several adapters act on the same base kernel `W0` (the kernel with nothing
merged) side by side: a LoRA adapter adds `s·A·B`, a DoRA adapter adds
`(c − 1)·W0 + c·s·A·B` with `c = m/‖W0 + s·A·B‖`. Merging any subset, in any
order, therefore leaves the output unchanged.

Low-precision kernels. A float32/float64 kernel holds `W0 + ΔW` closely
enough that unmerging gives `W0` back to rounding error. A bfloat16 or
float16 kernel does not: rounding `W0 + ΔW` to 8 (or 11) mantissa bits and
subtracting `ΔW` again changed 53 of 128 entries of a test kernel by up to
0.0078, for good. So while any adapter is merged into such a kernel, the
layer keeps a non-trainable copy of the exact unmerged kernel
(`lowrank_unmerged_kernel`, same dtype as the kernel, saved in `.keras`
files); the merged kernel is always `round(W0 + ΣΔW)` from that copy, and a
full unmerge puts the copy back bit for bit and drops it.
"""

from keras import ops

from keras_lowrank import adapter_math
from keras_lowrank import keras_private
from keras_lowrank.layers import quantized

# The layer attribute (and variable name) of the exact-kernel backup.
BACKUP_ATTR = "lowrank_unmerged_kernel"
EXACT_DTYPES = ("float32", "float64")


def float_kernel(aset):
    layer = aset.layer
    if layer.quantization_mode is not None:
        return quantized.dequantized_kernel(layer)
    return layer._kernel_variable()


def _variables(aset, name):
    return aset.variables(name)


# --- initial values -------------------------------------------------------------


def initial_values(aset, spec, seed):
    """Initial `A`, `B` (and `A0`, `B0`, `kernel` for PiSSA/OLoRA); the DoRA
    magnitude is set afterwards, from the final kernel."""
    layer = aset.layer
    layout = layer._layout()
    values = {}
    if spec.rewrites_kernel:
        a, b, residual = adapter_math.kernel_factors(
            spec.init,
            layout.to_matrix(float_kernel(aset)),
            spec.rank,
            spec.scale,
            seed=seed,
        )
        # A0/B0 get their own buffers: on JAX, two variables holding the
        # same array make `fit` fail ("donate the same buffer twice").
        values["A"] = layout.a_from_matrix(a)
        values["B"] = layout.b_from_matrix(b)
        values["A0"] = ops.copy(values["A"])
        values["B0"] = ops.copy(values["B"])
        values["kernel"] = layout.from_matrix(residual)
    else:
        values["A"], values["B"] = layer._data_free_factors(spec, layout, seed)
    return values


def set_initial_magnitude(aset, name, spec):
    """m = ‖W0 + s·A·B‖, computed exactly as `call` computes the norm, so
    that `m/‖·‖ = 1` and the adapted layer starts at the base layer."""
    norm = dora_norm(aset, spec, _variables(aset, name))
    _variables(aset, name)["magnitude"].assign(
        aset.layer._layout().units_from_matrix(norm)
    )


def restore_rewritten_kernel(aset, name, spec):
    """Gives back what a PiSSA/OLoRA init took: `W_res + s·A0·B0 = W`."""
    layer = aset.layer
    layout = layer._layout()
    variables = _variables(aset, name)
    kernel = layer._kernel_variable()
    restored = adapter_math.merge_kernel(
        layout.to_matrix(kernel),
        adapter_math.lowrank_delta(
            layout.a_to_matrix(variables["A0"]),
            layout.b_to_matrix(variables["B0"]),
            spec.scale,
        ),
    )
    kernel.assign(layout.from_matrix(restored))


# --- W0, norms and deltas -------------------------------------------------------------


def base_matrix(aset, rounded=False):
    """`W0`, the kernel without merged adapters, matrix form, float32.

    With `rounded=True` the kernel is first rounded to the compute dtype, as
    Keras hands it to `call` under a mixed precision policy: DoRA's norm is
    always taken of that. While a backup is kept, `W0` is the backup itself.
    """
    layer = aset.layer
    backup = getattr(layer, BACKUP_ATTR, None)
    kernel = backup if backup is not None else float_kernel(aset)
    if rounded:
        kernel = ops.cast(kernel, layer.compute_dtype)
    w = layer._layout().to_matrix(ops.cast(kernel, "float32"))
    if aset.merged and backup is None:
        w = adapter_math.unmerged_base_kernel(w, merged_terms(aset))
    return w


def dora_norm(aset, spec, variables):
    """`‖W0 + s·A·B‖` per output unit, matrix form `(*batch, k)`."""
    layout = aset.layer._layout()
    return adapter_math.dora_weight_norm(
        base_matrix(aset, rounded=True),
        layout.a_to_matrix(variables["A"]),
        layout.b_to_matrix(variables["B"]),
        spec.scale,
    )


def _lowrank_delta(layout, variables, spec):
    return adapter_math.lowrank_delta(
        layout.a_to_matrix(variables["A"]),
        layout.b_to_matrix(variables["B"]),
        spec.scale,
    )


def merge_delta(aset, name, w0):
    """What merging `name` adds to the kernel (matrix form, float32), and
    for DoRA the norm it uses (the stored one while merged)."""
    spec = aset.specs[name]
    variables = _variables(aset, name)
    layout = aset.layer._layout()
    delta = _lowrank_delta(layout, variables, spec)
    if spec.method != "dora":
        return delta, None
    if name in aset.merged:
        norm = layout.units_to_matrix(ops.convert_to_tensor(variables["norm"]))
    else:
        norm = dora_norm(aset, spec, variables)
    magnitude = layout.units_to_matrix(
        ops.convert_to_tensor(variables["magnitude"])
    )
    return adapter_math.dora_merge_delta(w0, delta, magnitude, norm), norm


def merged_terms(aset):
    """`(delta, ratio)` of every merged adapter, for
    `adapter_math.unmerged_base_kernel`."""
    layout = aset.layer._layout()
    terms = []
    for name in aset.merged:
        spec = aset.specs[name]
        variables = _variables(aset, name)
        ratio = None
        if spec.method == "dora":
            ratio = layout.units_to_matrix(
                ops.divide(variables["magnitude"], variables["norm"])
            )
        terms.append((_lowrank_delta(layout, variables, spec), ratio))
    return terms


def delta(aset, name):
    """`ΔW` of adapter `name` in the kernel's own layout (float32)."""
    spec = aset.specs[name]
    w0 = base_matrix(aset) if spec.method == "dora" else None
    d, _ = merge_delta(aset, name, w0)
    return aset.layer._layout().from_matrix(d)


# --- merge and unmerge ---------------------------------------------------------------


def merge(aset, names):
    """Folds `names` (checked, active) into the kernel, skipping merged ones."""
    layer = aset.layer
    todo = [n for n in names if n not in aset.merged]
    if not todo:
        return
    kernel = layer._kernel_variable()
    layout = layer._layout()
    if _needs_backup(layer):
        _create_backup(aset, ops.convert_to_tensor(kernel))
    for name in todo:
        dora = aset.specs[name].method == "dora"
        w0 = base_matrix(aset) if dora else None
        d, norm = merge_delta(aset, name, w0)
        if getattr(layer, BACKUP_ATTR, None) is None:
            w = layout.to_matrix(kernel)
            kernel.assign(layout.from_matrix(adapter_math.merge_kernel(w, d)))
        if dora:
            _variables(aset, name)["norm"].assign(layout.units_from_matrix(norm))
        aset.merged.append(name)
    _rebuild_from_backup(aset)


def unmerge(aset, names):
    """Takes `names` (checked) back out of the kernel, in reverse merge order."""
    layer = aset.layer
    kernel = layer._kernel_variable()
    layout = layer._layout()
    backup = getattr(layer, BACKUP_ATTR, None)
    for name in reversed(list(aset.merged)):
        if name not in names:
            continue
        dora = aset.specs[name].method == "dora"
        if backup is None:
            w0 = base_matrix(aset) if dora else None
            d, _ = merge_delta(aset, name, w0)
            w = layout.to_matrix(kernel)
            kernel.assign(layout.from_matrix(adapter_math.unmerge_kernel(w, d)))
        if dora:
            norm = _variables(aset, name)["norm"]
            norm.assign(ops.zeros(norm.shape, "float32"))
        aset.merged.remove(name)
    if backup is not None and not aset.merged:
        # Bit for bit: the exact kernel was kept aside while merged.
        kernel.assign(backup)
    _rebuild_from_backup(aset)
    sync_backup(aset)


def _rebuild_from_backup(aset):
    """With a backup, the kernel is `round(W0 + ΣΔW)`: one rounding, from
    the exact `W0`, whatever the order of merges and unmerges."""
    layer = aset.layer
    backup = getattr(layer, BACKUP_ATTR, None)
    if backup is None or not aset.merged:
        return
    layout = layer._layout()
    w0 = layout.to_matrix(ops.cast(backup, "float32"))
    w = w0
    for name in aset.merged:
        d, _ = merge_delta(aset, name, w0)
        w = ops.add(w, d)
    kernel = layer._kernel_variable()
    kernel.assign(ops.cast(layout.from_matrix(w), kernel.dtype))


# --- the exact-kernel backup -------------------------------------------------------------


def _needs_backup(layer):
    kernel = layer._kernel_variable()
    return layer.quantization_mode is None and (
        str(kernel.dtype).split(".")[-1] not in EXACT_DTYPES
    )


def _create_backup(aset, value):
    layer = aset.layer
    if getattr(layer, BACKUP_ATTR, None) is not None:
        return
    kernel = layer._kernel_variable()
    with aset.unlocked():
        backup = layer.add_weight(
            name=BACKUP_ATTR,
            shape=tuple(kernel.shape),
            initializer="zeros",
            dtype=kernel.dtype,
            trainable=False,
            autocast=False,
        )
        setattr(layer, BACKUP_ATTR, backup)
    backup.assign(value)


def drop_backup(aset):
    if getattr(aset.layer, BACKUP_ATTR, None) is not None:
        with aset.unlocked():
            keras_private.delete_variable(aset.layer, BACKUP_ATTR)


def unmerged_estimate(aset):
    """`W0` solved from the merged kernel (for a backup that was not saved:
    files written before backups existed); rounded to the kernel dtype."""
    layer = aset.layer
    layout = layer._layout()
    kernel = layer._kernel_variable()
    w = layout.to_matrix(ops.cast(kernel, "float32"))
    w0 = adapter_math.unmerged_base_kernel(w, merged_terms(aset))
    return ops.cast(layout.from_matrix(w0), kernel.dtype)


def sync_backup(aset):
    """Drops the backup once nothing is merged (after the merged set changed
    without `unmerge`: `restore_state`, `forget_adapter`): the kernel is then
    its own base. Backups are created by `merge` and by loading a file that
    holds one (see `LowRankLayer.load_own_variables`), never here, so the
    layer's variables always match what Keras expects to load."""
    if not aset.merged and getattr(aset.layer, BACKUP_ATTR, None) is not None:
        drop_backup(aset)


def prepare_load(aset, stored_keys):
    """Before Keras loads a layer's variables: gives the layer a backup
    variable exactly when the file holds one (Keras checks that the counts
    match)."""
    has = getattr(aset.layer, BACKUP_ATTR, None) is not None
    if BACKUP_ATTR in stored_keys and not has:
        _create_backup(aset, ops.convert_to_tensor(aset.layer._kernel_variable()))
    elif BACKUP_ATTR not in stored_keys and has:
        drop_backup(aset)


def finish_load(aset, store):
    """After loading: the file's backup, or for a low-precision file saved
    merged by an earlier version (no backup in it) one solved from the
    merged kernel, so that unmerging from now on restores that estimate
    exactly."""
    backup = getattr(aset.layer, BACKUP_ATTR, None)
    if backup is not None:
        backup.assign(store[BACKUP_ATTR])
    elif aset.merged and _needs_backup(aset.layer):
        _create_backup(aset, unmerged_estimate(aset))


# --- adapter files ----------------------------------------------------------------------


def for_original_kernel(aset, name):
    """See `LowRankLayer.adapter_for_original_kernel`."""
    spec = aset.specs[name]
    variables = _variables(aset, name)
    values = {
        key: ops.convert_to_tensor(variables[key])
        for key in ("A", "B", "magnitude")
        if key in variables
    }
    if not spec.rewrites_kernel:
        return spec, values
    layout = aset.layer._layout()
    a, b = adapter_math.original_kernel_factors(
        layout.a_to_matrix(variables["A"]),
        layout.b_to_matrix(variables["B"]),
        layout.a_to_matrix(variables["A0"]),
        layout.b_to_matrix(variables["B0"]),
    )
    rank = min(2 * spec.rank, layout.max_rank)
    if rank < 2 * spec.rank:
        a, b = adapter_math.truncate_product(a, b, rank)
    alpha = adapter_math.alpha_for_rank(spec.alpha, spec.rank, rank, spec.scaling)
    values["A"] = layout.a_from_matrix(a)
    values["B"] = layout.b_from_matrix(b)
    return spec.replace(rank=rank, alpha=alpha, init="default"), values
