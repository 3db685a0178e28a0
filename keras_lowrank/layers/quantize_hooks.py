"""`layer.quantize(...)` and `model.quantize(...)` on adapter layers and
adapted models.

Keras wraps `quantize` per instance; these hooks let Keras's own wrapper run
on an adapter layer (whose class Keras's type check refuses) and make
`model.quantize` all-or-nothing on an adapted model. What quantization is
allowed, and how quantized kernels are read and merged:
`keras_lowrank.layers.quantized`.
"""

import functools
import re

from keras_lowrank import keras_private
from keras_lowrank.layers.quantized import check_quantizable
from keras_lowrank.layers.quantized import resolve_mode


def install_layer_hook(layer):
    """Makes `layer.quantize(...)` work on an adapter layer.

    Keras wraps each layer's `quantize` per instance when the object is
    created (argument checks, config resolution, unlocking the layer's
    state); that wrapper calls the plain class's `quantize`, which refuses
    subclasses (`type_check`). The hook checks what adapters need, lets
    Keras's wrapper run with `type_check=False` (the quantization itself is
    Keras's), then refreshes which variables train.
    """
    keras_quantize = keras_private.instance_quantize(layer)
    if keras_quantize is None or hasattr(keras_quantize, "_keras_lowrank"):
        return

    @functools.wraps(keras_quantize)
    def quantize(mode=None, config=None, type_check=True, **kwargs):
        check_quantizable(layer, resolve_mode(mode, config))
        keras_quantize(mode=mode, config=config, type_check=False, **kwargs)
        layer._refresh_trainable()

    quantize._keras_lowrank = keras_quantize
    layer.quantize = quantize


def remove_layer_hook(layer):
    """Gives `layer` back Keras's own `quantize` wrapper."""
    hook = keras_private.instance_quantize(layer)
    if hook is not None and hasattr(hook, "_keras_lowrank"):
        layer.quantize = hook._keras_lowrank


def install_model_hook(model, adapted_layers):
    """Makes `model.quantize(...)` all-or-nothing on an adapted model.

    Keras's `Model.quantize` quantizes layer after layer and only warns about
    layers it cannot quantize; an adapter layer that refuses (float8, merged
    adapters) would leave the model half-quantized. The hook checks every
    adapted layer the filters select first.

    Args:
        model: the adapted model.
        adapted_layers: a function returning the model's adapter layers.
    """
    keras_quantize = keras_private.instance_quantize(model)
    if keras_quantize is None or hasattr(keras_quantize, "_keras_lowrank"):
        return

    @functools.wraps(keras_quantize)
    def quantize(mode=None, config=None, filters=None, **kwargs):
        resolved = resolve_mode(mode, config)
        for layer in adapted_layers(model):
            if _selected(layer, filters):
                check_quantizable(layer, resolved)
        keras_quantize(mode=mode, config=config, filters=filters, **kwargs)

    quantize._keras_lowrank = keras_quantize
    model.quantize = quantize


def remove_model_hook(model):
    remove_layer_hook(model)


def _selected(layer, filters):
    """`Model.quantize`'s `filters` rule: a regex (or list of regexes)
    searched in the layer name, or a callable."""
    if filters is None:
        return True
    if isinstance(filters, str):
        return bool(re.search(filters, layer.name))
    if isinstance(filters, (list, tuple)):
        return any(re.search(f, layer.name) for f in filters)
    if callable(filters):
        return bool(filters(layer))
    return True
