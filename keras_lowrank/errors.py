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
