"""The gradient of a loss with respect to chosen variables, on each backend.

Keras 3 has no backend-neutral gradient function (`keras.ops` differentiates
nothing by itself; each trainer calls its backend's autodiff), and the
gradient-subspace measurement needs the gradient of *frozen* kernels, which
no Keras train step computes. So this module is the one place outside the
benchmark that imports a backend, each import inside the function that needs
it (`tests/test_package_structure.py` lists the exception).

The forward pass runs with `training=False`: the measurement looks at the
loss surface at the current weights, without dropout noise.

Example:

>>> import keras, numpy as np
>>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, use_bias=False)])
>>> _ = model.layers[0].kernel.assign(np.zeros((3, 1)))
>>> grad = gradient_function(model, [model.layers[0].kernel], keras.losses.MeanSquaredError())
>>> x, y = np.ones((2, 3), "float32"), np.ones((2, 1), "float32")
>>> grad(x, y)[0].ravel().tolist()  # d/dW mean((xW - y)^2) = -2·mean(x)
[-2.0, -2.0, -2.0]
"""

import keras
import numpy as np


def gradient_function(model, variables, loss):
    """A function `(x, y) -> [NumPy gradient per variable]`.

    Args:
        model: a built Keras model.
        variables: variables of `model` (trainable or not) to differentiate
            with respect to.
        loss: `loss(y_true, y_pred)`; a per-example result is averaged.

    Returns:
        The function; on JAX it is compiled once and reused.
    """
    backend = keras.backend.backend()
    if backend == "jax":
        return _jax(model, list(variables), loss)
    if backend == "tensorflow":
        return _tensorflow(model, list(variables), loss)
    if backend == "torch":
        return _torch(model, list(variables), loss)
    raise ValueError(
        f"keras_lowrank: gradients are not available on the {backend!r} "
        "backend; use jax, tensorflow or torch."
    )


def _jax(model, variables, loss):
    import jax

    trainable = model.trainable_variables
    frozen = model.non_trainable_variables
    where = {id(v): ("t", i) for i, v in enumerate(trainable)}
    where.update({id(v): ("n", i) for i, v in enumerate(frozen)})

    def objective(targets, t_values, n_values, x, y):
        t_values, n_values = list(t_values), list(n_values)
        for variable, value in zip(variables, targets):
            side, i = where[id(variable)]
            (t_values if side == "t" else n_values)[i] = value
        y_pred, _ = model.stateless_call(t_values, n_values, x, training=False)
        return keras.ops.mean(loss(y, y_pred))

    grad = jax.jit(jax.grad(objective))

    def compute(x, y):
        grads = grad(
            [v.value for v in variables], [v.value for v in trainable],
            [v.value for v in frozen], x, y,
        )
        return [np.asarray(g) for g in grads]

    return compute


def _tensorflow(model, variables, loss):
    import tensorflow as tf

    def compute(x, y):
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            for variable in variables:
                tape.watch(variable.value)
            value = keras.ops.mean(loss(y, model(x, training=False)))
        grads = tape.gradient(value, [v.value for v in variables])
        return [
            np.zeros(v.shape, "float32") if g is None else np.asarray(g)
            for v, g in zip(variables, grads)
        ]

    return compute


def _torch(model, variables, loss):
    import torch

    def compute(x, y):
        params = [v.value for v in variables]
        flags = [p.requires_grad for p in params]
        try:
            for p in params:
                p.requires_grad_(True)
            value = keras.ops.mean(loss(y, model(x, training=False)))
            grads = torch.autograd.grad(value, params, allow_unused=True)
        finally:
            for p, flag in zip(params, flags):
                p.requires_grad_(flag)
        return [
            np.zeros(tuple(v.shape), "float32") if g is None
            else g.detach().cpu().numpy()
            for v, g in zip(variables, grads)
        ]

    return compute
