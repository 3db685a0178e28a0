"""`AdapterSpec`: the options of one adapter on one layer, validated once.

Every entry point (the layer constructors, `adapt()`, adapter files, `.keras`
configs) builds an `AdapterSpec`, so a bad option is refused in one place with
one message, whichever way it arrived.
"""

import dataclasses
import math
import numbers
import re

SCALINGS = ("standard", "rslora")
METHODS = ("lora", "dora")
INITS = ("default", "gaussian", "pissa", "olora")
# Inits that derive the factors from the kernel and leave a residual kernel.
# "pissa_niter_<n>" (randomised SVD, n power iterations) is accepted too.
KERNEL_INITS = ("pissa", "olora")
LAYER_BIAS_POLICIES = ("none", "all")

# Adapter names become part of variable names and paths. PyTorch refuses "."
# in parameter names and Keras refuses "/" in variable names, so keep to a
# conservative alphabet.
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_\-]+$")


def where(path):
    """The prefix every error message starts with: which layer is concerned."""
    return f"keras_lowrank: layer '{path}'" if path else "keras_lowrank"


def check_adapter_name(name, path=None):
    """Raises unless `name` can name an adapter (letters, digits, `_`, `-`)."""
    if not isinstance(name, str) or not _NAME_PATTERN.match(name):
        raise ValueError(
            f"{where(path)}: adapter name {name!r} is not valid. Use letters, "
            "digits, '_' and '-' only, for example name='task_a'."
        )
    return name


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """The options of one adapter on one layer.

    Args:
        rank: positive integer, the rank `r` of `ΔW = A·B`.
        alpha: positive number; the update is scaled by `alpha / r`
            (`"standard"`) or `alpha / sqrt(r)` (`"rslora"`). Defaults to
            `rank`.
        scaling: `"standard"` or `"rslora"`.
        dropout: dropout rate in `[0, 1)` applied to the adapter's input only.
        method: `"lora"` or `"dora"` (weight-decomposed: a trainable
            magnitude per output unit).
        init: `"default"` (A he-uniform, B zeros), `"gaussian"` (A normal
            with std `1/r`, B zeros), `"pissa"` or `"olora"` (factors from the
            kernel's SVD or QR; the frozen kernel keeps the residual), or
            `"pissa_niter_<n>"` (PiSSA from a randomised SVD with `n` power
            iterations, as in PEFT: much faster on large kernels).
        bias: `"none"` (the layer's bias stays frozen) or `"all"` (the layer's
            bias trains with the adapter).
        token_ids: `None`, or the ids of the embedding rows a *token-rows*
            adapter trains (PEFT's `trainable_token_indices`): `ΔW = A·B`
            with `A` the frozen one-hot selection of those rows and `B`
            (`len(token_ids)` × width) their trainable change, starting at
            zero. Build one with `AdapterSpec.for_tokens(ids)`; the other
            options keep their defaults (rank = alpha = the number of ids).

    Example:

    >>> spec = AdapterSpec(rank=8, alpha=16)
    >>> spec.scale
    2.0
    """

    rank: int
    alpha: float = None
    scaling: str = "standard"
    dropout: float = 0.0
    method: str = "lora"
    init: str = "default"
    bias: str = "none"
    token_ids: tuple = None

    def __post_init__(self):
        self.validate()
        if self.alpha is None:
            object.__setattr__(self, "alpha", self.rank)
        if self.token_ids is not None:
            object.__setattr__(
                self, "token_ids", tuple(check_token_ids(self.token_ids))
            )

    @classmethod
    def for_tokens(cls, token_ids, path=None):
        """The spec of a token-rows adapter training the rows `token_ids`.

        Example:

        >>> AdapterSpec.for_tokens([5, 9]).rank
        2
        """
        token_ids = check_token_ids(token_ids, path)
        return cls.checked(path, rank=len(token_ids), token_ids=token_ids)

    def validate(self, path=None):
        """Raises `ValueError`/`TypeError` naming `path` and the fix."""
        at = where(path)
        if isinstance(self.rank, bool) or not isinstance(
            self.rank, numbers.Integral
        ):
            raise TypeError(
                f"{at}: rank must be a positive integer, got {self.rank!r} "
                f"({type(self.rank).__name__}). Pass an int such as rank=8."
            )
        if self.rank <= 0:
            raise ValueError(
                f"{at}: rank must be a positive integer, got {self.rank}. "
                "Pass rank=8 (or any integer >= 1)."
            )
        if self.alpha is not None and (
            isinstance(self.alpha, bool)
            or not isinstance(self.alpha, numbers.Real)
            or not math.isfinite(self.alpha)
            or not self.alpha > 0
        ):
            raise ValueError(
                f"{at}: alpha must be a finite positive number, got "
                f"{self.alpha!r}. Pass a number such as alpha=16, or "
                "alpha=None to use alpha = rank."
            )
        _check_choice(at, "scaling", self.scaling, SCALINGS)
        _check_choice(at, "method", self.method, METHODS)
        if not self.rewrites_kernel:
            _check_choice(
                at, "init", self.init, INITS, extra="'pissa_niter_<n>'"
            )
        _check_choice(at, "bias", self.bias, LAYER_BIAS_POLICIES)
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, numbers.Real)
            or not math.isfinite(self.dropout)
            or not 0.0 <= self.dropout < 1.0
        ):
            raise ValueError(
                f"{at}: dropout must be a finite number in [0, 1), got "
                f"{self.dropout!r}. Pass dropout=0.0 to disable it, or a "
                "rate such as dropout=0.1."
            )
        if self.token_ids is not None:
            self._validate_token_rows(at, path)

    def _validate_token_rows(self, at, path):
        check_token_ids(self.token_ids, path)
        if self.rank != len(self.token_ids):
            raise ValueError(
                f"{at}: a token-rows adapter has rank = the number of its "
                f"token ids ({len(self.token_ids)}), got rank={self.rank}. "
                "Build it with AdapterSpec.for_tokens(token_ids)."
            )
        plain = AdapterSpec(rank=self.rank)
        for option in ("alpha", "scaling", "dropout", "method", "init", "bias"):
            value, default = getattr(self, option), getattr(plain, option)
            if value is not None and value != default:
                raise ValueError(
                    f"{at}: a token-rows adapter trains the rows themselves, "
                    f"so {option}={value!r} does not apply (it must be "
                    f"{default!r}). Build it with "
                    "AdapterSpec.for_tokens(token_ids)."
                )

    @classmethod
    def checked(cls, path=None, **options):
        """`AdapterSpec(**options)`, but a bad option's error names `path`.

        The layers and `from_layer` use this so that a message says which
        layer was being adapted, e.g. "keras_lowrank: layer 'encoder/query':
        rank must be a positive integer, got 0. ..."
        """
        known = {f.name: f.default for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise TypeError(
                f"{where(path)}: unknown adapter option(s) {unknown}; known "
                f"options are {sorted(known)}."
            )
        if all(
            name in options or default is not dataclasses.MISSING
            for name, default in known.items()
        ):
            draft = object.__new__(cls)
            for name, default in known.items():
                object.__setattr__(draft, name, options.get(name, default))
            draft.validate(path)
        return cls(**options)  # a missing `rank` raises Python's TypeError

    @property
    def rewrites_kernel(self):
        """Whether the init takes the factors from the kernel (PiSSA, OLoRA),
        leaving the residual `W − s·A0·B0` as the frozen kernel."""
        from keras_lowrank import adapter_math

        return (
            self.init in KERNEL_INITS
            or adapter_math.pissa_niter(self.init) is not None
        )

    @property
    def is_token_rows(self):
        """Whether this adapter trains embedding rows (`token_ids`)."""
        return self.token_ids is not None

    @property
    def trainable_keys(self):
        """The adapter variables that train while it is active: a
        token-rows adapter's `A` is the fixed selection of its rows."""
        return ("B",) if self.is_token_rows else ("A", "B", "magnitude")

    @property
    def scale(self):
        """The factor `s` that multiplies `A·B`."""
        from keras_lowrank import adapter_math

        return adapter_math.scaling_factor(self.alpha, self.rank, self.scaling)

    def replace(self, **changes):
        """A copy with `changes` applied (and validated)."""
        return dataclasses.replace(self, **changes)

    def get_config(self):
        """A JSON-ready dict; `AdapterSpec(**config)` restores it."""
        config = dataclasses.asdict(self)
        config["rank"] = int(self.rank)
        config["alpha"] = float(self.alpha)
        config["dropout"] = float(self.dropout)
        if self.token_ids is None:
            # Files without token rows stay readable by older versions.
            del config["token_ids"]
        else:
            config["token_ids"] = [int(i) for i in self.token_ids]
        return config

    @classmethod
    def from_config(cls, config, path=None):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(
                f"{where(path)}: unknown adapter option(s) {unknown}; known "
                f"options are {sorted(known)}. The file or config was written "
                "by a newer keras_lowrank: upgrade keras_lowrank."
            )
        return cls.checked(path, **config)


# The adapter options a layer constructor accepts as keywords, besides the
# `AdapterSpec` fields: the name of the adapter it creates and the saved state.
SPEC_OPTIONS = tuple(f.name for f in dataclasses.fields(AdapterSpec))
STATE_OPTIONS = ("adapters", "active_adapters", "merged_adapters")


def split_adapter_options(kwargs):
    """Pops the adapter keywords (`rank=`, `alpha=`, ..., `adapter_name=`,
    the saved state) out of a layer constructor's `kwargs`.

    Returns:
        `(options, state)`: the `AdapterSpec` keywords given, and
        `{"adapter_name", "adapters", "active_adapters", "merged_adapters"}`.
    """
    options = {k: kwargs.pop(k) for k in SPEC_OPTIONS if k in kwargs}
    state = {k: kwargs.pop(k, None) for k in STATE_OPTIONS}
    state["adapter_name"] = kwargs.pop("adapter_name", "default")
    return options, state


def spec_from_arguments(adapter, options, path=None, owner="the layer"):
    """The `AdapterSpec` of `adapter=` or of the keywords, never both.

    Args:
        adapter: an `AdapterSpec` or `None`.
        options: the `AdapterSpec` keywords given (`rank=8, alpha=16`).
        path: the layer, for messages.
        owner: the constructor's name, for messages.
    """
    if adapter is None:
        return AdapterSpec.checked(path, **{"rank": 8, **options})
    if not isinstance(adapter, AdapterSpec):
        raise TypeError(
            f"{where(path)}: {owner} got adapter={adapter!r} "
            f"({type(adapter).__name__}); pass an AdapterSpec, e.g. "
            "adapter=keras_lowrank.AdapterSpec(rank=8, alpha=16)."
        )
    if options:
        given = ", ".join(f"{k}={v!r}" for k, v in sorted(options.items()))
        raise TypeError(
            f"{where(path)}: {owner} got both adapter= and {given}. Give the "
            "adapter's options once: either adapter=AdapterSpec(...) or the "
            "keywords (rank=..., alpha=...)."
        )
    adapter.validate(path)
    return adapter


def check_seed(seed, path=None):
    """Raises unless `seed` is `None`, an int in `[0, 2**32)` or a
    `keras.random.SeedGenerator` (the seeds every backend accepts: JAX
    refuses negative ones, and torch and TensorFlow wrap them differently).

    Example:

    >>> check_seed(7)
    7
    """
    import keras

    if seed is None or isinstance(seed, keras.random.SeedGenerator):
        return seed
    if (
        isinstance(seed, bool)
        or not isinstance(seed, numbers.Integral)
        or not 0 <= seed < 2**32
    ):
        raise ValueError(
            f"{where(path)}: seed must be None or an integer in "
            f"[0, 2**32), got {seed!r}. Pass a non-negative int such as "
            "seed=0, or seed=None for a random initialisation."
        )
    return int(seed)


def check_token_ids(token_ids, path=None):
    """`token_ids` as a list of ints; raises unless it is a non-empty list,
    tuple, range or 1-D array of distinct non-negative ints (the one check of
    token ids; the vocabulary range is checked against the layer, in
    `layers.token_rows`).

    Example:

    >>> check_token_ids([3, 3])
    Traceback (most recent call last):
    ...
    ValueError: keras_lowrank: token id 3 is listed twice in token_ids [3, 3]. List each embedding row once.
    """
    at = where(path)
    if hasattr(token_ids, "tolist") and getattr(token_ids, "ndim", None) == 1:
        token_ids = token_ids.tolist()  # a NumPy (or tensor) row of ids
    if isinstance(token_ids, range):
        token_ids = list(token_ids)
    if isinstance(token_ids, (str, bytes)) or not isinstance(
        token_ids, (list, tuple)
    ):
        raise TypeError(
            f"{at}: token_ids must be a list of token ids (ints), got "
            f"{token_ids!r} ({type(token_ids).__name__}). Pass ids such as "
            "[49152, 49153]; tokenizer.token_to_id(token) gives a token's id."
        )
    if not token_ids:
        raise ValueError(
            f"{at}: token_ids is empty. List the ids of the rows to train."
        )
    seen = set()
    for token_id in token_ids:
        if isinstance(token_id, bool) or not isinstance(
            token_id, numbers.Integral
        ):
            raise TypeError(
                f"{at}: token id {token_id!r} ({type(token_id).__name__}) is "
                f"not an int, in token_ids {list(token_ids)!r}. Pass integer "
                "ids; tokenizer.token_to_id(token) gives a token's id."
            )
        if token_id < 0:
            raise ValueError(
                f"{at}: token id {token_id} is negative, in token_ids "
                f"{list(token_ids)!r}. Ids count embedding rows from 0."
            )
        if token_id in seen:
            raise ValueError(
                f"{at}: token id {token_id} is listed twice in token_ids "
                f"{list(token_ids)!r}. List each embedding row once."
            )
        seen.add(token_id)
    return [int(i) for i in token_ids]


def _check_choice(at, option, value, choices, extra=None):
    if value not in choices:
        names = [repr(c) for c in choices] + ([extra] if extra else [])
        raise ValueError(
            f"{at}: unknown {option} {value!r}. Use one of "
            + ", ".join(names)
            + "."
        )
