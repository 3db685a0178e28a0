"""`load_peft_adapter`: a Hugging Face PEFT LoRA folder onto a KerasHub model.

The folder is read and checked (`format`, then `plan.plan_load`) before the
model changes; then the adapter is added with `adapt()` and the planned
values are assigned, in one transaction: a failure anywhere (adapt, an
assignment) leaves the model exactly as it was.
"""

import os

import keras

from keras_lowrank.integrations import keras_hub as hub_integration
from keras_lowrank.integrations.peft.token_rows import assign_rows
from keras_lowrank.integrations import moe
from keras_lowrank.integrations.peft import format as peft_format
from keras_lowrank.integrations.peft.format import fail
from keras_lowrank.integrations.peft.mapping import Target
from keras_lowrank.integrations.peft.mapping import most_common
from keras_lowrank.integrations.peft.plan import plan_load
from keras_lowrank.layers import LowRankLayer
from keras_lowrank.spec import check_adapter_name
from keras_lowrank.state.model_state import state_of
from keras_lowrank.state.refresh import push_active
from keras_lowrank.state.transaction import transaction
from keras_lowrank.surgery.walk import walk


def load_peft_adapter(model, path, name=None):
    """Applies a Hugging Face PEFT LoRA adapter folder to a KerasHub model.

    The folder is what `peft`'s `save_pretrained` writes: `adapter_config.json`
    and `adapter_model.safetensors`. Every tensor is mapped to a KerasHub
    layer through the architecture's name table (BERT, Llama, Mistral, Qwen2,
    Qwen3, Gemma, and the MoE decoders Mixtral, Qwen2-MoE and Qwen3-MoE,
    whose expert parameters PEFT adapts with `target_parameters`); `r`,
    `lora_alpha`, `use_rslora`, `use_dora`, `target_parameters`,
    `rank_pattern`, `alpha_pattern`, `lora_dropout`, `bias` and
    `modules_to_save` (mapped task heads) are honoured. Everything is checked
    before the model changes: a folder that cannot be applied exactly is
    refused with a message naming the module and the reason, and the model
    is left as it was.

    The adapter becomes the model's only active adapter, as after `adapt()`;
    its factors train, the rest is frozen (except `modules_to_save` and a
    task's head). Bias tensors (`bias="lora_only"`/`"all"`) and
    `modules_to_save` weights overwrite the model's own, as in PEFT.

    Args:
        model: a KerasHub backbone or task model of a supported architecture,
            loaded from the same base checkpoint as the adapter's
            (`keras_hub.models.Llama3CausalLM.from_preset("hf://...")`).
        path: the local adapter folder.
        name: the adapter's name in the model (default `"default"`).

    Returns:
        `model`.

    Example:

    ```python
    model = keras_hub.models.Llama3CausalLM.from_preset(base_folder)
    keras_lowrank.load_peft_adapter(model, "my-llama-lora")
    model.generate("The capital of France is")
    ```
    """
    verb = "load_peft_adapter"
    name = "default" if name is None else name
    check_adapter_name(name)
    target = Target.of(model, verb)
    config = peft_format.read_config(os.fspath(path), verb)
    peft_format.check_config(config, verb)
    tensors = peft_format.read_weights(os.fspath(path), verb)
    # MoE expert kernels are layers of their own while the load runs; the
    # ones left without an adapter are tidied away, also after a refusal.
    with moe.prepared(model):
        plan = plan_load(target, config, tensors, verb)
        existing = [
            p.path for p in plan.loras
            if isinstance(p.layer, LowRankLayer)
            and name in p.layer.adapter_names
        ]
        if existing:
            fail(
                f"{verb}: layer '{existing[0]}' already has an adapter named "
                f"{name!r}. Pass another name (name='task_b') or "
                "keras_lowrank.delete_adapter(model, name) first."
            )
        _apply(model, target, config, plan, name)
    return model


def _apply(model, target, config, plan, name):
    from keras_lowrank.surgery.adapt import adapt

    # A file of token rows alone has no rank: adapt()'s defaults then.
    rank = most_common(p.rank for p in plan.loras) if plan.loras else 8
    alpha = most_common(p.alpha for p in plan.loras) if plan.loras else None
    # Explicit per-layer values only where they differ from the default
    # (always both, so that adapt() never re-derives alpha from rank).
    odd = [p for p in plan.loras if (p.rank, p.alpha) != (rank, alpha)]
    trainable = None
    if plan.kept:
        heads = [
            v.path for v in walk(model)
            if any(v.layer is h for h in hub_integration.head_layers(model))
        ]
        trainable = heads + [p for p in plan.kept if p not in heads]
    # One transaction around adapt() (which joins it) and the values that
    # follow: a failure anywhere leaves the model exactly as it was.
    with transaction(
        model, "load_peft_adapter",
        variables=[variable for variable, _, _ in plan.assigns],
    ):
        adapt(
            model,
            rank=rank,
            alpha=alpha,
            targets=[p.path for p in plan.loras],
            dropout=float(config.get("lora_dropout") or 0.0),
            scaling="rslora" if config.get("use_rslora") else "standard",
            method="dora" if config.get("use_dora") else "lora",
            bias=config.get("bias", "none"),
            trainable=trainable,
            name=name,
            rank_pattern={p.path: p.rank for p in odd} or None,
            alpha_pattern={p.path: p.alpha for p in odd} or None,
            trainable_tokens={
                path: ids for path, (_, ids, _) in plan.tokens.items()
            } or None,
        )
        # The joined adapt() does not refresh; the new adapter must hold
        # the weights it owns (biases under bias="lora_only"/"all", kept
        # layers) before the file's values go into them.
        push_active(model, state_of(model))
        for p in plan.loras:
            variables = p.layer.adapter_variables(name)
            for key, value in p.values.items():
                variables[key].assign(value)
        for variable, value, _ in plan.assigns:
            variable.assign(keras.ops.cast(value, variable.dtype))
        for layer, ids, rows in plan.tokens.values():
            assign_rows(layer, name, ids, rows)
