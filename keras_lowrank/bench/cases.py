"""Cases: what is done to a fresh model before it is timed.

A case is data: a name, a label, whether it is a training or an inference
case, whether it depends on the target set and rank, and a `prepare`
function `prepare(model, workload, targets, rank, **options)` that adapts
or freezes the model in place. Adding a variant is one `register(Case(...))`
line, as DoRA's below. `report.REFERENCES` names the cases every figure is
divided by.
"""

import dataclasses
import functools

import numpy as np

import keras_lowrank


@dataclasses.dataclass(frozen=True)
class Case:
    """One way of preparing a model for a measurement.

    Attributes:
        name: key used on the command line, in JSON and for ratios.
        label: human-readable name for tables and plots.
        kind: `"train"` (timed with `train_on_batch`) or `"infer"`
            (`predict_on_batch`).
        prepare: `prepare(model, workload, targets, rank, **options)`.
        adapted: whether the case uses `targets` and `rank` (reference
            lookup matches those only for adapted cases).
        options: extra keyword arguments for `prepare`.
    """

    name: str
    label: str
    kind: str
    prepare: object
    adapted: bool = True
    options: dict = dataclasses.field(default_factory=dict)


CASES = {}


def register(case):
    CASES[case.name] = case
    return case


# --- freezing helpers -----------------------------------------------------------


def _leaves(model):
    return [
        layer
        for layer in keras_lowrank.keras_private.all_sublayers(model)
        if not keras_lowrank.keras_private.all_sublayers(layer)
    ]


def freeze_all_but(model, keep):
    """Freezes every leaf layer except those in `keep` (which are made
    trainable). Leaves, not containers, so a kept layer inside a frozen block
    still trains."""
    keep = {id(layer) for layer in keep}
    for layer in _leaves(model):
        layer.trainable = id(layer) in keep


# --- training cases ---------------------------------------------------------------


def prepare_full(model, workload, targets=None, rank=None):
    """Every weight trains."""
    for layer in _leaves(model):
        layer.trainable = True


def prepare_floor(model, workload, targets=None, rank=None):
    """Only the embedding layer norm trains: backpropagation runs through the
    whole network but no kernel gets a weight gradient, so no adapter can be
    cheaper than this."""
    freeze_all_but(model, workload.floor_layers(model))


def prepare_builtin(model, workload, targets, rank, alpha=None):
    """Keras's own `enable_lora` on the same layers at the same rank; the
    rest frozen, the task head trainable (as `keras_lowrank.adapt` does), the
    adapted layers' biases frozen (as `keras_lowrank`'s default `bias="none"`)."""
    layers = workload.target_layers(model, targets)
    freeze_all_but(model, layers + workload.head_layers(model))
    for layer in layers:
        layer.enable_lora(rank, lora_alpha=alpha)
        if getattr(layer, "bias", None) is not None:
            layer.bias.trainable = False


def prepare_lowrank(model, workload, targets, rank, **options):
    """`keras_lowrank.adapt` on the target layers (given by exact path); the
    task head stays trainable, as `adapt` does for KerasHub tasks."""
    layers = workload.target_layers(model, targets)
    keras_lowrank.adapt(
        model,
        rank=rank,
        targets=[layer.path for layer in layers],
        trainable=[layer.path for layer in workload.head_layers(model)],
        **options,
    )


# --- inference cases ----------------------------------------------------------------


def prepare_base(model, workload, targets=None, rank=None):
    """The plain model."""


def prepare_unmerged(model, workload, targets, rank, **options):
    """Adapted, adapter computed on the side; `B` set non-zero so the adapter
    really contributes."""
    prepare_lowrank(model, workload, targets, rank, **options)
    rng = np.random.default_rng(0)
    for layer in workload.target_layers(model, targets):
        for name in layer.adapter_names:
            b = layer.adapter_variables(name)["B"]
            b.assign(rng.normal(0.0, 0.01, size=tuple(b.shape)).astype("float32"))


def prepare_merged(model, workload, targets, rank, **options):
    """Adapted, then merged into the kernels."""
    prepare_unmerged(model, workload, targets, rank, **options)
    keras_lowrank.merge(model)


register(Case("full", "full fine-tuning", "train", prepare_full, adapted=False))
register(Case("builtin", "Keras enable_lora", "train", prepare_builtin))
register(Case("lowrank", "keras_lowrank LoRA", "train", prepare_lowrank))
register(Case("dora", "keras_lowrank DoRA", "train",
              functools.partial(prepare_lowrank, method="dora"),
              options={"method": "dora"}))
register(Case("floor", "floor (LN only)", "train", prepare_floor, adapted=False))
register(Case("base", "base model", "infer", prepare_base, adapted=False))
register(Case("unmerged", "adapted, unmerged", "infer", prepare_unmerged))
register(Case("merged", "adapted, merged", "infer", prepare_merged))


def get(name):
    if name not in CASES:
        raise ValueError(
            f"keras_lowrank.bench: unknown case {name!r}; known: {sorted(CASES)}."
        )
    return CASES[name]


def with_options(case, **options):
    """A copy of `case` whose `prepare` gets `options` (e.g. method='dora')."""
    return dataclasses.replace(
        case,
        prepare=functools.partial(case.prepare, **options),
        options={**case.options, **options},
    )
