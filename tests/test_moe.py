"""Expert LoRA on KerasHub mixture-of-experts models (issue 15).

Tiny random Mixtral, Qwen3-MoE, Qwen3.5-MoE and GPT-OSS causal LMs: the
prepared expert layers compute exactly what KerasHub's do, adapted outputs
equal the model with merged expert kernels `W_e + s·A_e·B_e` (float64
reference), only the expert factors train, and `.keras` files (in a fresh
process, on another backend) and adapter files round-trip.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from keras import ops

import keras_lowrank
from keras_lowrank.integrations import moe
from keras_lowrank.layers import ExpertKernel
from keras_lowrank.layers import LowRankExpertKernel

keras_hub = pytest.importorskip("keras_hub")

HERE = os.path.dirname(os.path.abspath(__file__))
E, H, I = 4, 8, 6


def _mixtral():
    return keras_hub.models.MixtralCausalLM(keras_hub.models.MixtralBackbone(
        vocabulary_size=32, num_layers=2, num_query_heads=2, hidden_dim=H,
        intermediate_dim=I, num_key_value_heads=1, num_experts=E, top_k=2,
    ), preprocessor=None)


def _qwen3_moe():
    return keras_hub.models.Qwen3MoeCausalLM(keras_hub.models.Qwen3MoeBackbone(
        vocabulary_size=32, num_layers=2, num_query_heads=2,
        num_key_value_heads=1, hidden_dim=H, intermediate_dim=16,
        moe_intermediate_dim=I, num_experts=E, head_dim=4, top_k=2,
        norm_top_k_prob=True,
    ), preprocessor=None)


def _qwen3_5_moe():
    return keras_hub.models.Qwen3_5MoeCausalLM(
        keras_hub.models.Qwen3_5MoeBackbone(
            vocabulary_size=32, num_layers=2, num_query_heads=2,
            num_key_value_heads=1, head_dim=8, hidden_dim=H,
            partial_rotary_factor=0.5,
            moe_intermediate_dim=I, shared_expert_intermediate_size=I,
            num_experts=E, top_k=2, layer_types=["full_attention"] * 2,
        ), preprocessor=None)


def _gpt_oss():
    return keras_hub.models.GptOssCausalLM(keras_hub.models.GptOssBackbone(
        vocabulary_size=32, num_layers=2, num_query_heads=2, hidden_dim=H,
        intermediate_dim=I, num_key_value_heads=1, num_experts=E, top_k=2,
        head_dim=4,
    ), preprocessor=None)


def _gemma4():
    backbone = keras_hub.models.Gemma4Backbone(
        vocabulary_size=32, image_size=None, num_layers=2, num_query_heads=2,
        num_key_value_heads=1, hidden_dim=H, intermediate_dim=16, head_dim=4,
        global_head_dim=4, layer_types=["full_attention"] * 2,
        enable_moe_block=True, num_experts=E, expert_intermediate_dim=I,
        num_experts_per_token=2,
    )
    return keras_hub.models.Gemma4CausalLM(backbone=backbone, preprocessor=None)


ARCHITECTURES = {
    "mixtral": (_mixtral, 3),  # builder, expert kernels per MoE layer
    "qwen3_moe": (_qwen3_moe, 2),
    "qwen3_5_moe": (_qwen3_5_moe, 2),
    "gpt_oss": (_gpt_oss, 2),
    "gemma4": (_gemma4, 3),
}


def build(arch, seed=0):
    keras.utils.set_random_seed(seed)
    model = ARCHITECTURES[arch][0]()
    # Random, not initial, biases and scales: every term of the formula
    # matters in the comparisons below.
    rng = np.random.default_rng(seed)
    for layer in moe.hosts(model):
        for weight in layer.weights:
            weight.assign(rng.normal(0, 0.3, weight.shape).astype(weight.dtype))
    return model


def inputs(batch=2, seq=5):
    rng = np.random.default_rng(1)
    return {
        "token_ids": rng.integers(1, 32, (batch, seq)).astype("int32"),
        "padding_mask": np.ones((batch, seq), "int32"),
        # Gemma 4 also takes positions; the others ignore the key.
        "position_ids": np.tile(np.arange(seq, dtype="int32"), (batch, 1)),
    }


def for_model(model, x):
    names = {i.name for i in model.backbone.inputs}
    return {k: v for k, v in x.items() if k in names}


def logits(model, x=None):
    return np.asarray(ops.convert_to_numpy(model(for_model(model, x or inputs()))))


def kernels(model):
    return [
        layer for layer in model._flatten_layers()
        if isinstance(layer, LowRankExpertKernel)
    ]


def randomize_factors(model, seed=2):
    rng = np.random.default_rng(seed)
    for layer in kernels(model):
        for name in layer.adapter_names:
            for var in layer.adapter_variables(name).values():
                var.assign(rng.normal(0, 0.3, var.shape).astype("float32"))


def merged_twin(arch, model, name="default"):
    """A fresh copy of the base model whose expert kernels hold
    `W_e + s·A_e·B_e`, computed in float64."""
    twin = build(arch)
    twins = [k for h in moe.hosts(twin) for k in ARCH_KERNELS(h)]
    mine = [k for h in moe.hosts(model) for k in ARCH_KERNELS(h)]
    by_attr = {}
    for layer in kernels(model):
        by_attr[(id(layer._host()), layer.kernel_attr)] = layer
    for (host, attr), (twin_host, _) in zip(mine, twins):
        layer = by_attr.get((id(host), attr))
        w = np.asarray(ops.convert_to_numpy(getattr(host, attr)), "float64")
        if layer is not None and name in layer.active_adapters:
            spec = layer.adapter_spec(name)
            v = layer.adapter_variables(name)
            a = np.asarray(ops.convert_to_numpy(v["A"]), "float64")
            b = np.asarray(ops.convert_to_numpy(v["B"]), "float64")
            w = w + spec.scale * np.einsum("edr,erk->edk", a, b)
        getattr(twin_host, attr).assign(w.astype("float32"))
    return twin


def ARCH_KERNELS(host):
    table, _ = moe.EXPERT_LAYERS[moe.expert_layer_kind(host)]
    return [(host, k.attr) for k in table]


@pytest.fixture(params=sorted(ARCHITECTURES))
def arch(request):
    return request.param


# --- the copied forward passes --------------------------------------------------


def test_prepared_expert_layers_compute_exactly_what_keras_hub_does(arch):
    # Pins the formulas copied from KerasHub: a KerasHub release that
    # changes an expert `call` fails here.
    model = build(arch)
    base = logits(model)
    with moe.prepared(model):
        hosts = moe.hosts(model)
        assert hosts and all(moe.is_host(h) for h in hosts)
        prepared = logits(model)
    np.testing.assert_array_equal(prepared, base)
    assert not any(moe.is_host(h) for h in moe.hosts(model))
    assert not any(isinstance(l, ExpertKernel) for l in model._flatten_layers())


def test_every_expert_class_in_the_table_exists_with_its_kernels():
    import keras_hub.src.models.gemma4.gemma4_moe as gemma4
    import keras_hub.src.models.gpt_oss.gpt_oss_decoder as gpt_oss
    import keras_hub.src.models.mixtral.mixtral_decoder as mixtral
    import keras_hub.src.models.qwen3_5_moe.qwen3_5_moe_decoder as qwen3_5
    import keras_hub.src.models.qwen3_moe.qwen3_moe_decoder as qwen3
    import keras_hub.src.models.qwen_moe.qwen_moe_decoder as qwen

    classes = {
        "MixtralMoeExperts": mixtral.MixtralMoeExperts,
        "QwenMoeExperts": qwen.QwenMoeExperts,
        "Gemma4MoEBlock": gemma4.Gemma4MoEBlock,
        "Qwen3MoeExperts": qwen3.Qwen3MoeExperts,
        "Qwen3_5MoeExperts": qwen3_5.Qwen3_5MoeExperts,
        "GptOssExperts": gpt_oss.GptOssExperts,
    }
    assert sorted(classes) == sorted(moe.EXPERT_LAYERS)
    for name, cls in classes.items():
        layer = cls(E, H, I)
        layer.build((None, H))
        for kernel in moe.EXPERT_LAYERS[name][0]:
            assert len(getattr(layer, kernel.attr).shape) == 3, (name, kernel)


# --- adapting ---------------------------------------------------------------------


def test_experts_target_adapts_every_expert_kernel_and_equals_merged_kernels(arch):
    model = build(arch)
    base = logits(model)
    keras_lowrank.adapt(model, targets=["experts"], rank=2, alpha=4)
    adapted = kernels(model)
    assert len(adapted) == 2 * ARCHITECTURES[arch][1]
    for layer in adapted:
        e, d, k = layer.kernel.shape
        v = layer.adapter_variables("default")
        assert tuple(v["A"].shape) == (e, d, 2) and tuple(v["B"].shape) == (e, 2, k)
    np.testing.assert_array_equal(logits(model), base)  # B = 0
    randomize_factors(model)
    out = logits(model)
    assert np.abs(out - base).max() > 1e-3
    np.testing.assert_allclose(out, logits(merged_twin(arch, model)), atol=1e-5, rtol=0)
    # merge / unmerge are exact.
    kernel_before = [np.asarray(ops.convert_to_numpy(l.kernel)) for l in adapted]
    keras_lowrank.merge(model)
    np.testing.assert_allclose(logits(model), out, atol=1e-5, rtol=0)
    keras_lowrank.unmerge(model)
    for layer, before in zip(adapted, kernel_before):
        np.testing.assert_allclose(ops.convert_to_numpy(layer.kernel), before, atol=1e-6)
    np.testing.assert_allclose(logits(model), out, atol=1e-5, rtol=0)


def test_only_expert_factors_train_and_routers_stay_frozen(arch):
    model = build(arch)
    keras_lowrank.adapt(model, targets=["experts"], rank=2, trainable=[])
    randomize_factors(model)
    before = {id(w): np.asarray(ops.convert_to_numpy(w)) for w in model.weights}
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x = for_model(model, inputs())
    model.fit(x, x["token_ids"], epochs=1, batch_size=2, verbose=0)
    changed = {
        w.path for w in model.weights
        if not np.array_equal(before[id(w)], ops.convert_to_numpy(w))
    }
    factors = {w.path for l in kernels(model) for w in l.weights}
    assert changed and changed <= factors
    assert all(p.rsplit("/", 1)[-1].startswith("lowrank_") for p in changed)


def test_all_linear_and_mlp_presets_take_experts_but_not_routers():
    model = build("mixtral")
    keras_lowrank.adapt(model, targets="all-linear", rank=2)
    paths = [l.path for l in model._flatten_layers()
             if getattr(l, "adapter_names", None)]
    assert any("/experts/" in p for p in paths)
    assert any(p.endswith("query") for p in paths)
    assert not any("sparse_feedforward_gate_dense" in p for p in paths)
    mlp = build("mixtral")
    keras_lowrank.adapt(mlp, targets="mlp", rank=2)
    names = {l.name for l in mlp._flatten_layers() if getattr(l, "adapter_names", None)}
    assert names == {
        "expert_feedforward_gate_dense", "expert_feedforward_intermediate_dense",
        "expert_feedforward_output_dense",
    }
    # A router is adapted only when named.
    named = build("mixtral")
    keras_lowrank.adapt(named, targets=["sparse_feedforward_gate_dense"], rank=2)
    assert {l.name for l in named._flatten_layers()
            if getattr(l, "adapter_names", None)} == {"sparse_feedforward_gate_dense"}


def test_gemma4_router_dense_is_left_out_of_all_linear():
    model = build("gemma4")
    keras_lowrank.adapt(model, targets="all-linear", rank=2)
    adapted = [l.path for l in model._flatten_layers()
               if getattr(l, "adapter_names", None)]
    assert any(p.endswith("moe_expert_bank/down_proj") for p in adapted)
    assert not any("moe_router" in p for p in adapted)


def test_kernel_names_select_one_kind_and_rank_pattern_applies():
    model = build("qwen3_moe")
    keras_lowrank.adapt(
        model, targets=["expert_feedforward_output_dense"], rank=2,
        rank_pattern={"*transformer_layer_1/*": 3},
    )
    ranks = {l.path: l.adapter_spec("default").rank for l in kernels(model)}
    assert sorted(ranks.values()) == [2, 3]
    assert all(p.endswith("expert_feedforward_output_dense") for p in ranks)
    # Hosts of kernels without adapters are prepared (they share a layer
    # with the adapted kernels) and compute exactly as before.
    assert all(moe.is_host(h) for h in moe.hosts(model))


def test_a_rank_that_does_not_fit_an_expert_kernel_is_refused_unchanged():
    model = build("mixtral")
    base = logits(model)
    with pytest.raises(
        ValueError,
        match=r"expert_feedforward_gate_dense': rank 7 is larger than min\(d, k\) "
        r"= min\(8, 6\) = 6 for this kernel \(4, 8, 6\)",
    ):
        keras_lowrank.adapt(model, targets=["experts"], rank=7)
    assert not any(moe.is_host(h) for h in moe.hosts(model))
    assert not getattr(model, "_keras_lowrank", None)
    np.testing.assert_array_equal(logits(model), base)


def test_experts_target_on_a_model_without_known_expert_layers_is_refused():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="experts")])
    with pytest.raises(
        ValueError,
        match=r"targets='experts' matched no KerasHub mixture-of-experts "
        r"expert layer in model '.*'\. Expert LoRA knows exactly "
        r"Gemma4MoEBlock, GptOssExperts, MixtralMoeExperts, .* For other "
        r"layers, name the layer instead",
    ):
        keras_lowrank.adapt(model, targets="experts")


def test_named_adapters_switch_delete_and_leave_plain_keras_hub_layers(arch):
    model = build(arch)
    base = logits(model)
    keras_lowrank.adapt(model, targets=["experts"], rank=2, name="a")
    keras_lowrank.adapt(model, targets=["experts"], rank=3, name="b")
    randomize_factors(model)
    keras_lowrank.set_adapter(model, "a")
    out_a = logits(model)
    np.testing.assert_allclose(out_a, logits(merged_twin(arch, model, "a")), atol=1e-5)
    keras_lowrank.set_adapter(model, "b")
    assert np.abs(logits(model) - out_a).max() > 1e-3
    with keras_lowrank.disable_adapters(model):
        np.testing.assert_array_equal(logits(model), base)
    keras_lowrank.delete_adapter(model, "b")  # the active one: none is left
    np.testing.assert_allclose(logits(model), base, atol=1e-6)
    keras_lowrank.set_adapter(model, "a")
    np.testing.assert_allclose(logits(model), out_a, atol=1e-6)
    keras_lowrank.unload(model)
    assert not any(moe.is_host(h) for h in moe.hosts(model))
    assert all(type(h).__module__.startswith("keras_hub.") for h in moe.hosts(model))
    assert not any(isinstance(l, ExpertKernel) for l in model._flatten_layers())


def test_stacked_switching_serves_expert_adapters_and_mixed_rows_are_refused():
    model = build("qwen3_moe")
    keras_lowrank.adapt(model, targets=["experts"], rank=2, name="a")
    keras_lowrank.adapt(model, targets=["experts"], rank=3, name="b")
    randomize_factors(model)
    expected = {}
    for name in ("a", "b"):
        keras_lowrank.set_adapter(model, name)
        expected[name] = logits(model)
    keras_lowrank.stack_adapters(model)
    for name in ("a", "b"):
        keras_lowrank.set_adapter(model, name)
        np.testing.assert_allclose(logits(model), expected[name], atol=1e-5)
    with pytest.raises(
        ValueError,
        match=r"experts/expert_feedforward_gate_dense': a LowRankExpertKernel "
        r"cannot give each row of a batch its own adapter",
    ):
        with keras_lowrank.per_example_adapters(model, ["a", "b"]):
            model(inputs())
    keras_lowrank.unstack_adapters(model)


def test_report_counts_expert_factors_per_expert():
    model = build("mixtral")
    keras_lowrank.adapt(model, targets=["experts"], rank=2)
    text = str(keras_lowrank.report(model))
    # 3 kernels x 2 layers, each 4 experts x 2 x (8 + 6) = 112 values.
    assert "4x8x6" in text and "4x6x8" in text
    assert "adapter parameters:   672" in text
    assert "per expert" in text and "28" in text


def test_dora_on_experts_equals_base_at_start_and_round_trips_in_adapter_file(tmp_path):
    model = build("gpt_oss")
    base = logits(model)
    keras_lowrank.adapt(model, targets=["experts"], rank=2, method="dora")
    np.testing.assert_allclose(logits(model), base, atol=1e-5)
    randomize_factors(model)
    out = logits(model)
    path = str(tmp_path / "dora.safetensors")
    keras_lowrank.save_adapter(model, path)
    fresh = keras_lowrank.load_adapter(build("gpt_oss"), path)
    np.testing.assert_allclose(logits(fresh), out, atol=1e-6)


def test_adapter_file_round_trip_into_a_fresh_model(arch, tmp_path):
    model = build(arch)
    keras_lowrank.adapt(model, targets=["experts", "query"], rank=2, name="task")
    randomize_factors(model)
    out = logits(model)
    path = str(tmp_path / "task.safetensors")
    keras_lowrank.save_adapter(model, path)
    # Built after other models in this process: the MoE blocks' names,
    # which Keras makes up, differ from the saved ones.
    build(arch)
    fresh = keras_lowrank.load_adapter(build(arch), path)
    np.testing.assert_allclose(logits(fresh), out, atol=1e-6)
    assert len(kernels(fresh)) == len(kernels(model))


# --- .keras files in a fresh process, across backends ------------------------------

_CHILD = r"""
import json, sys
import numpy as np
import keras, keras_lowrank
from keras import ops
data = np.load(sys.argv[1] + "/data.npz")
out = {}
for arch in sys.argv[2:]:
    model = keras_lowrank.load_model(sys.argv[1] + f"/{arch}.keras")
    names = {i.name for i in model.backbone.inputs}
    x = {k: data[k] for k in ("token_ids", "padding_mask", "position_ids") if k in names}
    got = np.asarray(ops.convert_to_numpy(model(x)))
    trainable = sorted({w.path.rsplit("/", 1)[-1] for w in model.trainable_weights})
    out[arch] = [float(np.abs(got - data[arch]).max()), trainable]
print(json.dumps(out))
"""


def test_keras_file_round_trip_in_a_fresh_process_on_another_backend(tmp_path):
    x = inputs()
    expected = {}
    for arch in sorted(ARCHITECTURES):
        build(arch)  # shifts the made-up names of the next model's blocks
        model = build(arch)
        keras_lowrank.adapt(model, targets=["experts"], rank=2, trainable=[])
        randomize_factors(model)
        expected[arch] = logits(model, x)
        model.save(str(tmp_path / f"{arch}.keras"))
    np.savez(str(tmp_path / "data.npz"), **expected, **x)
    other = {"jax": "torch", "torch": "tensorflow", "tensorflow": "jax"}[
        keras.backend.backend()
    ]
    env = {**os.environ, "KERAS_BACKEND": other}
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp_path), *sorted(ARCHITECTURES)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for arch in ARCHITECTURES:
        diff, trainable = result[arch]
        assert diff <= 1e-5, (arch, diff)
        assert trainable == ["lowrank_A_default", "lowrank_B_default"], arch
