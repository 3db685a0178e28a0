"""How adapted models go through `.keras` files, pickling and cloning.

`adapt()` turns the adapted layers into `LowRank*` layers in place and gives
the model a `ModelState`. It also changes the model's class to a subclass of
its own class, `AdaptedModel` first in the MRO, registered with Keras as
`"keras_lowrank>AdaptedModel"`. That changes what a model does when it is
written out:

- `get_config` wraps the original model's own serialised form together with
  the adapter manifest (`keras_lowrank.io.manifest`), and
  `AdaptedModel.from_config` rebuilds the original model from its own config
  and re-applies the recorded adapters before Keras loads the weights. So
  `keras.saving.load_model("m.keras")` (with keras_lowrank imported) and
  `keras_lowrank.load_model("m.keras")` return the adapted model, for
  Sequential, Functional, subclassed and KerasHub models alike; without
  keras_lowrank, Keras fails loudly on the unknown class instead of silently
  dropping the adapters.
- `pickle` (and so `multiprocessing`, joblib, Ray) goes through the same
  `.keras` form: the adapted class is made on the fly, so it cannot be
  pickled by reference.
- `load_weights` is all-or-nothing: a file that does not fit leaves every
  weight as it was.
- Legacy `.h5` saving is refused: that format names the class by its
  Python name, which no loader can find.
- `keras.models.clone_model` gives a working adapted model (see `adopt`).
"""

import copy
import os
import tempfile
import urllib.parse

import keras
import numpy as np

from keras_lowrank import errors
from keras_lowrank import keras_private
from keras_lowrank.io import manifest as manifest_lib
from keras_lowrank.layers import quantize_hooks
from keras_lowrank.state import owned
from keras_lowrank.state.model_state import ModelState
from keras_lowrank.state.model_state import adapted_layers
from keras_lowrank.state.model_state import adapted_visits
from keras_lowrank.state.model_state import own_state
from keras_lowrank.state.model_state import register_adopter
from keras_lowrank.state.model_state import state_of
from keras_lowrank.state.refresh import refresh

REGISTERED_NAME = "keras_lowrank>AdaptedModel"
_STASH_PREFIX = "lowrank_stash:"


class AdaptedModel:
    """Mixin put first in an adapted model's class; see the module docstring.

    Not instantiated directly: `adapt()` creates `type(model)`'s adapted
    subclass on demand. (Keras's `clone_model` instantiates it for a
    Functional model; `__init__` then rebuilds the state, see `adopt`.)
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if getattr(self, "_keras_lowrank", None) is None:
            adopt(self)

    def get_config(self):
        if keras_private.legacy_h5_saving_in_progress():
            raise _h5_error(self, "keras.saving.save_model(model, 'x.h5')")
        original = type(self)._keras_lowrank_original
        inner = {
            "module": original.__module__,
            "class_name": original.__name__,
            "config": super().get_config(),
            "registered_name": keras.saving.get_registered_name(original),
        }
        build_config = self.get_build_config()
        if build_config is not None:
            inner["build_config"] = build_config
        return {"model": inner, "adapters": manifest_lib.manifest(self)}

    # Refused before Keras starts: a fit that fails inside its first trace
    # leaves a JAX optimizer half-built. The layers refuse too, for custom
    # training loops (`adapter_stack`).
    def fit(self, *args, **kwargs):
        _check_not_stacked(self)
        return super().fit(*args, **kwargs)

    def train_on_batch(self, *args, **kwargs):
        _check_not_stacked(self)
        return super().train_on_batch(*args, **kwargs)

    def save(self, filepath, *args, **kwargs):
        if str(filepath).endswith((".h5", ".hdf5")) or kwargs.get("save_format") == "h5":
            raise _h5_error(self, f"model.save({str(filepath)!r})")
        return super().save(filepath, *args, **kwargs)

    def __reduce__(self):
        # Keras pickles a model as its `.keras` archive, but hands pickle a
        # method of the model's class, and the adapted class is made at run
        # time: pickle cannot find it by name. The archive is the same, only
        # the function that rebuilds the model is a module-level one.
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "model.keras")
            self.save(path)
            with open(path, "rb") as file:
                data = file.read()
        return (_unpickle, (data,))

    # The values adapters own but do not hold right now (their copies of a
    # task head, say) live outside any Keras variable. They are written next
    # to the model's own variables, each under a name that says whose copy of
    # which weight it is ("lowrank_stash:<owner>:<quoted key>"); no Keras
    # layer uses such names.

    def save_own_variables(self, store):
        super().save_own_variables(store)
        for owner, key, value in owned.stash_entries(state_of(self)):
            store[_stash_name(owner, key)] = value

    def load_own_variables(self, store):
        keys = list(store.keys())
        own = {k: store[k] for k in keys if not k.startswith(_STASH_PREFIX)}
        super().load_own_variables(own)
        stored = {
            _stash_entry(k): np.asarray(store[k])
            for k in keys
            if k.startswith(_STASH_PREFIX)
        }
        state = state_of(self)
        stash, holders = owned.stash_from_entries(self, state, stored)
        state.stash, state.holders = stash, holders

    def load_weights(self, filepath, skip_mismatch=False, **kwargs):
        # Keras assigns layer by layer and raises at the end, having
        # overwritten every layer that did fit: keep a copy and put it back,
        # so a file that does not fit changes nothing. (The copy costs one
        # host-memory copy of the weights, for the duration of the load.)
        state = state_of(self)
        variables = list(self.variables)
        if getattr(self, "optimizer", None) is not None:
            variables += list(self.optimizer.variables)
        unique = list({id(v): v for v in variables}.values())
        saved = [(v, keras.ops.convert_to_numpy(v)) for v in unique]
        saved_state = copy.deepcopy(state)
        try:
            result = super().load_weights(filepath, skip_mismatch=skip_mismatch, **kwargs)
            # The file's variables hold the values of the adapters that were
            # active when it was saved; swap in those of the adapters active
            # now.
            owned.sync(self, state_of(self))
        except BaseException:
            for variable, value in saved:
                variable.assign(value)
            self._keras_lowrank = saved_state
            raise
        return result

    @classmethod
    def from_config(cls, config, custom_objects=None):
        if not isinstance(config, dict) or "model" not in config or "adapters" not in config:
            raise manifest_lib.ManifestError(
                "keras_lowrank: this AdaptedModel config has no 'model' or "
                "'adapters' entry; the file is not a keras_lowrank save."
            )
        manifest_lib.check(config["adapters"])  # before building anything
        model = keras.saving.deserialize_keras_object(
            config["model"], custom_objects=custom_objects
        )
        manifest_lib.restore(model, config["adapters"])
        mark_adapted(model)
        refresh(model)  # the one refresh every verb runs
        return model


keras.saving.register_keras_serializable(
    package="keras_lowrank", name="AdaptedModel"
)(AdaptedModel)

_ADAPTED_CLASSES = {}


def _check_not_stacked(model):
    state = getattr(model, "_keras_lowrank", None)
    if state is not None and state.stacked is not None:
        raise errors.stacked_training(f"keras_lowrank: model '{model.name}'")


def mark_adapted(model):
    """Changes `model`'s class to its adapted subclass (idempotent)."""
    if isinstance(model, AdaptedModel):
        return
    quantize_hooks.install_model_hook(model, adapted_layers)
    original = type(model)
    cls = _ADAPTED_CLASSES.get(original)
    if cls is None:
        # The class name is what Keras writes as `class_name` and quotes when
        # it cannot find the class: on a machine without keras_lowrank the
        # error then says which package is missing.
        cls = type(
            f"keras_lowrank.AdaptedModel[{original.__name__}]",
            (AdaptedModel, original),
            {
                "__module__": original.__module__,
                "__doc__": original.__doc__,
                "_keras_lowrank_original": original,
            },
        )
        # Register the subclass under the one public name, so Keras writes
        # "keras_lowrank>AdaptedModel" for it; then point the name back at the
        # mixin, whose `from_config` is the same either way.
        keras.saving.register_keras_serializable(
            package="keras_lowrank", name="AdaptedModel"
        )(cls)
        keras.saving.get_custom_objects()[REGISTERED_NAME] = AdaptedModel
        _ADAPTED_CLASSES[original] = cls
    keras_private.swap_class(model, cls)


def unmark_adapted(model):
    """Gives `model` back its original class."""
    if isinstance(model, AdaptedModel):
        quantize_hooks.remove_model_hook(model)
        keras_private.swap_class(model, type(model)._keras_lowrank_original)


def adopt(model):
    """Makes a model whose layers hold adapters but which has no adapter
    state (what `keras.models.clone_model` returns for an adapted model) a
    working adapted model; returns its `ModelState`, or `None` if no layer of
    `model` holds an adapter.

    The state is rebuilt from what the layers record: each adapter's options
    and layers, and which adapters are active. Adapters that keep their own
    copies of weights (a task head in `trainable=[...]`, biases under
    `bias="lora_only"` or `"all"`) cannot be rebuilt, since a clone has no
    such copies: that is a `ValueError` (for a Functional model, from
    `clone_model` itself) saying to pickle the model or save and reload it,
    which copy everything. (`unload` of a clone unfreezes every layer: which
    layers were frozen before `adapt` is not part of a clone either.)

    Args:
        model: a model, e.g. `keras.models.clone_model(adapted_model)`.

    Returns:
        The model's `ModelState`, or `None`.

    Example:

    >>> import keras, keras_lowrank
    >>> from keras_lowrank.io.keras_file import adopt
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4),
    ...                           keras.layers.Dense(2)])
    >>> _ = keras_lowrank.adapt(model, rank=2, name="task")
    >>> clone = keras.models.clone_model(model)
    >>> adopt(clone).active
    ['task']
    """
    state = own_state(model)
    if state is not None:
        return state
    # Adapter layers inside a nested model that has a state of its own are
    # that model's: `model` holds an adapted model, it is not a clone.
    visits = [
        v for v in adapted_visits(model)
        if not any(own_state(parent) is not None for parent in v.parents)
    ]
    if not visits:
        return None
    from keras_lowrank.layers import LowRankLayer
    from keras_lowrank.surgery.walk import sublayers
    from keras_lowrank.surgery.walk import walk

    kept = [
        visit.path
        for visit in walk(model)
        if not isinstance(visit.layer, LowRankLayer)
        and not sublayers(visit.layer)
        and visit.layer.trainable
        and visit.layer.weights
    ]
    biased = [
        visit.path
        for visit in visits
        for name in visit.layer.adapter_names
        if visit.layer.adapter_spec(name).bias != "none"
    ]
    if kept or biased:
        raise ValueError(
            f"keras_lowrank: model '{model.name}' is a copy of an adapted model "
            "made by keras.models.clone_model, and its adapters keep their own "
            f"copies of the weights of {sorted(set(kept + biased))}, which a "
            "clone does not carry. Copy the model with "
            "pickle.loads(pickle.dumps(model)), or save and reload it "
            "(model.save('m.keras'); keras_lowrank.load_model('m.keras'))."
        )
    state = ModelState()
    for visit in visits:
        layer = visit.layer
        for name in layer.adapter_names:
            spec = layer.adapter_spec(name).get_config()
            options = state.options.setdefault(name, {
                **{k: spec[k] for k in ("rank", "alpha", "scaling", "method",
                                        "init", "dropout") if k in spec},
                "bias": "none",
                "targets": [], "exclude": None, "trainable": None,
                "rank_pattern": {}, "alpha_pattern": {},
                "layers": [], "kept": [], "owned": [],
            })
            options["layers"].append(visit.path)
            options["targets"].append(visit.path)
        for name in layer.active_adapters:
            if name not in state.active:
                state.active.append(name)
    model._keras_lowrank = state
    mark_adapted(model)
    refresh(model)
    return state


register_adopter(adopt)


def load_model(filepath, custom_objects=None, compile=True, safe_mode=True):
    """Loads a `.keras` file saved from an adapted (or plain) model.

    Adapted models come back with their adapters as separate, trainable
    factors, on any backend, whatever backend saved them. This is
    `keras.saving.load_model` with keras_lowrank's classes registered;
    `safe_mode` stays on by default, so loading executes no code from the
    file. An edited or corrupt adapter manifest is refused with an error
    naming the file.

    Args:
        filepath: path to a `.keras` file.
        custom_objects: as for `keras.saving.load_model` (needed for your own
            unregistered classes).
        compile: whether to compile the model as it was saved.
        safe_mode: as for `keras.saving.load_model`.

    Returns:
        The model.

    Example:

    >>> import keras, keras_lowrank, numpy as np, tempfile, os
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8),
    ...                           keras.layers.Dense(2)])
    >>> _ = keras_lowrank.adapt(model, rank=2)
    >>> path = os.path.join(tempfile.mkdtemp(), "m.keras")
    >>> model.save(path)
    >>> loaded = keras_lowrank.load_model(path)
    >>> type(loaded.layers[0]).__name__
    'LowRankDense'
    """
    if not isinstance(filepath, (str, os.PathLike)):
        raise TypeError(
            "keras_lowrank: load_model(filepath): `filepath` must be the path "
            f"of a .keras file (a str or os.PathLike), not "
            f"{type(filepath).__name__} {filepath!r}."
        )
    try:
        return keras.saving.load_model(
            filepath,
            custom_objects=custom_objects,
            compile=compile,
            safe_mode=safe_mode,
        )
    except manifest_lib.ManifestError as error:
        message = str(error).replace("keras_lowrank: ", "", 1)
        raise manifest_lib.ManifestError(
            f"keras_lowrank: '{os.fspath(filepath)}': {message}"
        ) from None


# --- internals ------------------------------------------------------------------


def _unpickle(data):
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.keras")
        with open(path, "wb") as file:
            file.write(data)
        # As Keras's own unpickling: pickle runs code from its input anyway.
        return keras.saving.load_model(path, safe_mode=False)


def _h5_error(model, call):
    return ValueError(
        f"keras_lowrank: {call}: model '{model.name}' has adapters, and the "
        "legacy HDF5 format cannot record them (the file would never load "
        "again). Save it as a .keras file: model.save('model.keras'); or "
        "keras_lowrank.save_adapter(model, 'task.safetensors') for the "
        "adapter alone."
    )


def _stash_name(owner, key):
    return f"{_STASH_PREFIX}{owner}:{urllib.parse.quote(key, safe='')}"


def _stash_entry(name):
    owner, _, key = name[len(_STASH_PREFIX):].partition(":")
    return owner, urllib.parse.unquote(key)
