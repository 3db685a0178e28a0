"""Gradients of a scalar Keras computation on any backend (tests only: the
package itself never imports a backend)."""

import keras
import numpy as np
from keras import ops


def gradients(fn, variables):
    """`d fn() / d v` for each Keras variable `v`, as float64 NumPy arrays.

    Args:
        fn: a function of no arguments returning a scalar; it reads the
            variables (e.g. by calling a layer).
        variables: trainable `keras.Variable`s.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = fn()
        grads = tape.gradient(loss, [v.value for v in variables])
    elif backend == "torch":
        import torch

        values = [v.value for v in variables]
        grads = [g.detach() for g in torch.autograd.grad(fn(), values)]
    elif backend == "jax":
        import jax

        def pure(values):
            mapping = list(zip(variables, values))
            with keras.StatelessScope(state_mapping=mapping):
                return fn()

        grads = jax.grad(pure)([v.value for v in variables])
    else:
        raise NotImplementedError(backend)
    return [np.asarray(ops.convert_to_numpy(g), "float64") for g in grads]
