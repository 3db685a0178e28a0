"""Error messages that more than one module raises: one rule, one message."""


def unknown_adapter(owner, name, known):
    """The one "no adapter named ..." error.

    Args:
        owner: how to name what was asked: a model (its `name` is used) or a
            string such as a layer path.
        name: the adapter name that was asked for.
        known: the adapter names `owner` has.

    Returns:
        A `ValueError` to raise.

    Example:

    >>> str(unknown_adapter("dense", "b", ["a"]))
    "keras_lowrank: layer 'dense' has no adapter named 'b'; it has ['a']. Use one of those names."
    """
    if isinstance(owner, str):
        where = f"keras_lowrank: layer '{owner}'"
    else:
        where = f"keras_lowrank: model '{owner.name}'"
    return ValueError(
        f"{where} has no adapter named {name!r}; it has {sorted(known)}. "
        "Use one of those names."
    )


def check_known_adapter(model, name, known, verb, argument="names"):
    """The one check that `name` names an adapter of `model`: a string
    (`TypeError` otherwise) among `known` (`unknown_adapter` otherwise).

    Args:
        model: the model asked.
        name: what the caller passed as an adapter name.
        known: the adapter names `model` has.
        verb: the public function's name, for the message.
        argument: the argument `name` came in.

    Returns:
        `name`.

    Example:

    >>> import keras
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    >>> check_known_adapter(model, "a", ["a"], "set_adapter")
    'a'
    >>> check_known_adapter(model, 1, ["a"], "set_adapter")
    Traceback (most recent call last):
    ...
    TypeError: keras_lowrank: set_adapter() takes adapter names as strings, got int (1) in `names`. Pass names from ['a'].
    """
    if not isinstance(name, str):
        raise TypeError(
            f"keras_lowrank: {verb}() takes adapter names as strings, got "
            f"{type(name).__name__} ({name!r}) in `{argument}`. Pass names "
            f"from {sorted(known)}."
        )
    if name not in known:
        raise unknown_adapter(model, name, known)
    return name


def stacked_training(owner):
    """The one "stacked adapters do not train" error.

    Args:
        owner: how the message starts: `"keras_lowrank: layer 'x'"` or
            `"keras_lowrank: model 'm'"`.

    Returns:
        A `ValueError` to raise.

    Example:

    >>> str(stacked_training("keras_lowrank: model 'm'"))[:60]
    "keras_lowrank: model 'm': the model's adapters are stacked f"
    """
    return ValueError(
        f"{owner}: the model's adapters are stacked for serving "
        "(keras_lowrank.stack_adapters), which is inference only. Call "
        "keras_lowrank.unstack_adapters(model) before training."
    )
