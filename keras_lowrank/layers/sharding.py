"""Where adapter variables live under `keras.distribution` (JAX).

Keras gives a new variable its layout when the variable is created: the
current distribution's `get_variable_layout(variable)` returns the variable's
own layout if it has one, else (for `ModelParallel`) the `LayoutMap` entry
whose regex matches `variable.path`, else a replicated layout. Adapter
variables are created with an explicit layout derived from their kernel's, so
that the user's `LayoutMap` for the base model is all they write, and a rule
written for kernels (`".*dense.*"`) never reaches the factors:

- `A` `(*batch, *in, r)` shares the kernel's batch- and input-axis sharding;
- `B` `(*batch, r, *out)` shares its batch- and output-axis sharding;
- the rank axis is replicated (it is tiny, and sharding it would turn both
  adapter matmuls into collectives);
- DoRA's per-unit vectors `(*batch, *out)` share the output-axis sharding.

Under `DataParallel` the kernel is replicated, and so are the factors. A
kernel whose layout cannot be mapped axis by axis (an int4 EinsumDense kernel
is stored flattened to 2D) gives replicated factors.
"""

import keras


def adapter_layout(layer, key, kernel_layout):
    """The `keras.distribution.TensorLayout` for adapter variable `key`
    (`"A"`, `"B"`, `"magnitude"`, `"norm"`) of `layer`, or `None` when no
    distribution is active (or on backends without `keras.distribution`).

    Args:
        layer: the adapter layer.
        key: which variable.
        kernel_layout: the layer's `KernelLayout` (which kernel axes are
            batch, input and output axes).

    Example:

    >>> from keras_lowrank import LowRankDense
    >>> layer = LowRankDense(4, rank=2)
    >>> layer.build((None, 8))
    >>> adapter_layout(layer, "A", layer.lowrank_layout) is None  # no mesh
    True
    """
    if keras.backend.backend() != "jax":
        return None
    distribution = keras.distribution.distribution()
    if distribution is None:
        return None
    kernel = layer._kernel_variable()
    axes = tuple(distribution.get_variable_layout(kernel).axes)
    if len(axes) != len(kernel_layout.kernel_shape):
        axes = (None,) * len(kernel_layout.kernel_shape)
    pick = lambda which: tuple(axes[i] for i in which)  # noqa: E731
    batch = pick(kernel_layout.batch_axes)
    if key == "A":
        spec = batch + pick(kernel_layout.in_axes) + (None,)
    elif key == "B":
        spec = batch + (None,) + pick(kernel_layout.out_axes)
    else:
        spec = batch + pick(kernel_layout.out_axes)
    return keras.distribution.TensorLayout(spec, distribution.device_mesh)


def create_adapter_variable(layer, key, name, shape, trainable, kernel_layout):
    """Creates one float32 adapter variable (zeros, never autocast) under
    its layout.

    Must be called inside `layer._lowrank.unlocked()` (which sets the name
    scope, so the path is `<layer.path>/<name>`); the caller assigns it to a
    layer attribute, which tracks it.
    """
    layout = adapter_layout(layer, key, kernel_layout)
    if layout is None:
        return layer.add_weight(
            name=name,
            shape=shape,
            initializer="zeros",
            dtype="float32",
            trainable=trainable,
            autocast=False,
        )
    return keras.Variable(
        initializer="zeros",
        shape=shape,
        dtype="float32",
        trainable=trainable,
        autocast=False,
        name=name,
        layout=layout,
    )
