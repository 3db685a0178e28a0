"""Opening what the analysis compares: a `.keras` file or a KerasHub preset.

Example:

>>> load_model_or_preset("missing.keras")
Traceback (most recent call last):
...
FileNotFoundError: keras_lowrank: no such file or folder: 'missing.keras'. Pass a .keras file or a KerasHub preset folder.
"""

import json
import os


def load_model_or_preset(path):
    """A Keras model from `path`.

    Args:
        path: a `.keras` file (loaded with `keras_lowrank.load_model`, so
            adapted models keep their adapters) or a KerasHub preset folder
            (a KerasHub preset with `config.json`, or a Hugging Face model
            folder that KerasHub converts): the preset's task model when its
            files name one, else its backbone.

    Returns:
        The model.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: `path` is neither a `.keras` file nor a folder.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"keras_lowrank: no such file or folder: {path!r}. Pass a .keras "
            "file or a KerasHub preset folder."
        )
    if os.path.isdir(path):
        import keras_hub

        task = _task_class(path, keras_hub)
        if task is not None:
            return task.from_preset(path)
        return keras_hub.models.Backbone.from_preset(path)
    if not path.endswith(".keras"):
        raise ValueError(
            f"keras_lowrank: {path!r} is not a .keras file or a preset "
            "folder. Save models with model.save('name.keras')."
        )
    from keras_lowrank.io.keras_file import load_model

    return load_model(path)


def _task_class(path, keras_hub):
    """The task class `task.json` names (KerasHub refuses `Task.from_preset`
    itself), or `None` for a backbone-only preset."""
    import keras

    file = os.path.join(path, "task.json")
    if not os.path.exists(file):
        return None
    with open(file) as f:
        name = json.load(f).get("registered_name", "")
    cls = keras.saving.get_registered_object(name)
    if not (isinstance(cls, type) and issubclass(cls, keras_hub.models.Task)):
        raise ValueError(
            f"keras_lowrank: the preset {path!r} names task {name!r}, which "
            "is not a KerasHub task class this keras-hub knows."
        )
    return cls
