"""Values an adapter owns besides its factors: kept layers and biases.

PEFT calls these `modules_to_save`. An adapter created with
`trainable=[...]` (or, by default, on a KerasHub task: the task head) or with
`bias="lora_only"`/`"all"` trains those weights too, and each adapter keeps
its *own* copy of them: switching adapters switches the head and the biases
with the factors.

How it works. Every owned weight is identified by a *key*,
`"<layer path>/<weight name>"` (`"logits/kernel"`). The model's live variable
always holds the value of exactly one owner, its *holder*: the active adapter
that owns the key, or the base model (`BASE`) when no active adapter does.
Every other owner's value waits in `ModelState.stash` as a NumPy array.
`sync()` swaps values in and out after every change of the active set, so:

- an adapter's copy starts as a copy of the base model's value;
- training changes only the holder's value (the live variable);
- `disable_adapters` puts the base values back for its duration;
- two active adapters may not own the same weight (as in PEFT): which value
  should the variable hold? `conflicts()` finds such pairs before any change.

The stash travels with `.keras` files (see `AdaptedModel.save_own_variables`)
and adapter files carry their adapter's values.
"""

import keras
import numpy as np

from keras_lowrank.surgery.walk import own_weights
from keras_lowrank.surgery.walk import bias_weights
from keras_lowrank.surgery.walk import walk

# The owner name of the base model's values. Not a valid adapter name, so it
# can never clash with one.
BASE = "(base)"


def keyed_weights(layer, path):
    """`{key: variable}` for the weights `layer` creates itself.

    Keys are `"<path>/<weight name>"`; a second weight with the same name in
    the same layer gets `":1"`, `":2"`, ... appended, in creation order.
    """
    out = {}
    for variable in own_weights(layer):
        key = f"{path}/{variable.name}"
        if key in out:
            count = 1
            while f"{key}:{count}" in out:
                count += 1
            key = f"{key}:{count}"
        out[key] = variable
    return out


def is_under(path, root):
    """Whether `path` is `root` or a layer inside it."""
    return path == root or path.startswith(root + "/")


def keys_for(model, kept, bias, adapted):
    """The keys an adapter owns, in model order.

    Args:
        model: the model.
        kept: paths of the layers the adapter keeps fully trainable.
        bias: the adapter's bias policy, `"none"`, `"lora_only"` or `"all"`.
        adapted: paths of the layers the adapter adapts.

    Returns:
        A list of keys: every weight of the kept layers (and of the layers
        inside them), then the biases the policy names.
    """
    keys = []
    adapted = set(adapted)
    for visit in walk(model):
        weights = keyed_weights(visit.layer, visit.path)
        if any(is_under(visit.path, root) for root in kept):
            keys.extend(k for k in weights if k not in keys)
            continue
        if bias == "none":
            continue
        if bias == "lora_only" and visit.path not in adapted:
            continue
        biases = bias_weights(visit.layer)
        keys.extend(
            k
            for k, v in weights.items()
            if any(v is b for b in biases) and k not in keys
        )
    return keys


def resolve(model, keys):
    """`{key: variable}` for `keys`; raises `ValueError` naming a key whose
    layer or weight the model lacks."""
    wanted = {}
    for key in keys:
        wanted.setdefault(_layer_path(key), []).append(key)
    found = {}
    for visit in walk(model):
        if visit.path in wanted:
            weights = keyed_weights(visit.layer, visit.path)
            for key in wanted[visit.path]:
                if key in weights:
                    found[key] = weights[key]
    missing = [key for key in keys if key not in found]
    if missing:
        raise ValueError(
            f"keras_lowrank: the model has no weight '{missing[0]}' (layer "
            f"'{_layer_path(missing[0])}'); the adapter state does not belong "
            "to this model."
        )
    return found


def all_keys(state):
    """Every key owned by some adapter of `state`."""
    keys = []
    for options in state.options.values():
        keys.extend(k for k in options.get("owned", []) if k not in keys)
    return keys


def conflicts(state, names):
    """`(key, first, second)` for the first weight two of `names` both own,
    or `None`."""
    owner = {}
    for name in names:
        for key in state.options[name].get("owned", []):
            if key in owner and owner[key] != name:
                return key, owner[key], name
            owner[key] = name
    return None


def conflict_message(key, first, second):
    return (
        f"keras_lowrank: adapters {first!r} and {second!r} both own their "
        f"copy of '{key}' (layer '{_layer_path(key)}', kept trainable or a "
        "bias they train), so they cannot be active together: the weight can "
        "hold only one of the two values. Activate them one at a time, or "
        "create one of them with trainable=[] and bias='none'."
    )


def add_owner(model, state, name, keys, values=None):
    """Gives adapter `name` its copies of `keys`: `values[key]` where given,
    else a copy of the base model's value. Call before `name` becomes active
    and before `state.options[name]` lists `keys`."""
    base_live = [k for k in keys if state.holders.get(k, BASE) == BASE]
    live = resolve(model, base_live)
    copies = {}
    for key in keys:
        if values is not None and key in values:
            copies[key] = np.array(values[key])
        elif key in live:
            copies[key] = _to_numpy(live[key])
        else:
            copies[key] = np.array(state.stash[BASE][key])
    if copies:
        state.stash.setdefault(name, {}).update(copies)


def sync(model, state):
    """Puts into every owned variable the value of its rightful holder (the
    active adapter owning it, else the base model), stashing the previous
    holder's value."""
    desired = {}
    for name in state.applying:
        for key in state.options[name].get("owned", []):
            desired.setdefault(key, name)
    keys = all_keys(state)
    moves = [
        k for k in keys if desired.get(k, BASE) != state.holders.get(k, BASE)
    ]
    if not moves:
        return
    variables = resolve(model, moves)
    for key in moves:
        want = desired.get(key, BASE)
        have = state.holders.get(key, BASE)
        variable = variables[key]
        state.stash.setdefault(have, {})[key] = _to_numpy(variable)
        variable.assign(state.stash[want].pop(key))
        if not state.stash[want]:
            del state.stash[want]
        if want == BASE:
            del state.holders[key]
        else:
            state.holders[key] = want


def remove_owner(state, name):
    """Drops adapter `name`'s copies. Call once `name` holds no variable
    (inactive and synced) and after `state.options` no longer lists it:
    base copies nobody needs any more go too."""
    if any(holder == name for holder in state.holders.values()):
        raise RuntimeError(
            f"keras_lowrank: internal error: adapter {name!r} still holds "
            "live values; sync() before remove_owner()."
        )
    state.stash.pop(name, None)
    needed = set(all_keys(state))
    base = state.stash.get(BASE, {})
    for key in [k for k in base if k not in needed]:
        del base[key]
    if BASE in state.stash and not state.stash[BASE]:
        del state.stash[BASE]


def value_of(model, state, name, key):
    """Adapter `name`'s value of `key`, as a NumPy array."""
    if state.holders.get(key, BASE) == name:
        return _to_numpy(resolve(model, [key])[key])
    return np.array(state.stash[name][key])


def set_value(model, state, name, key, value):
    """Sets adapter `name`'s value of `key` (live or stashed)."""
    if state.holders.get(key, BASE) == name:
        variable = resolve(model, [key])[key]
        variable.assign(keras.ops.cast(value, variable.dtype))
    else:
        old = state.stash[name][key]
        state.stash[name][key] = np.asarray(value).astype(old.dtype)


def stash_entries(state):
    """`(owner, key, array)` for every stashed value, in a fixed order (the
    order `.keras` files store them in)."""
    return [
        (owner, key, state.stash[owner][key])
        for owner in sorted(state.stash)
        for key in sorted(state.stash[owner])
    ]


def stash_from_entries(model, state, entries):
    """The stash and holders described by `entries` (`{(owner, key): array}`,
    the stashed values read from a weights file), checked against `state`.

    For each owned weight, every owner (its adapters and `BASE`) but one has
    a stashed value; the missing one held the variable when the file was
    written, and holds it again once the file's variables are loaded.

    Raises:
        ValueError: the entries do not fit the adapters of `state`.
    """
    owners = {}
    for name, options in state.options.items():
        for key in options.get("owned", []):
            owners.setdefault(key, [BASE]).append(name)
    unknown = sorted(set(entries) - {(o, k) for k, os_ in owners.items() for o in os_})
    if unknown:
        owner, key = unknown[0]
        raise ValueError(
            f"keras_lowrank: the weights file holds {owner!r}'s copy of "
            f"'{key}', which model '{model.name}' has no use for; it was saved "
            "from a model with other adapters. Load it into a model adapted "
            "the same way."
        )
    variables = resolve(model, list(owners))
    stash, holders = {}, {}
    for key, candidates in owners.items():
        missing = [o for o in candidates if (o, key) not in entries]
        if len(missing) != 1:
            why = (
                f"lacks the copies of '{key}' of {missing}"
                if missing
                else f"holds a copy of '{key}' for each of its owners here "
                f"({candidates}), so its variable holds the value of an "
                "adapter this model does not have"
            )
            raise ValueError(
                f"keras_lowrank: the weights file {why}; it was saved from a "
                f"model with other adapters than model '{model.name}'. Load it "
                "into a model adapted the same way."
            )
        if missing[0] != BASE:
            holders[key] = missing[0]
        for owner in candidates:
            if owner == missing[0]:
                continue
            value = np.array(entries[(owner, key)])
            if tuple(value.shape) != tuple(variables[key].shape):
                raise ValueError(
                    f"keras_lowrank: {owner!r}'s copy of '{key}' has shape "
                    f"{tuple(value.shape)} in the weights file but the model's "
                    f"weight has shape {tuple(variables[key].shape)}."
                )
            stash.setdefault(owner, {})[key] = value
    return stash, holders


def _layer_path(key):
    return key.rsplit("/", 1)[0]


def _to_numpy(variable):
    return np.array(keras.ops.convert_to_numpy(variable))
