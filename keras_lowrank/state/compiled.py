"""The model's compiled functions follow its graph, and come back when the
graph does.

Keras caches a model's traced `train_function`, `test_function` and
`predict_function` (KerasHub adds `generate_function`) and rebuilds one only
when it is `None`. A traced function is valid exactly as long as what it was
traced with holds: which adapters each layer computes, the variables, the
trainable partition (`refresh.graph_signature`). `follow(model, signature)`
is the one place that acts on that:

- the same signature as the functions were traced for: they are kept;
- another one: they are dropped (Keras traces them again), and the inference
  functions (`predict_function`, `generate_function`) are put aside under the
  signature they were traced for. When the model comes back to a signature
  it had (switching back to an adapter, leaving `per_example_adapters`,
  `disable_adapters` of a stacked model), its functions come back: nothing
  is traced or compiled again.

A signature names variables by their ids, and Python reuses the id of an
object that died; so each signature keeps weak references to its variables,
and a signature one of whose variables died is never matched again. Weak,
because this record must not keep a single weight alive: after
`model.quantize(...)` replaced every float kernel, holding them would keep a
second copy of the whole float model in memory (found on SmolLM2-135M: an
int8 base used 1.08x the float base's peak memory instead of less).
Functions traced with a variable the model no longer has are dropped (that
graph cannot come back), and at most `MAX_CACHED` signatures are kept per
model, least recently used first out.
The train and test functions are never cached: they close over the
optimizer and the compiled metrics, which a verb may replace.
"""

import collections
import weakref

from keras_lowrank.surgery import freezing

CACHED = ("predict_function", "generate_function")
MAX_CACHED = 8
_ATTR = "_keras_lowrank_compiled"


class _Compiled:
    """Per model: the signature the live functions were traced for, and the
    inference functions put aside for others. A plain object (not a dict)
    so Keras's attribute tracking leaves it alone."""

    def __init__(self):
        self.traced_for = None
        self.alive = None  # weak references to what `traced_for` names
        self.cache = collections.OrderedDict()


def follow(model, signature):
    """Keeps, drops or brings back `model`'s compiled functions for the
    graph `signature` (see the module docstring).

    Args:
        model: the model.
        signature: `refresh.graph_signature(model, state)`, or `None` for
            a model without adapters (functions are dropped, nothing kept).

    Example:

    >>> import keras
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> follow(model, "a")  # the functions Keras traces next are for "a"
    >>> model.predict_function = "traced for a"
    >>> follow(model, "b")
    >>> model.predict_function is None  # Keras traces again for "b"
    True
    >>> follow(model, "a")
    >>> model.predict_function
    'traced for a'
    """
    record = model.__dict__.get(_ATTR)
    if record is None:
        record = _Compiled()
        object.__setattr__(model, _ATTR, record)
    key = None if signature is None else (signature, _compile_options(model))
    if key is not None and record.traced_for == key and _all_alive(record.alive):
        return
    if record.traced_for is not None:
        functions = {a: getattr(model, a, None) for a in CACHED}
        if any(f is not None for f in functions.values()):
            record.cache[record.traced_for] = (functions, record.alive)
            record.cache.move_to_end(record.traced_for)
            while len(record.cache) > MAX_CACHED:
                record.cache.popitem(last=False)
    _drop_dead(model, record)
    freezing.reset_compiled_functions(model)
    record.traced_for = key
    if key is None:
        record.alive = None
        record.cache.clear()
        return
    record.alive = _alive(model)
    entry = record.cache.pop(key, None)
    if entry is not None:
        for attr, function in entry[0].items():
            if function is not None:
                setattr(model, attr, function)


def forget(model):
    """Drops every compiled function of `model`, cached ones too."""
    follow(model, None)


def _drop_dead(model, record):
    """Drops the functions traced with a variable the model no longer has
    (a deleted adapter, a removed stack): a variable never comes back, so
    neither can their graph, and they would keep its memory alive."""
    current = {id(v) for v in model.variables}
    for key, (_, alive) in list(record.cache.items()):
        if not _all_alive(alive) or any(
            id(ref()) not in current for ref in alive[0]
        ):
            del record.cache[key]


def _compile_options(model):
    # What a compiled function depends on besides the graph: a re-`compile`
    # may change them (KerasHub's sampler is traced into `generate`).
    sampler = getattr(model, "sampler", None)
    return (
        getattr(model, "jit_compile", None),
        getattr(model, "run_eagerly", None),
        getattr(model, "steps_per_execution", None),
        id(sampler) if sampler is not None else None,
    )


def _alive(model):
    # Weak references to what the signature names by id (the variables and
    # the sampler): a signature whose objects all live names them, not
    # newcomers that took a dead one's id.
    sampler = getattr(model, "sampler", None)
    return (
        [weakref.ref(v) for v in model.variables],
        None if sampler is None else weakref.ref(sampler),
    )


def _all_alive(alive):
    if alive is None:
        return True
    refs, sampler = alive
    return all(ref() is not None for ref in refs) and (
        sampler is None or sampler() is not None
    )
