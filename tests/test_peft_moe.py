"""PEFT `target_parameters` (MoE expert banks) in and out, against real PEFT.

Tiny random Mixtral, Qwen3-MoE and Qwen2-MoE `transformers` models (`transformers` 5:
each layer's experts are fused 3-D parameters `gate_up_proj`, `down_proj`)
are saved with `save_pretrained` and loaded by KerasHub's own converters.
KerasHub 0.32's Qwen3-MoE converter reads `num_experts`, which
`transformers` 5 writes as `num_local_experts`: the test copies the value
into the saved `config.json` before converting (the only workaround).

Both ways must give the same logits: a PEFT folder made by `get_peft_model`
with random factors loaded by `load_peft_adapter`, and a Keras expert
adapter exported by `export_peft_adapter` loaded by
`PeftModel.from_pretrained`.
"""

import copy
import json
import os

import keras
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
keras_hub = pytest.importorskip("keras_hub")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

import keras_lowrank  # noqa: E402
from model_kinds import randomize_adapters  # noqa: E402
from peft_folders import read_folder  # noqa: E402
from peft_folders import write_folder  # noqa: E402
from keras_lowrank.integrations import moe  # noqa: E402
from keras_lowrank.surgery.walk import find_layer  # noqa: E402
from keras_lowrank.surgery.walk import walk  # noqa: E402

TOLERANCE = 1e-4
TOKENS = np.array([[1, 5, 9, 17, 33, 2], [3, 60, 8, 41, 12, 7]])
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
PREFIX = "base_model.model.model.layers.0.mlp.experts."


def max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def all_weights(model):
    return [keras.ops.convert_to_numpy(w).copy() for w in model.weights]


def assert_unchanged(model, before):
    assert not hasattr(model, "_keras_lowrank")
    assert not any(moe.is_host(v.layer) for v in walk(model))
    after = all_weights(model)
    assert len(after) == len(before)
    for x, y in zip(after, before):
        np.testing.assert_array_equal(x, y)


def perturb_peft(model, seed, scale=0.2):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return model.eval()


class MoeModel:
    """A tiny random MoE decoder on both sides."""

    def __init__(self, arch, folder):
        torch.manual_seed(0)
        if arch == "mixtral":
            config = transformers.MixtralConfig(
                vocab_size=64, hidden_size=16, intermediate_size=12,
                num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, num_local_experts=4,
                num_experts_per_tok=2, max_position_embeddings=64,
            )
            hf = transformers.MixtralForCausalLM(config)
            task_cls = keras_hub.models.MixtralCausalLM
        elif arch == "qwen2_moe":
            # With a shared expert, which stays unadapted (not mapped).
            config = transformers.Qwen2MoeConfig(
                vocab_size=64, hidden_size=16, intermediate_size=32,
                moe_intermediate_size=8, shared_expert_intermediate_size=16,
                num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, num_experts=4, num_experts_per_tok=2,
                max_position_embeddings=64,
            )
            hf = transformers.Qwen2MoeForCausalLM(config)
            with torch.no_grad():
                for name, param in hf.named_parameters():
                    if name.endswith("bias"):  # q/k/v biases start at 0
                        param.normal_(0, 0.1)
            task_cls = keras_hub.models.QwenMoeCausalLM
        else:
            # moe_intermediate_size 8: transformers' grouped-mm experts on
            # CPU need rows of a multiple of 16 bytes. rms_norm_eps stays at
            # its default 1e-6: KerasHub's Qwen3MoeAttention does not get
            # `layer_norm_epsilon`, so its q/k norms always use 1e-6.
            config = transformers.Qwen3MoeConfig(
                vocab_size=64, hidden_size=16, intermediate_size=32,
                moe_intermediate_size=8, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, num_experts=4,
                num_experts_per_tok=2, head_dim=8, norm_topk_prob=True,
                max_position_embeddings=64,
            )
            hf = transformers.Qwen3MoeForCausalLM(config)
            task_cls = keras_hub.models.Qwen3MoeCausalLM
        hf.save_pretrained(folder)
        path = os.path.join(folder, "config.json")
        with open(path) as f:
            saved = json.load(f)
        if "num_experts" not in saved and "num_local_experts" in saved:
            saved["num_experts"] = saved["num_local_experts"]
            with open(path, "w") as f:
                json.dump(saved, f)
        self.hf = hf.eval()
        backbone = task_cls.backbone_cls.from_preset(str(folder))
        self.template = (type(backbone), backbone.get_config(), backbone.get_weights())
        self.task_cls = task_cls

    def keras(self):
        cls, config, weights = self.template
        backbone = cls.from_config(config)
        backbone.set_weights(weights)
        return self.task_cls(backbone=backbone, preprocessor=None)

    def keras_logits(self, model):
        out = model(
            {"token_ids": TOKENS, "padding_mask": np.ones_like(TOKENS, dtype=bool)}
        )
        return keras.ops.convert_to_numpy(out)

    def torch_logits(self, model):
        with torch.no_grad():
            return model(input_ids=torch.tensor(TOKENS)).logits.numpy()

    def peft_folder(self, folder, seed=5, **options):
        options.setdefault("target_modules", [])
        options.setdefault("target_parameters", EXPERTS)
        reference = perturb_peft(
            peft.get_peft_model(
                copy.deepcopy(self.hf), peft.LoraConfig(**options)
            ),
            seed=seed,
        )
        reference.save_pretrained(folder)
        return self.torch_logits(reference)


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = MoeModel(arch, tmp_path_factory.mktemp(arch))
        return cache[arch]

    return get


def _kernel_paths(model, name):
    return [
        v.path for v in walk(model)
        if v.path.endswith(name) and hasattr(v.layer, "adapter_names")
    ]


@pytest.mark.parametrize(
    "arch, options",
    [
        ("mixtral", dict(r=2, lora_alpha=4)),
        ("mixtral", dict(r=2, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                         rank_pattern={"down_proj": 4})),
        ("mixtral", dict(r=2, lora_alpha=4, use_rslora=True,
                         target_parameters=["gate_up_proj"])),
        ("qwen3_moe", dict(r=2, lora_alpha=4)),
        ("qwen3_moe", dict(r=4, lora_alpha=8, target_modules=["o_proj"],
                           target_parameters=["mlp.experts.down_proj"])),
        ("qwen2_moe", dict(r=2, lora_alpha=4, target_modules=["q_proj"])),
    ],
    ids=["mixtral", "mixtral-attention-pattern", "mixtral-gate-up-rslora",
         "qwen3_moe", "qwen3_moe-down-attention", "qwen2_moe-attention"],
)
def test_peft_expert_folder_loads_with_equal_logits(
    arch, options, moe_models, tmp_path
):
    models = moe_models(arch)
    expected = models.peft_folder(tmp_path / "peft", **options)
    model = models.keras()
    assert max_diff(expected, models.keras_logits(model)) > 10 * TOLERANCE
    keras_lowrank.load_peft_adapter(model, tmp_path / "peft")
    diff = max_diff(expected, models.keras_logits(model))
    print(f"\nmaxdiff[{keras.backend.backend()}] {arch} load: {diff:.3g}")
    assert diff <= TOLERANCE
    params = options["target_parameters"] if "target_parameters" in options else EXPERTS
    kernels = {
        ("mixtral", True): ["expert_feedforward_gate_dense",
                            "expert_feedforward_intermediate_dense"],
        ("qwen3_moe", True): ["expert_feedforward_gate_dense"],
        ("qwen2_moe", True): ["expert_feedforward_gate_dense"],
    }.get((arch, any("gate_up" in p for p in params)), [])
    if any("down" in p for p in params):
        kernels = kernels + ["expert_feedforward_output_dense"]
    attention = len(options.get("target_modules") or []) * 2
    assert len(keras_lowrank.report(model).rows) == 2 * len(kernels) + attention
    if arch == "mixtral" and kernels[0].endswith("gate_dense"):
        # PEFT's one gate_up adapter: the same A on gate and up, B split.
        gate = find_layer(model, _kernel_paths(model, kernels[0])[0])
        up = find_layer(model, _kernel_paths(model, kernels[1])[0])
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(gate.adapter_variables("default")["A"]),
            keras.ops.convert_to_numpy(up.adapter_variables("default")["A"]),
        )


@pytest.mark.parametrize(
    "arch, options",
    [
        ("mixtral", dict(targets=["experts"], rank=2, alpha=4)),
        ("mixtral", dict(targets=["query", "value", "experts"], rank=2, alpha=8,
                         scaling="rslora",
                         rank_pattern={"expert_feedforward_intermediate_dense": 3})),
        ("mixtral", dict(targets=["expert_feedforward_gate_dense"], rank=2)),
        ("qwen3_moe", dict(targets=["experts"], rank=2, alpha=4)),
        ("qwen3_moe", dict(targets=["attention", "experts"], rank=4, alpha=8,
                           rank_pattern={"expert_feedforward_output_dense": 2})),
        ("qwen3_moe", dict(targets=["*transformer_layer_1/*/experts/*"],
                           rank=2)),
        ("qwen2_moe", dict(targets=["query", "experts"], rank=2, alpha=4)),
    ],
    ids=["mixtral", "mixtral-attention-rslora-ranks", "mixtral-gate-only",
         "qwen3_moe", "qwen3_moe-attention-pattern", "qwen3_moe-one-layer",
         "qwen2_moe-attention"],
)
def test_keras_expert_adapter_exports_and_loads_in_peft_with_equal_logits(
    arch, options, moe_models, tmp_path
):
    models = moe_models(arch)
    model = models.keras()
    keras_lowrank.adapt(model, **options)
    randomize_adapters(model, seed=6, scale=0.2)
    expected = models.keras_logits(model)
    keras_lowrank.export_peft_adapter(model, tmp_path / "out")
    config, tensors = read_folder(tmp_path / "out")
    assert config["task_type"] == "CAUSAL_LM"
    assert config["lora_dropout"] == 0.0
    loaded = peft.PeftModel.from_pretrained(
        copy.deepcopy(models.hf), tmp_path / "out"
    ).eval()
    diff = max_diff(expected, models.torch_logits(loaded))
    print(f"\nmaxdiff[{keras.backend.backend()}] {arch} export: {diff:.3g}")
    assert diff <= TOLERANCE
    assert max_diff(expected, models.torch_logits(models.hf)) > 10 * TOLERANCE
    if options["targets"] == ["expert_feedforward_gate_dense"]:
        # Gate alone: gate_up_proj at rank 2 with zero up columns.
        assert config["target_parameters"] == ["mlp.experts.gate_up_proj"]
        b = tensors[PREFIX + "lora_B.weight"]
        assert b.shape == (24, 8) and not b[12:].any() and b[:12].any()
    elif "transformer_layer_1" in options["targets"][0]:
        # Not every expert layer: full names, so that PEFT adds nothing else.
        assert config["target_parameters"] == [
            "model.layers.1.mlp.experts.down_proj",
            "model.layers.1.mlp.experts.gate_up_proj",
        ]
        assert not any(".layers.0." in k for k in tensors)
    else:
        assert sorted(config["target_parameters"]) == sorted(EXPERTS)
    if arch == "mixtral" and options["targets"] == ["experts"]:
        # Separate gate and up adapters of rank 2: gate_up_proj at rank 4.
        assert config["r"] == 2 and config["lora_alpha"] == 4
        assert config["rank_pattern"] == {
            f"model.layers.{i}.mlp.experts.gate_up_proj": 4 for i in range(2)
        }
        assert config["alpha_pattern"] == {
            f"model.layers.{i}.mlp.experts.gate_up_proj": 8 for i in range(2)
        }
        assert tensors[PREFIX + "base_layer.lora_A.weight"].shape == (16, 16)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_a_loaded_peft_expert_adapter_exports_at_its_own_rank(
    arch, moe_models, tmp_path
):
    models = moe_models(arch)
    expected = models.peft_folder(tmp_path / "peft", r=2, lora_alpha=4)
    model = models.keras()
    keras_lowrank.load_peft_adapter(model, tmp_path / "peft")
    keras_lowrank.export_peft_adapter(model, tmp_path / "out")
    config, tensors = read_folder(tmp_path / "out")
    assert config["r"] == 2 and config["rank_pattern"] == {}
    assert config["target_modules"] == []
    _, original = read_folder(tmp_path / "peft")
    assert sorted(tensors) == sorted(original)
    for key, value in original.items():
        np.testing.assert_allclose(tensors[key], value, atol=1e-6, rtol=0)
    loaded = peft.PeftModel.from_pretrained(
        copy.deepcopy(models.hf), tmp_path / "out"
    ).eval()
    assert max_diff(expected, models.torch_logits(loaded)) <= TOLERANCE


# --- refusals ----------------------------------------------------------------


def _edit(**changes):
    def edit(config, tensors):
        config.update(changes)

    return edit


def _rename_down_deeper(config, tensors):
    for what in ("A", "B"):
        value = tensors.pop(PREFIX + f"lora_{what}.weight")
        tensors[PREFIX + f"base_layer.base_layer.lora_{what}.weight"] = value


def _halve_b(config, tensors):
    key = PREFIX + "lora_B.weight"
    tensors[key] = tensors[key][: tensors[key].shape[0] // 2]


BANK = r"Keras layer 'mixtral_backbone/transformer_layer_0/mixtral_sparse_moe_block(_\d+)?/experts'"
LOAD_REFUSALS = {
    "dora": (_edit(use_dora=True), r"use_dora=true and adapts expert module 'model.layers.0.mlp.experts' \(" + BANK + r"\) through target_parameters, which PEFT's ParamWrapper refuses \(no DoRA on parameters\).*Save the expert adapter with use_dora=False"),
    "dropout": (_edit(lora_dropout=0.1), r"lora_dropout=0.1 and adapts expert module 'model.layers.0.mlp.experts' \(" + BANK + r"\).*Set lora_dropout to 0 in adapter_config.json"),
    "magnitude": (lambda c, t: t.update({PREFIX + "lora_magnitude_vector": np.ones(16, "float32")}), r"tensor\(s\) '" + PREFIX.replace(".", r"\.") + r"lora_magnitude_vector' of an expert module are not lora_A/lora_B weights; PEFT's ParamWrapper"),
    "no_target_parameters": (_edit(target_parameters=None), r"the file has LoRA factors for expert module 'model.layers.0.mlp.experts' \(" + BANK + r"\), but the config sets no target_parameters"),
    "too_deep": (_rename_down_deeper, r"LoRA factors under 'model.layers.0.mlp.experts.base_layer.base_layer', but target_parameters=.* selects 2 parameter\(s\) of 'model.layers.0.mlp.experts'"),
    "size": (_halve_b, r"model.layers.0.mlp.experts.lora_B.weight \(model.layers.0.mlp.experts.down_proj\) has shape \(8, 8\), but Keras layer .* \(4 experts, 12 inputs, 16 outputs\) needs \(16, 8\)"),
    "rank": (_edit(rank_pattern={"down_proj": 3}), r"parameter 'model.layers.0.mlp.experts.down_proj' has rank 2 in the file, but the config gives it r=3"),
    "alpha": (_edit(lora_alpha=-1), r"parameter 'model.layers.0.mlp.experts.down_proj' has lora_alpha -1; keras_lowrank needs a positive number"),
    "block": (lambda c, t: t.update({k.replace("layers.0.", "layers.7."): v for k, v in t.items()}), r"expert module 'model.layers.7.mlp.experts' maps to decoder block 7, which this MixtralBackbone does not have"),
    "missing_b": (lambda c, t: t.pop(PREFIX + "lora_B.weight"), r"'model.layers.0.mlp.experts' \(model.layers.0.mlp.experts.down_proj\) has no lora_B.weight; the file is incomplete"),
}


@pytest.fixture
def mixtral_folder(moe_models, tmp_path):
    moe_models("mixtral").peft_folder(tmp_path / "valid", r=2, lora_alpha=4)
    return read_folder(tmp_path / "valid")


@pytest.mark.parametrize("case", list(LOAD_REFUSALS))
def test_expert_load_refuses_with_a_clear_message_and_changes_nothing(
    case, mixtral_folder, moe_models, tmp_path
):
    edit, message = LOAD_REFUSALS[case]
    config, tensors = copy.deepcopy(mixtral_folder)
    edit(config, tensors)
    write_folder(tmp_path / "bad", config, tensors)
    model = moe_models("mixtral").keras()
    before = all_weights(model)
    with pytest.raises(ValueError, match=message) as info:
        keras_lowrank.load_peft_adapter(model, tmp_path / "bad")
    assert str(info.value).startswith("keras_lowrank: load_peft_adapter: ")
    assert_unchanged(model, before)


def test_target_parameters_on_a_model_without_experts_is_refused(
    mixtral_folder, tmp_path
):
    config, _ = mixtral_folder
    llama = keras_hub.models.LlamaBackbone(
        vocabulary_size=16, num_layers=1, num_query_heads=2,
        num_key_value_heads=1, hidden_dim=8, intermediate_dim=16,
    )
    prefix = "base_model.model.layers.0.self_attn.q_proj."
    write_folder(tmp_path / "llama", config, {
        prefix + "lora_A.weight": np.ones((2, 8), "float32"),
        prefix + "lora_B.weight": np.ones((8, 2), "float32"),
    })
    before = all_weights(llama)
    with pytest.raises(ValueError, match=r"keras_lowrank: load_peft_adapter: the adapter sets target_parameters=\['mlp.experts.(down|gate_up)_proj', .*\], which adapts raw nn.Parameters \(MoE experts\), but the llama table has no expert banks"):
        keras_lowrank.load_peft_adapter(llama, tmp_path / "llama")
    assert_unchanged(llama, before)


EXPORT_REFUSALS = {
    "dora": (dict(method="dora"), r"adapter 'default' on expert kernel 'mixtral_backbone/transformer_layer_0/mixtral_sparse_moe_block(_\d+)?/experts/expert_feedforward_gate_dense' uses method='dora'; PEFT's ParamWrapper \(target_parameters\) refuses DoRA and other LoRA variants, so PEFT could not load it. Adapt the experts with method='lora' to export them"),
    "dropout": (dict(dropout=0.1), r"adapter 'default' on expert kernel 'mixtral_backbone/transformer_layer_0/mixtral_sparse_moe_block(_\d+)?/experts/expert_feedforward_gate_dense' has dropout=0.1; PEFT's ParamWrapper \(target_parameters\) refuses lora_dropout != 0, so PEFT could not load it. Adapt with dropout=0.0 to export it"),
}


@pytest.mark.parametrize("case", list(EXPORT_REFUSALS))
def test_expert_export_refuses_what_peft_refuses(case, moe_models, tmp_path):
    options, message = EXPORT_REFUSALS[case]
    model = moe_models("mixtral").keras()
    keras_lowrank.adapt(model, targets=["experts"], rank=2, **options)
    with pytest.raises(ValueError, match=message) as info:
        keras_lowrank.export_peft_adapter(model, tmp_path / "out")
    assert str(info.value).startswith("keras_lowrank: export_peft_adapter: ")
    assert not os.path.exists(tmp_path / "out")


def test_an_expert_load_that_fails_after_adapting_is_undone(
    mixtral_folder, moe_models, tmp_path, monkeypatch
):
    # The loader adapts first and assigns the factors after; a failure in
    # the last assignment takes everything back, expert hosts included.
    from keras_lowrank.integrations.peft import load as peft_load

    write_folder(tmp_path / "f", *mixtral_folder)
    real_plan = peft_load.plan_load

    def plan_with_a_bad_last_value(*args):
        plan = real_plan(*args)
        plan.loras[-1].values["B"] = np.ones((3,), "float32")
        return plan

    monkeypatch.setattr(peft_load, "plan_load", plan_with_a_bad_last_value)
    model = moe_models("mixtral").keras()
    before = all_weights(model)
    trainable = [w.path for w in model.trainable_weights]
    with pytest.raises(ValueError):
        keras_lowrank.load_peft_adapter(model, tmp_path / "f")
    assert_unchanged(model, before)
    assert [w.path for w in model.trainable_weights] == trainable
    monkeypatch.undo()
    keras_lowrank.load_peft_adapter(model, tmp_path / "f")
    assert len(keras_lowrank.report(model).rows) == 6  # 3 kernels x 2 layers
