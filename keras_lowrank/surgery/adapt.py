"""`adapt()` and `unload()`: putting adapters into a model and taking them out.

Both work in place on the layer objects the model already holds (subclassed
and KerasHub models cannot have sublayers swapped after build), and both are
all-or-nothing: every check (`adapt_checks`) runs before the first change,
and each runs as a `keras_lowrank.state.transaction.transaction`, so a
failure half-way (at any layer, of any kind) rolls every change back.
"""

import gc


from keras_lowrank.integrations import moe
from keras_lowrank.lifecycle import check_activatable
from keras_lowrank.state import owned
from keras_lowrank.surgery import targets as targeting
from keras_lowrank.layers import adapter_class_for
from keras_lowrank.layers import quantized as quantization
from keras_lowrank.state.model_state import ModelState
from keras_lowrank.state.model_state import adapted_layers
from keras_lowrank.io.keras_file import mark_adapted
from keras_lowrank.state.model_state import state_of
from keras_lowrank.io.keras_file import unmark_adapted
from keras_lowrank.state.transaction import check_not_disabled
from keras_lowrank.state.transaction import transaction
from keras_lowrank.spec import AdapterSpec
from keras_lowrank.spec import check_adapter_name
from keras_lowrank.surgery.adapt_checks import check_model
from keras_lowrank.surgery.adapt_checks import check_not_nested
from keras_lowrank.surgery.adapt_checks import check_plan
from keras_lowrank.surgery.adapt_checks import kept_paths
from keras_lowrank.surgery.adapt_checks import options_record
from keras_lowrank.surgery.adapt_checks import spec_for
from keras_lowrank.surgery.token_targets import token_plan
from keras_lowrank.surgery.walk import walk

BIAS_POLICIES = ("none", "lora_only", "all")


def adapt(
    model,
    rank=8,
    alpha=None,
    targets=None,
    exclude=None,
    dropout=0.0,
    scaling="standard",
    method="lora",
    init="default",
    bias="none",
    trainable=None,
    name="default",
    rank_pattern=None,
    alpha_pattern=None,
    seed=None,
    modules_to_save=None,
    trainable_tokens=None,
):
    """Adds a low-rank adapter to `model`'s layers, in place, and freezes the
    rest.

    Every targeted layer becomes its `LowRank*` counterpart (same object, same
    kernel variable) holding an adapter called `name`; that adapter becomes
    the only active one. Everything else is frozen, except the layers named
    in `trainable` and, for KerasHub task models, the task head outside the
    backbone. The model object keeps working as before (`fit`, `predict`,
    `generate`, `save`).

    Args:
        model: a built Keras model: Sequential, Functional, subclassed, or a
            KerasHub backbone or task.
        rank: rank `r` of every update (see `rank_pattern`).
        alpha: scaling numerator; defaults to `rank`.
        targets: which layers to adapt: names, `layer.path` suffixes, glob
            patterns, a regular expression (a lone string or `re.Pattern`),
            layer classes, or the presets `"attention"`, `"mlp"`,
            `"all-linear"`, `"experts"` (the expert kernels of KerasHub
            mixture-of-experts layers; `"mlp"` and `"all-linear"` include
            them and leave the routers out). `None`: for KerasHub models the architecture's
            attention query and value projections; otherwise every Dense and
            EinsumDense except the output layers (those that feed a model
            output with no other Dense/EinsumDense in between).
        exclude: layers to leave out, in the same forms.
        dropout: dropout rate on the adapter path.
        scaling: `"standard"` (`alpha/r`) or `"rslora"` (`alpha/sqrt(r)`).
        method: `"lora"` or `"dora"`.
        init: `"default"`, `"gaussian"`, `"pissa"` or `"olora"`.
        bias: `"none"` (all biases frozen), `"lora_only"` (the adapted layers'
            biases train) or `"all"` (every bias trains).
        trainable: layers (names, paths or patterns) that train entirely, like
            PEFT's `modules_to_save`. `None` keeps a KerasHub task's head
            trainable; a list replaces that default (`[]` freezes the head).
            Each adapter keeps its own copy of these layers' weights: they
            switch with it and travel in its adapter file.
        name: the adapter's name.
        rank_pattern: `{pattern: rank}` overriding `rank` for matching layers
            (patterns as in `targets`; the first match wins).
        alpha_pattern: `{pattern: alpha}`, likewise.
        seed: optional int seed for the initial factors.
        modules_to_save: PEFT's name for `trainable`; pass one or the other.
        trainable_tokens: embedding rows that train, as PEFT's
            `trainable_token_indices`: a list of token ids (rows of the
            token embedding: a KerasHub backbone's `token_embedding`, else
            the model's only Embedding) or `{layer: [ids]}`. Only those rows'
            change trains (a `len(ids)`×width delta, never the table); a tied
            KerasHub table's logits see it too. The rows belong to the
            adapter `name`: they switch, merge, save and load with it. With
            `targets=[]` only the rows train (PEFT's
            `TrainableTokensConfig`).

    Returns:
        `model`.

    Example:

    >>> import keras, keras_lowrank
    >>> model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(32),
    ...                           keras.layers.Dense(2)])
    >>> model = keras_lowrank.adapt(model, rank=4)
    >>> [w.name for w in model.trainable_weights]
    ['lowrank_A_default', 'lowrank_B_default']
    """
    check_model(model)
    check_adapter_name(name)
    if bias not in BIAS_POLICIES:
        raise ValueError(
            f"keras_lowrank: unknown bias policy {bias!r}. Use 'none', "
            "'lora_only' or 'all'."
        )
    base_spec = AdapterSpec(
        rank=rank,
        alpha=alpha,
        scaling=scaling,
        dropout=dropout,
        method=method,
        init=init,
        bias="none" if bias == "none" else "all",
    )
    # Read once (a generator would be empty the second time) and checked
    # before anything else; what is used is what gets recorded.
    if modules_to_save is not None:
        if trainable is not None:
            raise TypeError(
                "keras_lowrank: adapt() got both `trainable` and "
                "`modules_to_save`, which are one option (PEFT's name and "
                "ours). Pass one of them."
            )
        trainable = modules_to_save
    targets = targeting.normalize("targets", targets)
    exclude = targeting.normalize("exclude", exclude)
    trainable = targeting.normalize("trainable", trainable, lone_regex=False)
    rank_pattern = targeting.check_pattern("rank_pattern", rank_pattern)
    alpha_pattern = targeting.check_pattern("alpha_pattern", alpha_pattern)
    # MoE expert kernels are layers of their own while a verb runs.
    with moe.prepared(model):
        if targets == [] and trainable_tokens is not None:
            chosen = []  # the rows alone (PEFT's TrainableTokensConfig)
        else:
            chosen = targeting.select_layers(model, targets, exclude)
        ranks = targeting.pattern_layers(model, chosen, "rank_pattern", rank_pattern)
        alphas = targeting.pattern_layers(model, chosen, "alpha_pattern", alpha_pattern)
        plan = [
            (visit, spec_for(visit, base_spec, ranks, alphas, alpha is not None))
            for visit in chosen
        ]
        plan += token_plan(model, trainable_tokens, chosen)
        check_plan(model, plan, name)
        kept = kept_paths(model, trainable, plan)
        record = options_record(
            rank, alpha, targets, exclude, dropout, scaling, method, init,
            bias, trainable, rank_pattern, alpha_pattern,
            [visit.path for visit, _ in plan], kept,
            {v.path: s.token_ids for v, s in plan if s.is_token_rows},
        )
        install(model, name, plan, record, seed=seed)
    return model


def install(
    model, name, plan, record, seed=None, factors=None, owned_values=None,
    verb="adapt",
):
    """Adds adapter `name` to the layers of `plan` and makes it the only
    active adapter; the one path `adapt()`, `combine()` and `load_adapter()`
    share. All-or-nothing: a failure rolls every change back.

    Args:
        model: a built model (adapted or not).
        name: the new adapter's name (checked by the caller).
        plan: `[(walk.Visit, AdapterSpec)]`, checked with `check_plan`.
        record: the JSON-ready options record (`options_record`); its
            `"kept"` and `"bias"` entries say what the adapter owns.
        seed: seed for the initial factors (when `factors` is None).
        factors: `{path: {"A": array, "B": array, ...}}`: values for the
            factors, in the layers' stored layouts; `None` initialises them.
        owned_values: `{key: array}`: the adapter's copies of the weights it
            owns (the record's `"owned"` keys, computed from `"kept"` and
            `"bias"` when absent); missing keys start as copies of the base
            model's values.
        verb: the calling verb's name, for messages.
    """
    state = state_of(model, required=False)
    if state is not None and name in state.options:
        raise ValueError(
            f"keras_lowrank: model '{model.name}' already has an adapter "
            f"named {name!r}. Use another name, or "
            "keras_lowrank.delete_adapter(model, name) first."
        )
    check_not_disabled(model, verb)
    check_not_nested(model)
    check_activatable(model, [name])
    keys = record.get("owned")
    if keys is None:
        keys = owned.keys_for(
            model, record["kept"], record["bias"], record["layers"]
        )
        record = {**record, "owned": keys}
    # The kernel backup follows the spec: only adapters whose init rewrites
    # the kernel, and only when they are initialised here.
    kernels = [
        visit.layer
        for visit, spec in plan
        if spec.rewrites_kernel and factors is None
    ]
    with transaction(
        model,
        verb,
        layers=[visit.layer for visit, _ in plan],
        kernels=kernels,
        variables=owned.resolve(model, keys).values(),
    ):
        if state is None:
            state = ModelState()
            state.frozen_before = [v.path for v in walk(model) if not v.layer.trainable]
        for visit, spec in plan:
            cls = adapter_class_for(visit.layer)
            cls.become(visit.layer)
            visit.layer.add_adapter(
                name, spec, seed=seed, restore=factors is not None
            )
        if factors is not None:
            for visit, _ in plan:
                layer_vars = visit.layer.adapter_variables(name)
                for key, value in factors[visit.path].items():
                    layer_vars[key].assign(value)
        owned.add_owner(model, state, name, keys, owned_values)
        state.options[name] = record
        state.active = [name]
        model._keras_lowrank = state
        mark_adapted(model)
    return model


def unload(model, quantized="error"):
    """Merges the active adapters and turns every adapted layer back into its
    plain Keras class, in place; returns `model`.

    `quantized` says what happens to int8/int4 kernels (`model.quantize`):
    `"error"` (default) raises before changing anything; `"dequantize"`
    merges into the float kernels they stand for (exact; the layers come back
    unquantized); `"requantize"` merges in float, then quantizes each kernel
    again with its own mode and settings, and warns with the largest change
    this made to a kernel (re-quantizing a merged kernel is lossy).

    Inactive adapters are discarded; layers and biases adapters own keep the
    active adapter's values. The result holds no keras_lowrank class:
    its `.keras` file loads where keras_lowrank is not installed, with the
    same outputs as the adapted model. Layers that were frozen before the
    first `adapt()` are frozen again; everything else is trainable.

    Example:

    >>> import keras, keras_lowrank
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8),
    ...                           keras.layers.Dense(2)])
    >>> _ = keras_lowrank.adapt(model, rank=2)
    >>> type(keras_lowrank.unload(model).layers[0]).__name__
    'Dense'
    """
    state_of(model)
    layers = adapted_layers(model)
    merging = [
        layer
        for layer in layers
        if any(n not in layer.merged_adapters for n in layer.active_adapters)
    ]
    with transaction(model, "unload", kernels=merging):
        dequantized = quantization.prepare_merge(
            layers, quantized, quantization.UNLOAD_POLICIES, "unload"
        )
        for layer in layers:
            layer.merge()
        for layer in layers:
            for name in layer.adapter_names:
                layer.forget_adapter(name)
            type(layer).revert(layer)
        if quantized == "requantize":
            quantization.requantize_merged(dequantized)
        unmark_adapted(model)
        del model._keras_lowrank
    gc.collect()  # free the factors' buffers now (see keras_private.delete_variable)
    return model
