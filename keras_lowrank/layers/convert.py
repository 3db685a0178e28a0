"""In-place conversion: a built plain Keras layer becomes an adapter layer
(same object, same kernel variable) and back, with the checks that decide
whether it can.

The class swap keeps the layer's identity, so a parent model that may be
subclassed or a KerasHub model, whose sublayers cannot be replaced, keeps
working. The private Keras surface this needs is in `keras_private`.
"""

import keras

from keras_lowrank import keras_private
from keras_lowrank.layers import quantize_hooks
from keras_lowrank.layers import quantized
from keras_lowrank.layers.adapter_set import AdapterSet
from keras_lowrank.layers.adapter_set import path_of
from keras_lowrank.spec import where

SUPPORTED_DTYPES = ("float16", "bfloat16", "float32", "float64")


def is_adapter_layer(layer):
    """Whether `layer` is a `LowRankLayer` (read from a class flag, so this
    module need not import `base`, which imports it)."""
    return getattr(type(layer), "_is_lowrank_layer", False)


# What a class that only re-exports its base (KerasHub's
# `ReversibleEmbedding(keras.layers.ReversibleEmbedding): pass`) defines.
_ALIAS_ATTRIBUTES = {
    "__module__", "__doc__", "__qualname__", "__firstlineno__",
    "__static_attributes__", "_api_export_path", "_api_export_symbol_id",
}


def plain_class(layer_type):
    """`layer_type`, or the class it merely re-exports: a subclass that
    defines nothing of its own behaves exactly as its base, so it is adapted
    as its base (and gets its own class back from `revert`)."""
    while set(vars(layer_type)) <= _ALIAS_ATTRIBUTES and len(
        layer_type.__bases__
    ) == 1:
        layer_type = layer_type.__bases__[0]
    return layer_type


def check_convertible(cls, layer, path=None):
    """See `LowRankLayer.check_convertible`."""
    path = path or path_of(layer)
    if is_adapter_layer(layer):
        if not isinstance(layer, cls):
            raise TypeError(
                f"{where(path)}: the layer is a {type(layer).__name__} "
                f"already, not a {cls.__name__}. Use "
                f"`{type(layer).__name__}.from_layer` or its "
                "`add_adapter` method to add another adapter."
            )
        return
    if plain_class(type(layer)) is not cls.base_class:
        kind = (
            "a subclass, whose own `call` would be lost"
            if isinstance(layer, cls.base_class)
            else "another kind of layer"
        )
        raise TypeError(
            f"{where(path)}: {cls.__name__} adapts exactly "
            f"`keras.layers.{cls.base_class.__name__}` layers, not "
            f"{type(layer).__name__} ({kind}). Leave this layer out of "
            "`targets`, or adapt the plain Keras layers inside it."
        )
    if not layer.built:
        raise ValueError(
            f"{where(path)}: the layer is not built, so it has no kernel "
            "to adapt yet. Build the model first (call it on data or call "
            "`model.build(input_shape)`), then adapt it."
        )
    check_options(cls, layer, path)


def check_options(cls, layer, path):
    """Refuses layer options without a low-rank adapter: built-in LoRA,
    kernel constraints, non-float dtypes, quantization, and geometries
    without a true rank-r factorisation. Works on unbuilt layers too."""
    if getattr(layer, "lora_enabled", False) or getattr(layer, "lora_rank", None):
        raise ValueError(
            f"{where(path)}: Keras's built-in LoRA is enabled on this "
            "layer (`lora_rank`/`enable_lora`). Use one or the other: "
            "rebuild the layer without `lora_rank`/`enable_lora`, then "
            "adapt it."
        )
    if getattr(layer, "kernel_constraint", None) is not None or getattr(
        layer, "embeddings_constraint", None
    ) is not None:
        raise ValueError(
            f"{where(path)}: the layer has a kernel constraint, which a "
            "low-rank update would bypass. Remove `kernel_constraint` "
            "(or `embeddings_constraint`) from the layer, or exclude it."
        )
    dtype = keras.backend.standardize_dtype(layer.dtype_policy.variable_dtype)
    if layer.quantization_mode is None and dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{where(path)}: unsupported dtype {dtype!r}; adapters need a "
            f"floating-point kernel ({', '.join(SUPPORTED_DTYPES)}). Use "
            "a float dtype policy for this layer, or exclude it."
        )
    quantized.check_mode(
        layer.quantization_mode, path, "adapt a layer quantized with"
    )
    cls._check_geometry(layer, path)


def become(cls, layer):
    """Changes `layer`'s class to `cls` and gives it an empty `AdapterSet`."""
    if is_adapter_layer(layer):
        return
    original = type(layer)
    keras_private.swap_class(layer, cls)
    layer._lowrank = AdapterSet(layer, original)
    quantize_hooks.install_layer_hook(layer)
    keras_private.refresh_call_signature(layer)


def revert(layer):
    """Undoes `become` on a layer that holds no adapter (any more)."""
    if not is_adapter_layer(layer):
        return
    if layer._lowrank.specs:
        raise ValueError(
            f"{where(path_of(layer))}: delete its adapters before "
            "turning it back into a plain layer."
        )
    original = layer._lowrank.original_class
    layer._lowrank.drop_seed()
    del layer._lowrank
    # Caches a subclass may have set while it held adapters.
    layer.__dict__.pop("_lowrank_factorization", None)
    quantize_hooks.remove_layer_hook(layer)
    keras_private.swap_class(layer, original)
    keras_private.refresh_call_signature(layer)
