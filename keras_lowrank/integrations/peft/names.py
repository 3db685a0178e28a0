"""Name tables between Hugging Face `transformers` modules and KerasHub layers.

One `Architecture` per KerasHub backbone family. Each entry pairs a
`transformers` module name (as PEFT writes it after `base_model.model.` and
the model prefix, `{i}` standing for the block index) with the KerasHub layer
path inside the backbone (`{i}`, the same index). The entries mirror the
weight ports of KerasHub's own converters
(`keras_hub/src/utils/transformers/convert_*.py`).

No transposes or head reshapes are listed here, because every converter of
these architectures lays the Keras kernel out so that its input axes,
flattened in kernel-axis order, are the `in_features` of the `nn.Linear`,
and its output axes, likewise, are its `out_features` (for example BERT's
`query` kernel `(384, 12, 32)` is `query.weight` `(384, 384)` transposed and
reshaped). `KernelLayout` does that reshaping generically, so a PEFT
`lora_A.weight` `(r, in)` is the Keras `A` `(*in_axes, r)` and `lora_B.weight`
`(out, r)` the Keras `B` `(r, *out_axes)`. An architecture whose converter
permutes head axes would need an extra field here; none of the tables below
does, and the tests check each one numerically against PEFT.

Adding an architecture is adding a table to `ARCHITECTURES`.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Module:
    """One `transformers` module and the KerasHub layer that holds its weights.

    Attributes:
        hf: module name inside the `transformers` base model, `{i}` for the
            block index (`"encoder.layer.{i}.attention.self.query"`).
        keras: layer path inside the KerasHub backbone (or, for task heads,
            inside the task), same `{i}`.
    """

    hf: str
    keras: str


@dataclasses.dataclass(frozen=True)
class Task:
    """How a KerasHub task model appears on the `transformers` side.

    Attributes:
        prefix: module-name prefix of the backbone inside the `transformers`
            task model (`"bert."` in `BertForSequenceClassification`,
            `"model."` in `LlamaForCausalLM`).
        task_type: PEFT's `task_type` for this kind of model (or `None`).
        heads: task-head modules (outside the backbone) PEFT can save as
            `modules_to_save`; their `keras` paths are relative to the task.
    """

    prefix: str
    task_type: str = None
    heads: tuple = ()


@dataclasses.dataclass(frozen=True)
class ExpertParam:
    """One 3-D `nn.Parameter` of a `transformers` expert module.

    Attributes:
        hf: the parameter's name (`"gate_up_proj"`), `(E, out, in)`, or
            `(E, in, out)` for modules with `is_transposed=True`.
        kernels: the KerasHub expert layer's kernel attributes it holds,
            `(E, in, out)` each; several ones are blocks of its output
            columns, in order (Mixtral: `[gate | up]`).
    """

    hf: str
    kernels: tuple


@dataclasses.dataclass(frozen=True)
class Experts:
    """Where the expert banks of a `transformers` MoE model are.

    Attributes:
        hf: the experts module, `{i}` for the block index
            (`"layers.{i}.mlp.experts"`).
        block: the KerasHub decoder block holding that bank
            (`"transformer_layer_{i}"`; the MoE block inside is auto-named,
            so the bank is found by structure, not by path).
        params: the module's 3-D parameters, in `named_parameters` order,
            which is the order PEFT nests its wrappers in.
    """

    hf: str
    block: str
    params: tuple


@dataclasses.dataclass(frozen=True)
class Architecture:
    """The name table of one KerasHub backbone family.

    Attributes:
        name: short name, for messages (`"bert"`).
        backbones: KerasHub backbone class names (any class in the model's
            MRO counts).
        linear: the `nn.Linear` projections LoRA can target.
        norms: LayerNorms with a bias (`bias="all"`, `modules_to_save`).
        tasks: KerasHub task class name (any class in the task's MRO) ->
            `Task`.
        fused: module-name endings of fused projections in related
            `transformers` models, refused with a specific message.
        experts: the MoE expert banks PEFT adapts with
            `target_parameters` (`Experts`), `None` without any.
        embeddings: the token embedding, whose rows PEFT's
            `trainable_token_indices` trains.
    """

    name: str
    backbones: tuple
    linear: tuple
    norms: tuple = ()
    tasks: dict = dataclasses.field(default_factory=dict)
    fused: tuple = ()
    experts: object = None
    embeddings: tuple = ()

    @property
    def prefixes(self):
        """Every known backbone prefix, longest first ("" included)."""
        found = {""} | {task.prefix for task in self.tasks.values()}
        return sorted(found, key=len, reverse=True)


BERT = Architecture(
    name="bert",
    backbones=("BertBackbone",),
    linear=(
        Module(
            "encoder.layer.{i}.attention.self.query",
            "transformer_layer_{i}/self_attention_layer/query",
        ),
        Module(
            "encoder.layer.{i}.attention.self.key",
            "transformer_layer_{i}/self_attention_layer/key",
        ),
        Module(
            "encoder.layer.{i}.attention.self.value",
            "transformer_layer_{i}/self_attention_layer/value",
        ),
        Module(
            "encoder.layer.{i}.attention.output.dense",
            "transformer_layer_{i}/self_attention_layer/attention_output",
        ),
        Module(
            "encoder.layer.{i}.intermediate.dense",
            "transformer_layer_{i}/feedforward_intermediate_dense",
        ),
        Module(
            "encoder.layer.{i}.output.dense",
            "transformer_layer_{i}/feedforward_output_dense",
        ),
        Module("pooler.dense", "pooled_dense"),
    ),
    norms=(
        Module("embeddings.LayerNorm", "embeddings_layer_norm"),
        Module(
            "encoder.layer.{i}.attention.output.LayerNorm",
            "transformer_layer_{i}/self_attention_layer_norm",
        ),
        Module(
            "encoder.layer.{i}.output.LayerNorm",
            "transformer_layer_{i}/feedforward_layer_norm",
        ),
    ),
    tasks={
        # BertForSequenceClassification: dropout + `classifier` on the pooled
        # output, as BertTextClassifier's `logits` Dense.
        "BertTextClassifier": Task(
            "bert.", "SEQ_CLS", heads=(Module("classifier", "logits"),)
        ),
        "BertMaskedLM": Task("bert."),
    },
    fused=("qkv", "query_key_value", "Wqkv"),
)


def _decoder(name, backbones, block, attention, mlp, experts=None):
    """The table of a Llama-style decoder (`q/k/v/o_proj`, then a gated MLP,
    or an MoE expert bank when `mlp` is `None`)."""
    linear = (
        Module("layers.{i}.self_attn.q_proj", f"{block}/{attention}/query"),
        Module("layers.{i}.self_attn.k_proj", f"{block}/{attention}/key"),
        Module("layers.{i}.self_attn.v_proj", f"{block}/{attention}/value"),
        Module(
            "layers.{i}.self_attn.o_proj",
            f"{block}/{attention}/attention_output",
        ),
    )
    if mlp is not None:
        gate, up, down = mlp
        linear += (
            Module("layers.{i}.mlp.gate_proj", f"{block}/{gate}"),
            Module("layers.{i}.mlp.up_proj", f"{block}/{up}"),
            Module("layers.{i}.mlp.down_proj", f"{block}/{down}"),
        )
    return Architecture(
        name=name,
        backbones=backbones,
        linear=linear,
        # XForCausalLM wraps XModel as `model`.
        tasks={"CausalLM": Task("model.", "CAUSAL_LM")},
        # Phi-3 style fused projections.
        fused=("qkv_proj", "gate_up_proj"),
        experts=experts,
        embeddings=(Module("embed_tokens", "token_embedding"),),
    )


_LLAMA_STYLE_MLP = (
    "feedforward_gate_dense",
    "feedforward_intermediate_dense",
    "feedforward_output_dense",
)

# convert_llama3.py (LlamaBackbone covers Llama 2 and 3 in KerasHub).
LLAMA = _decoder(
    "llama",
    ("LlamaBackbone",),
    "transformer_layer_{i}",
    "self_attention",
    _LLAMA_STYLE_MLP,
)

# convert_mistral.py.
MISTRAL = _decoder(
    "mistral",
    ("MistralBackbone",),
    "transformer_layer_{i}",
    "self_attention",
    _LLAMA_STYLE_MLP,
)

# convert_qwen.py (`model_type` "qwen2"; q/k/v carry biases).
QWEN2 = _decoder(
    "qwen2",
    ("QwenBackbone",),
    "transformer_layer_{i}",
    "self_attention",
    _LLAMA_STYLE_MLP,
)

# convert_qwen3.py (q_norm/k_norm are RMSNorms without bias).
QWEN3 = _decoder(
    "qwen3",
    ("Qwen3Backbone",),
    "transformer_layer_{i}",
    "self_attention",
    _LLAMA_STYLE_MLP,
)

# convert_gemma.py (Gemma and Gemma 2).
GEMMA = _decoder(
    "gemma",
    ("GemmaBackbone",),
    "decoder_block_{i}",
    "attention",
    ("ffw_gating", "ffw_gating_2", "ffw_linear"),
)

# MoE decoders (convert_mixtral.py, convert_qwen_moe.py,
# convert_qwen3_moe.py). transformers 5 keeps each layer's experts as fused
# 3-D parameters `gate_up_proj (E, 2I, H)` (columns [gate | up]) and
# `down_proj (E, H, I)`, which PEFT adapts with `target_parameters`. The
# dense MLPs beside the experts (Qwen2-MoE's shared expert, Qwen3-MoE's
# `mlp_only_layers`) sit in auto-named blocks and are not mapped.
_GATE_UP_DOWN = (
    ExpertParam(
        "gate_up_proj",
        ("_expert_feedforward_gate_dense",
         "_expert_feedforward_intermediate_dense"),
    ),
    ExpertParam("down_proj", ("_expert_feedforward_output_dense",)),
)
_FUSED_GATE_UP_DOWN = (
    ExpertParam("gate_up_proj", ("_expert_feedforward_gate_dense",)),
    ExpertParam("down_proj", ("_expert_feedforward_output_dense",)),
)
_MOE_BLOCK = "transformer_layer_{i}"

MIXTRAL = _decoder(
    "mixtral",
    ("MixtralBackbone",),
    _MOE_BLOCK,
    "self_attention",
    None,
    Experts("layers.{i}.mlp.experts", _MOE_BLOCK, _GATE_UP_DOWN),
)

QWEN_MOE = _decoder(
    "qwen2_moe",
    ("QwenMoeBackbone",),
    _MOE_BLOCK,
    "self_attention",
    None,
    Experts("layers.{i}.mlp.experts", _MOE_BLOCK, _FUSED_GATE_UP_DOWN),
)

QWEN3_MOE = _decoder(
    "qwen3_moe",
    ("Qwen3MoeBackbone",),
    _MOE_BLOCK,
    "self_attention",
    None,
    Experts("layers.{i}.mlp.experts", _MOE_BLOCK, _FUSED_GATE_UP_DOWN),
)

ARCHITECTURES = (
    BERT, LLAMA, MISTRAL, QWEN2, QWEN3, GEMMA, MIXTRAL, QWEN_MOE, QWEN3_MOE,
)
