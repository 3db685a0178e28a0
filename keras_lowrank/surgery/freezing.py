"""Which weights train in an adapted model.

The rule, applied as a whole every time the adapter state changes (by
`keras_lowrank.state.refresh.refresh`, after every verb), so it never
depends on history:

- the factors of active, unmerged adapters train;
- a kernel that holds adapters never trains;
- layers in `ModelState.kept` (a KerasHub task head, or the user's
  `trainable=[...]`) train entirely;
- biases train where an active adapter's bias policy asks for it:
  `"lora_only"` the adapted layers' biases, `"all"` every bias in the model;
- everything else is frozen (everything, while the adapters are stacked
  for serving). Leaf layers are frozen with
  `layer.trainable = False`, so layers such as BatchNormalization also switch
  to inference behaviour, as Keras users expect of a frozen layer.
"""

import warnings

import keras

from keras_lowrank import keras_private
from keras_lowrank.layers import LowRankLayer
from keras_lowrank.surgery.walk import own_weights
from keras_lowrank.surgery.walk import sublayers
from keras_lowrank.surgery.walk import bias_weights
from keras_lowrank.surgery.walk import walk


def set_flags(model, state):
    """Sets every weight's `trainable` flag in `model` from `state` (the
    rule in the module docstring)."""
    visits = walk(model)
    # Stacked for serving (inference only): nothing trains, so switching
    # adapters leaves the trainable partition, and the traced graph, alone.
    stacked = state.stacked is not None
    kept = set() if stacked else set(state.kept)
    make_all_trainable(model)
    active = [] if state.disabled or stacked else state.active
    bias_everywhere = any(
        state.options.get(name, {}).get("bias") == "all" for name in active
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
            for bias in bias_weights(visit.layer):
                bias.trainable = True


def set_plain_flags(model, frozen_before):
    """Trainable flags of a model that no longer holds adapters: everything
    trainable, except the layers at the paths `frozen_before` (those frozen
    before the first `adapt()`)."""
    make_all_trainable(model)
    frozen = set(frozen_before)
    for visit in walk(model):
        if visit.path in frozen:
            visit.layer.trainable = False


def make_all_trainable(model):
    """Back to "everything as created": Keras re-enables every variable that
    was created trainable, in every sublayer.

    Set to False first: on the TensorFlow backend, assigning an attribute the
    value it already holds is skipped, so `model.trainable = True` on a
    trainable model would not reach its frozen sublayers.
    """
    model.trainable = False
    model.trainable = True


# Keras's compiled train/test/predict functions and KerasHub's
# `CausalLM.generate_function`: each is rebuilt on the next call when None.
COMPILED_FUNCTIONS = (
    "train_function", "test_function", "predict_function", "generate_function",
)


def reset_compiled_functions(model):
    """Drops the model's cached compiled functions (`COMPILED_FUNCTIONS`).

    They were traced with the previous adapter state (which adapters apply,
    which variables train) baked in; on TensorFlow a stale `tf.function`
    would keep computing with it. Keras and KerasHub rebuild them on the
    next call.
    """
    for attr in COMPILED_FUNCTIONS:
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
        keras_private.retrack_variables(layer)



def trainable_ids(model):
    """The identity of `model`'s trainable variables, in order: what an
    optimizer is built for. Compare before and after an adapter change."""
    return [id(v) for v in model.trainable_variables]


def refresh_optimizer(model, before):
    """Gives `model` a fresh optimizer if its trainable variables changed.

    A Keras optimizer is built for one list of variables (it keeps a slot per
    variable, Adam's moments for instance). After switching adapters the model
    trains other variables: the TensorFlow and PyTorch backends then refuse
    to train ("Unknown variable"), and the JAX backend would silently apply
    the previous adapter's optimizer state to the new variables. So when the
    trainable variables differ from `before` and the model's optimizer is
    already built, the optimizer is replaced by a new, unbuilt instance of the
    same class with the same configuration (learning rate, schedule, ...): the
    next `fit` builds it for the variables that train now. Its state (moments,
    iteration count) starts afresh, as with a new optimizer in PEFT.

    Args:
        model: the model.
        before: `trainable_ids(model)` taken before the change.
    """
    if trainable_ids(model) == before:
        return
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None or not getattr(optimizer, "built", False):
        return
    try:
        fresh = type(optimizer).from_config(optimizer.get_config())
    except Exception as error:  # a custom optimizer without a config round trip
        warnings.warn(
            f"keras_lowrank: the trainable variables of model '{model.name}' "
            f"changed, but its optimizer ({type(optimizer).__name__}) could "
            f"not be re-created from its config ({error}). Call "
            "model.compile(...) again before the next fit().",
            stacklevel=3,
        )
        return
    model.optimizer = fresh
