"""LoRA+: train `B` (and DoRA's magnitude) at `ratio ×` `A`'s learning rate.

LoRA+ (Hayou et al., 2024) shows that `A` and `B` want different learning
rates: `B` learns best about 16 times faster. `LoraPlusOptimizer` wraps any
Keras optimizer and gives the adapters' `B` factors and DoRA magnitudes
`ratio × learning_rate` (decoupled weight decay included, as with PEFT's
parameter groups); every other variable, `A` included, keeps the optimizer's
own learning rate. Clipping, gradient accumulation, EMA and loss scaling stay
the wrapped optimizer's, applied to all variables together.

How: Keras optimizers update all variables in one `_backend_update_step(grads,
variables, learning_rate)` call (per backend: a loop of `update_step`, TF's
distributed update, or the fused torch `_foreach` step) and apply decoupled
weight decay in `_apply_weight_decay(variables)`. The wrapper splits both
calls of the wrapped instance in two groups, the second with the learning rate
times `ratio`. Schedules work unchanged: the rate each step is the schedule's,
times `ratio` for the fast group.

Which variables are fast: those named `lowrank_B_<adapter>` or
`lowrank_magnitude_<adapter>`, i.e. every adapter's `B` and DoRA magnitude.
PEFT's `create_loraplus_optimizer` also puts every other 1-D parameter
(biases, LayerNorm scales) in the fast group and gives embedding adapters a
separate learning rate; here biases, heads and embedding adapters' `A`
train at the base rate, and an Embedding's `B` is fast like any `B`.
"""

import math
import numbers
import re

import keras
from keras import ops

from keras_lowrank import keras_private

_FAST_NAME = re.compile(r"^lowrank_(B|magnitude)_[A-Za-z0-9_\-]+$")


def is_fast_variable(variable):
    """Whether LoRA+ trains `variable` at `ratio ×` the learning rate: the
    `B` factor or the DoRA magnitude of an adapter (`keras_lowrank` names
    them `lowrank_B_<adapter>` and `lowrank_magnitude_<adapter>`).

    Example:

    >>> from keras_lowrank import LowRankDense
    >>> layer = LowRankDense(4, rank=2, method="dora")
    >>> layer.build((None, 3))
    >>> [w.name for w in layer.trainable_weights if is_fast_variable(w)]
    ['lowrank_B_default', 'lowrank_magnitude_default']
    """
    return bool(_FAST_NAME.match(getattr(variable, "name", "") or ""))


@keras.saving.register_keras_serializable(package="keras_lowrank")
class LoraPlusOptimizer(keras.optimizers.Optimizer):
    """Wraps a Keras optimizer so that `B` trains `ratio` times faster than `A`.

    Args:
        optimizer: any `keras.optimizers.Optimizer` instance (SGD, Adam,
            AdamW, ...), with its learning rate or schedule, weight decay,
            clipping and so on. It is modified in place (its update step is
            split in two groups) and must not be shared with another model.
        ratio: positive number, the learning-rate ratio `lr_B / lr_A`
            (16 by default, as recommended by LoRA+).
        name: optional name of the wrapper.

    With SGD, one step moves `A` by `-lr·dL/dA` and `B` by
    `-ratio·lr·dL/dB`. The wrapper is serialisable: `model.save()` and
    `keras.saving.load_model()` keep it, its ratio and its state.

    Example:

    >>> import numpy as np
    >>> import keras_lowrank
    >>> model = keras.Sequential(
    ...     [keras.Input((8,)), keras_lowrank.LowRankDense(4, rank=2)]
    ... )
    >>> optimizer = keras_lowrank.LoraPlusOptimizer(
    ...     keras.optimizers.AdamW(1e-3), ratio=16
    ... )
    >>> model.compile(optimizer=optimizer, loss="mse")
    >>> history = model.fit(
    ...     np.ones((4, 8)), np.zeros((4, 4)), epochs=1, verbose=0
    ... )
    >>> float(optimizer.ratio)
    16.0
    """

    def __init__(self, optimizer, ratio=16.0, name=None, **kwargs):
        if not isinstance(optimizer, keras.optimizers.Optimizer) or isinstance(
            optimizer, LoraPlusOptimizer
        ):
            raise TypeError(
                "keras_lowrank: LoraPlusOptimizer wraps a Keras optimizer "
                f"instance, got {optimizer!r}. Pass e.g. "
                "LoraPlusOptimizer(keras.optimizers.AdamW(1e-4), ratio=16)."
            )
        if (
            isinstance(ratio, bool)
            or not isinstance(ratio, numbers.Real)
            or not math.isfinite(ratio)
            or not ratio > 0
        ):
            raise ValueError(
                "keras_lowrank: LoraPlusOptimizer ratio must be a finite "
                f"positive number, got {ratio!r}. Pass a number such as "
                "ratio=16 (what LoRA+ recommends)."
            )
        if getattr(optimizer, "_lowrank_loraplus_ratio", None) is not None:
            raise ValueError(
                "keras_lowrank: this optimizer is already wrapped by a "
                "LoraPlusOptimizer. Wrap a fresh optimizer instance."
            )
        unsupported = sorted(kwargs)
        if unsupported:
            raise ValueError(
                "keras_lowrank: LoraPlusOptimizer does not take "
                f"{unsupported}; set them on the wrapped optimizer, e.g. "
                "LoraPlusOptimizer(keras.optimizers.AdamW(1e-4, "
                "weight_decay=0.01))."
            )
        super().__init__(learning_rate=0.0, name=name)
        self.inner_optimizer = optimizer
        self.ratio = float(ratio)
        _split_updates(optimizer, self.ratio)

    # --- delegation to the wrapped optimizer ---------------------------------

    def build(self, var_list):
        self.inner_optimizer.build(var_list)
        super().build(var_list)

    @property
    def variables(self):
        return self.inner_optimizer.variables

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = learning_rate

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    def apply(self, grads, trainable_variables=None):
        if not self.built and trainable_variables is not None:
            self.build(list(trainable_variables))
        return self.inner_optimizer.apply(grads, trainable_variables)

    def stateless_apply(self, optimizer_variables, grads, trainable_variables):
        return self.inner_optimizer.stateless_apply(
            optimizer_variables, grads, trainable_variables
        )

    def scale_loss(self, loss):
        return self.inner_optimizer.scale_loss(loss)

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)

    def get_config(self):
        return {
            "name": self.name,
            "optimizer": keras.saving.serialize_keras_object(
                self.inner_optimizer
            ),
            "ratio": self.ratio,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        optimizer = keras.saving.deserialize_keras_object(
            config.pop("optimizer"), custom_objects=custom_objects
        )
        return cls(optimizer, **config)


def _split_updates(optimizer, ratio):
    """Splits `optimizer`'s update step and weight decay into the base group
    and the fast group (learning rate times `ratio`), on this instance."""
    update_step, weight_decay = keras_private.optimizer_update_hooks(optimizer)

    def split_update_step(grads, trainable_variables, learning_rate):
        slow, fast = [], []
        for grad, variable in zip(grads, trainable_variables):
            group = fast if is_fast_variable(variable) else slow
            group.append((grad, variable))
        if slow:
            update_step(*map(list, zip(*slow)), learning_rate)
        if fast:
            fast_rate = ops.multiply(learning_rate, ratio)
            update_step(*map(list, zip(*fast)), fast_rate)

    def split_weight_decay(variables):
        variables = list(variables)
        weight_decay([v for v in variables if not is_fast_variable(v)])
        if optimizer.weight_decay is None:
            return
        for variable in variables:
            if is_fast_variable(variable) and keras_private.uses_weight_decay(
                optimizer, variable
            ):
                rate = ops.cast(optimizer.learning_rate, variable.dtype)
                decay = ops.cast(optimizer.weight_decay * ratio, variable.dtype)
                variable.assign(variable - variable * decay * rate)

    keras_private.set_optimizer_update_hooks(
        optimizer, split_update_step, split_weight_decay
    )
    optimizer._lowrank_loraplus_ratio = ratio
