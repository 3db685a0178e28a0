"""A model's output layers, found from what the model computes.

An *output layer* is a Dense or EinsumDense whose output reaches a model
output with no other Dense/EinsumDense in between, whatever activation,
softmax, reshape or dropout layers (or raw `keras.ops` in a subclassed
`call`) follow it. Every output of a multi-output model has its own. The
default targets and the presets leave these layers out (DESIGN.md).

Creation order says nothing about this (a subclassed model may create its
head first), and a subclassed model has no graph to read, so the model is
run instead: on a small batch shaped like its inputs, every Dense and
EinsumDense returns a fixed stand-in value of its output's shape, cutting
every path that runs through a linear layer. Changing the stand-ins of some
layers then changes a model output exactly when one of them reaches it
directly. A group search finds the output layers in a few calls
(about 2·k·log2(n) for k output layers among n linear layers).
"""

import warnings

import keras
import numpy as np

LINEAR_CLASSES = (keras.layers.Dense, keras.layers.EinsumDense)
# The methods Keras's `Layer.__call__` dispatches to (the second one for
# quantized layers); both are public, overridable layer methods.
_CALL_METHODS = ("call", "quantized_call")


def output_layers(model, visits):
    """The output layers of `model` (see the module docstring).

    Args:
        model: a built Keras model (not a KerasHub one: those name their head).
        visits: `walk.walk(model)`.

    Returns:
        The output layers, in model order. When the model cannot be run on
        a made-up batch (its input shapes are unknown, or its `call` needs
        more than tensors), the last Dense/EinsumDense in model order, with
        a warning.

    Example:

    >>> import keras
    >>> from keras_lowrank.surgery.walk import walk
    >>> model = keras.Sequential([keras.Input((4,)),
    ...     keras.layers.Dense(8, name="hidden"),
    ...     keras.layers.Dense(2, name="logits"), keras.layers.Softmax()])
    >>> [layer.name for layer in output_layers(model, walk(model))]
    ['logits']
    """
    linear = [v.layer for v in visits if isinstance(v.layer, LINEAR_CLASSES)]
    if not linear:
        return []
    try:
        args, kwargs = _sample_inputs(model)
        probe = _Probe(model, linear, args, kwargs)
        found = probe.search(list(range(len(linear))))
    except Exception as error:  # any failure of a made-up call: fall back
        warnings.warn(
            f"keras_lowrank: could not run model '{model.name}' on a made-up "
            f"batch to find its output layers ({type(error).__name__}: "
            f"{str(error)[:200]}); leaving out its last Dense/EinsumDense "
            f"'{linear[-1].name}' as its output layer. Pass `targets=` or "
            "`exclude=` to choose the layers yourself.",
            stacklevel=4,
        )
        return [linear[-1]]
    return [linear[i] for i in sorted(found)]


def _sample_inputs(model):
    """(args, kwargs) for one call of `model` on a batch of 2."""
    inputs = _functional_inputs(model)
    if inputs is not None:
        return (keras.tree.map_structure(_tensor_like, inputs),), {}
    config = model.get_build_config() or {}
    if "input_shape" in config:
        return (_from_shape(config["input_shape"]),), {}
    if "shapes_dict" in config:
        kwargs = {
            key[: -len("_shape")]: _from_shape(shape)
            for key, shape in config["shapes_dict"].items()
        }
        return (), kwargs
    raise ValueError("its input shapes are unknown (no build config)")


def _functional_inputs(model):
    # Functional and Sequential models know their input tensors; a
    # subclassed model raises here.
    try:
        return model.input
    except (AttributeError, ValueError):
        return None


def _tensor_like(spec):
    shape = tuple(2 if d is None else d for d in spec.shape)
    return _array(shape, spec.dtype)


def _from_shape(shape):
    if isinstance(shape, dict):
        return {k: _from_shape(v) for k, v in shape.items()}
    if isinstance(shape, (list, tuple)) and shape and all(
        isinstance(s, (list, tuple, dict)) for s in shape
    ):
        return type(shape)(_from_shape(s) for s in shape)
    return _array(tuple(2 if d is None else d for d in shape), "float32")


def _array(shape, dtype):
    # Values in [0, 1): valid as floats, and 0 (a valid token id) once an
    # Embedding casts them to integers.
    dtype = keras.backend.standardize_dtype(dtype)
    if "int" in dtype or dtype == "bool":
        return np.zeros(shape, dtype)
    return np.random.default_rng(0).uniform(size=shape).astype(dtype)


class _Probe:
    """Runs `model` with every linear layer's output replaced by a stand-in
    (variant 0, or variant 1 for the layers being tested)."""

    def __init__(self, model, linear, args, kwargs):
        self.model = model
        self.linear = linear
        self.args = args
        self.kwargs = kwargs
        self.baseline = self._run(set())

    def search(self, group):
        """The members of `group` whose stand-in reaches an output."""
        if not group or not self._changes(set(group)):
            return []
        if len(group) == 1:
            return group
        middle = len(group) // 2
        return self.search(group[:middle]) + self.search(group[middle:])

    def _changes(self, perturbed):
        outputs = self._run(perturbed)
        return any(
            a.shape != b.shape
            or not np.allclose(a, b, rtol=1e-4, atol=1e-6, equal_nan=True)
            for a, b in zip(outputs, self.baseline)
        )

    def _run(self, perturbed):
        calls = {}
        saved = []
        try:
            for index, layer in enumerate(self.linear):
                for method in _CALL_METHODS:
                    original = getattr(layer, method, None)
                    if original is None:
                        continue
                    saved.append((layer, method, layer.__dict__.get(method)))
                    variant = 1 if index in perturbed else 0
                    # object.__setattr__: an instance attribute that shadows
                    # the method, without Keras's attribute tracking.
                    object.__setattr__(
                        layer,
                        method,
                        _stand_in_call(original, index, variant, calls),
                    )
            outputs = self.model(*self.args, training=False, **self.kwargs)
        finally:
            for layer, method, previous in reversed(saved):
                if previous is None:
                    object.__delattr__(layer, method)
                else:
                    object.__setattr__(layer, method, previous)
        return [
            np.asarray(keras.ops.convert_to_numpy(t), "float64")
            for t in keras.tree.flatten(outputs)
        ]


def _stand_in_call(original, index, variant, calls):
    def call(*args, **kwargs):
        out = original(*args, **kwargs)
        count = calls.get(index, 0)
        calls[index] = count + 1
        rng = np.random.default_rng([index, count, variant])
        return keras.tree.map_structure(
            lambda t: keras.ops.convert_to_tensor(
                rng.normal(size=tuple(t.shape)), dtype=t.dtype
            ),
            out,
        )

    return call
