"""Which weights train in an adapted model.

The rule, applied as a whole every time the adapter state changes (adapt,
set_adapter, delete, load), so it never depends on history:

- the factors of active, unmerged adapters train;
- a kernel that holds adapters never trains;
- layers in `ModelState.kept` (a KerasHub task head, or the user's
  `trainable=[...]`) train entirely;
- biases train where an active adapter's bias policy asks for it:
  `"lora_only"` the adapted layers' biases, `"all"` every bias in the model;
- everything else is frozen. Leaf layers are frozen with
  `layer.trainable = False`, so layers such as BatchNormalization also switch
  to inference behaviour, as Keras users expect of a frozen layer.
"""

import keras

from keras_lowrank.layers import LowRankLayer
from keras_lowrank.model_state import state_of
from keras_lowrank.walk import own_weights
from keras_lowrank.walk import sublayers
from keras_lowrank.walk import walk


def apply(model):
    """Sets every weight's `trainable` flag in `model` from its adapter state."""
    state = state_of(model)
    visits = walk(model)
    kept = set(state.kept)
    make_all_trainable(model)
    bias_everywhere = any(
        state.options.get(name, {}).get("bias") == "all"
        for name in state.active
    )
    for visit in visits:
        layer = visit.layer
        if any(visit.path == k or visit.path.startswith(k + "/") for k in kept):
            continue
        if isinstance(layer, LowRankLayer):
            layer._refresh_trainable()
        elif not sublayers(layer):
            layer.trainable = False
        else:
            for weight in own_weights(layer):
                weight.trainable = False
    if bias_everywhere:
        for visit in visits:
            bias = getattr(visit.layer, "bias", None)
            if isinstance(bias, keras.Variable):
                bias.trainable = True
    reset_compiled_functions(model)


def make_all_trainable(model):
    """Back to "everything as created": Keras re-enables every variable that
    was created trainable, in every sublayer.

    Set to False first: on the TensorFlow backend, assigning an attribute the
    value it already holds is skipped, so `model.trainable = True` on a
    trainable model would not reach its frozen sublayers.
    """
    model.trainable = False
    model.trainable = True


def reset_compiled_functions(model):
    """Drops the model's cached train/test/predict functions.

    They were traced with the previous adapter state (which adapters apply,
    which variables train) baked in; Keras rebuilds them on the next call.
    """
    for attr in ("train_function", "test_function", "predict_function"):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
    refresh_torch_parameters(model)


def refresh_torch_parameters(model):
    """Re-lists every layer's variables as torch parameters (torch backend).

    On the torch backend each Keras layer, and the model itself, is a
    `torch.nn.Module` whose `torch.nn.ParameterDict` is filled when it is
    built. Adapter variables added later reach their own layer's dict but
    not the model's, so `model.parameters()` (what a PyTorch optimizer or
    `DistributedDataParallel` sees) would miss the factors, and keep variables
    that were removed. Keras does the same refresh after `model.quantize`.
    """
    if keras.backend.backend() != "torch":
        return
    for layer in [model] + [visit.layer for visit in walk(model)]:
        layer._track_variables()

