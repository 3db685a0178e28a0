"""Token-rows adapters (PEFT's `trainable_token_indices`): what a layer must
be for one, checked in one place.

A token-rows adapter is an ordinary adapter whose `A` is the frozen one-hot
selection of some embedding rows and whose `B` holds those rows' change (see
`AdapterSpec.token_ids` and `adapter_math.token_row_factors`). So every path
that reads `A` and `B` (merge, stacks, combine, files, reports) handles it
with no special case; only the checks below, the initial values and the
trainability (`AdapterSpec.trainable_keys`) know about it.
"""

from keras_lowrank.spec import where


def check_token_rows(cls, layout, spec, path):
    """Raises unless adapter class `cls` with kernel `layout` can hold the
    token-rows adapter `spec`; does nothing for other adapters.

    Args:
        cls: the adapter class (`LowRankEmbedding`, ...).
        layout: the layer's `KernelLayout` (`(vocab, width)` for a table).
        spec: the `AdapterSpec`.
        path: the layer, for messages.

    Example:

    >>> from keras_lowrank import AdapterSpec, LowRankEmbedding
    >>> from keras_lowrank.layers import KernelLayout
    >>> check_token_rows(LowRankEmbedding, KernelLayout((10, 4), (), (0,),
    ...                  (1,)), AdapterSpec.for_tokens([12]), "embed")
    Traceback (most recent call last):
    ...
    ValueError: keras_lowrank: layer 'embed': token id 12 is out of range: the embedding has 10 rows (ids 0 to 9). Add the token to the tokenizer and grow the table first, or train a row the vocabulary already has (a reserved or unused token).
    """
    if not spec.is_token_rows:
        return
    if not getattr(cls, "takes_token_rows", False):
        raise ValueError(
            f"{where(path)}: trainable token rows change rows of an "
            f"embedding table, and this layer is a "
            f"{cls.base_class.__name__}. Name an Embedding (or KerasHub "
            "ReversibleEmbedding) layer in trainable_tokens."
        )
    vocab, width = layout.kernel_shape
    for token_id in spec.token_ids:
        if token_id >= vocab:
            raise ValueError(
                f"{where(path)}: token id {token_id} is out of range: the "
                f"embedding has {vocab} rows (ids 0 to {vocab - 1}). Add the "
                "token to the tokenizer and grow the table first, or train a "
                "row the vocabulary already has (a reserved or unused token)."
            )
    if len(spec.token_ids) > width:
        raise ValueError(
            f"{where(path)}: {len(spec.token_ids)} trainable token rows are "
            f"more than the embedding width {width}, so they are no cheaper "
            "than the whole table. Train the whole table instead: "
            f"modules_to_save=['{path}']."
        )
