"""KerasHub knowledge: which layers are the backbone, the head and the default
targets of a KerasHub model.

Imported lazily: `keras_hub` is only touched when the model at hand comes from
it, so keras_lowrank works without KerasHub installed.
"""

import sys


def _keras_hub():
    return sys.modules.get("keras_hub")


def is_keras_hub_model(model):
    """Whether `model` is a KerasHub `Backbone` or `Task`."""
    hub = _keras_hub()
    if hub is None:
        return False
    return isinstance(model, (hub.models.Backbone, hub.models.Task))


def backbone_of(model):
    """The `Backbone` of a KerasHub task or backbone, else `None`."""
    hub = _keras_hub()
    if hub is None:
        return None
    if isinstance(model, hub.models.Backbone):
        return model
    if isinstance(model, hub.models.Task):
        return model.backbone
    return None


def default_target_names(model):
    """The layer names KerasHub itself adapts by default for this
    architecture: its attention query and value projections.

    `Backbone.default_lora_layer_names()` is KerasHub's own public answer
    (`["query_dense", "value_dense", "query", "value"]`, extended by vision
    models), so this stays right as KerasHub adds architectures.
    """
    backbone = backbone_of(model)
    if backbone is None:
        return None
    return list(backbone.default_lora_layer_names())


def head_layers(model):
    """Layers of a KerasHub task outside its backbone and preprocessor that
    hold weights: the task head (a classifier, say), which stays trainable by
    default, as PEFT keeps a classification head trainable."""
    hub = _keras_hub()
    if hub is None or not isinstance(model, hub.models.Task):
        return []
    from keras_lowrank.surgery.walk import walk

    inside = {id(layer) for layer in _layers_under(model.backbone)}
    preprocessor = getattr(model, "preprocessor", None)
    if preprocessor is not None:
        inside |= {id(layer) for layer in _layers_under(preprocessor)}
    return [
        visit.layer
        for visit in walk(model)
        if id(visit.layer) not in inside and visit.layer.weights
        and not any(id(p) in inside for p in visit.parents)
    ]


def _layers_under(layer):
    from keras_lowrank.surgery.walk import walk

    return [layer] + [visit.layer for visit in walk(layer)]
