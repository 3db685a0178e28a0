"""The adapter math of keras_lowrank: every formula lives here, in `keras.ops`.

One package, one module per job: `lowrank` (scaling, the side output, `ΔW`,
merging, combining), `dora` (DoRA's norm and recombination), `init` (the
initialisers), `routing` (adapters stacked in slots, rows routed to them).
Callers use the names re-exported here
(`adapter_math.lowrank_delta`), so tests can patch them in one place.

The layers only say how their kernel maps to a matrix and how an input meets a
factor; the formulas themselves (scaling, the low-rank contribution, the delta
that merging adds, DoRA's norm and recombination, and the initialisers) are
written once, in this package, and tested against float64 NumPy closed forms.

Conventions ("matrix form"): a kernel `W` is `(..., d, k)`, `d` input features
and `k` output units; leading axes, if any, are batch axes of the
factorisation (each batch entry has its own rank-r update). `A` is
`(..., d, r)`, `B` is `(..., r, k)`, `s` is the scaling factor and

    y = x·W + s·(dropout(x)·A)·B (+ bias).
"""


from keras_lowrank.adapter_math.lowrank import adapter_dropout  # noqa: F401
from keras_lowrank.adapter_math.lowrank import alpha_for_rank  # noqa: F401
from keras_lowrank.adapter_math.lowrank import combine_cat  # noqa: F401
from keras_lowrank.adapter_math.lowrank import combine_linear  # noqa: F401
from keras_lowrank.adapter_math.lowrank import flat_matmul  # noqa: F401
from keras_lowrank.adapter_math.lowrank import lowrank_contribution  # noqa: F401
from keras_lowrank.adapter_math.lowrank import lowrank_delta  # noqa: F401
from keras_lowrank.adapter_math.lowrank import merge_kernel  # noqa: F401
from keras_lowrank.adapter_math.lowrank import relative_error  # noqa: F401
from keras_lowrank.adapter_math.lowrank import scaling_factor  # noqa: F401
from keras_lowrank.adapter_math.lowrank import shared_projections  # noqa: F401
from keras_lowrank.adapter_math.lowrank import truncate_product  # noqa: F401
from keras_lowrank.adapter_math.lowrank import unmerge_kernel  # noqa: F401
from keras_lowrank.adapter_math.routing import routed_factors  # noqa: F401
from keras_lowrank.adapter_math.routing import rows_lowrank_contribution  # noqa: F401
from keras_lowrank.adapter_math.routing import stacked_slot  # noqa: F401
from keras_lowrank.adapter_math.dora import column_sq_norm  # noqa: F401
from keras_lowrank.adapter_math.dora import dora_column_norm  # noqa: F401
from keras_lowrank.adapter_math.dora import dora_combine  # noqa: F401
from keras_lowrank.adapter_math.dora import dora_merge_delta  # noqa: F401
from keras_lowrank.adapter_math.dora import dora_merged_kernel  # noqa: F401
from keras_lowrank.adapter_math.dora import dora_scaled_b  # noqa: F401
from keras_lowrank.adapter_math.dora import dora_unmerged_kernel  # noqa: F401
from keras_lowrank.adapter_math.dora import dora_weight_norm  # noqa: F401
from keras_lowrank.adapter_math.dora import unmerged_base_kernel  # noqa: F401
from keras_lowrank.adapter_math.init import initial_factors  # noqa: F401
from keras_lowrank.adapter_math.init import kernel_factors  # noqa: F401
from keras_lowrank.adapter_math.init import olora_factors  # noqa: F401
from keras_lowrank.adapter_math.init import original_kernel_factors  # noqa: F401
from keras_lowrank.adapter_math.init import pissa_factors  # noqa: F401
from keras_lowrank.adapter_math.init import pissa_niter  # noqa: F401
from keras_lowrank.adapter_math.init import randomized_svd  # noqa: F401
from keras_lowrank.adapter_math.init import token_row_factors  # noqa: F401

__all__ = [
    "adapter_dropout",
    "alpha_for_rank",
    "combine_cat",
    "combine_linear",
    "flat_matmul",
    "lowrank_contribution",
    "lowrank_delta",
    "merge_kernel",
    "relative_error",
    "scaling_factor",
    "shared_projections",
    "truncate_product",
    "unmerge_kernel",
    "routed_factors",
    "rows_lowrank_contribution",
    "stacked_slot",
    "column_sq_norm",
    "dora_column_norm",
    "dora_combine",
    "dora_merge_delta",
    "dora_merged_kernel",
    "dora_scaled_b",
    "dora_unmerged_kernel",
    "dora_weight_norm",
    "unmerged_base_kernel",
    "initial_factors",
    "kernel_factors",
    "olora_factors",
    "original_kernel_factors",
    "pissa_factors",
    "pissa_niter",
    "randomized_svd",
    "token_row_factors",
]
