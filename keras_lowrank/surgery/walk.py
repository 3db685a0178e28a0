"""Walking a model's layers: every layer once, with its parents and path.

A layer's *path* here is the chain of layer names from the model down to it,
joined by "/": `"transformer_layer_0/self_attention_layer/query"` in a KerasHub
backbone, `"block/inner"` for a layer `inner` inside a custom layer `block`.
It is what adapters are keyed by, in `.keras` files and adapter files. It
equals Keras's `layer.path` for layers built inside their parents' name
scopes, and unlike `layer.path` it does not depend on the model's own,
often auto-generated, name (Keras's `layer.path` reads `"sequential/dense"`
before a save and `"dense"` after a reload).

Keras has no public recursive walk over sublayers; `Layer._flatten_layers` is
what Keras itself uses for `model.weights`, so this module is the single place
that calls it.
"""

import dataclasses

import keras

from keras_lowrank import keras_private


@dataclasses.dataclass(frozen=True)
class Visit:
    """One layer met while walking a model.

    Attributes:
        layer: the layer.
        parents: the chain of enclosing layers, outermost first (excluding
            the model itself).
        path: the layer's path inside the model (see the module docstring).
    """

    layer: keras.layers.Layer
    parents: tuple
    path: str


def sublayers(layer):
    """Direct sublayers of `layer`, in tracking order."""
    return keras_private.direct_sublayers(layer)


def walk(model):
    """Every layer inside `model` (not the model itself), depth first, each
    once even if shared."""
    seen = {id(model)}
    out = []

    def visit(layer, parents, prefix):
        for child in sublayers(layer):
            if id(child) in seen:
                continue
            seen.add(id(child))
            path = prefix + child.name
            out.append(Visit(child, parents, path))
            visit(child, parents + (child,), path + "/")

    visit(model, (), "")
    return out


def own_weights(layer):
    """Weights created by `layer` itself, not by its sublayers."""
    inner = {id(w) for child in sublayers(layer) for w in child.weights}
    return [w for w in layer.weights if id(w) not in inner]


def bias_weights(layer):
    """The layer's bias variables: `bias` (Dense, EinsumDense, Conv, ...) and
    a normalisation layer's `beta`, which is what PyTorch and PEFT call that
    layer's bias (`bias="all"` trains every one of them, as in PEFT)."""
    out = []
    for attr in ("bias", "beta"):
        value = getattr(layer, attr, None)
        if isinstance(value, keras.Variable) and value not in out:
            out.append(value)
    return out


def find_layer(model, path):
    """The layer inside `model` whose path is `path`, or `None`."""
    for visit_ in walk(model):
        if visit_.path == path:
            return visit_.layer
    return None


def paths_by_layer(model):
    """`{id(layer): path}` for every layer inside `model`."""
    return {id(v.layer): v.path for v in walk(model)}
