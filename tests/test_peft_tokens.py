"""PEFT's `trainable_token_indices` in and out, checked against real PEFT.

Tiny random `transformers` decoders (from `test_peft`): Gemma with tied
embeddings (PEFT ties the rows of `lm_head` to `embed_tokens`, as
`LowRankReversibleEmbedding` does) and Llama with untied ones (the output
layer stays as it is on both sides). PEFT's file holds the rows' values,
keras_lowrank their change against the base table; both ways the logits must
agree.
"""

import copy

import keras
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
keras_hub = pytest.importorskip("keras_hub")

import keras_lowrank  # noqa: E402
from peft_folders import read_folder  # noqa: E402
from peft_folders import write_folder  # noqa: E402
from test_peft import TOLERANCE  # noqa: E402
from test_peft import Decoder  # noqa: E402
from test_peft import max_diff  # noqa: E402
from test_peft import perturb_peft  # noqa: E402

ROWS = [5, 60]  # both appear in test_peft.DECODER_TOKENS


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = Decoder(arch, tmp_path_factory.mktemp(arch))
        return cache[arch]

    return get


def _peft_with_rows(decoder, seed=3):
    model = peft.get_peft_model(
        copy.deepcopy(decoder.hf),
        peft.LoraConfig(
            r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
            trainable_token_indices=ROWS,
        ),
    )
    perturb_peft(model, seed=seed, scale=0.2)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "trainable_tokens_delta" in name:
                param.add_(torch.randn(param.shape, generator=generator))
    return model.eval()


@pytest.mark.parametrize("arch", ["gemma", "llama"], ids=["tied", "untied"])
def test_peft_token_rows_load_with_equal_logits(arch, decoders, tmp_path):
    decoder = decoders(arch)
    reference = _peft_with_rows(decoder)
    reference.save_pretrained(tmp_path / "peft")
    expected = decoder.torch_logits(reference)
    model = decoder.keras()
    keras_lowrank.load_peft_adapter(model, tmp_path / "peft")
    table = model.backbone.token_embedding
    assert table.adapter_spec("default").token_ids == tuple(ROWS)
    assert max_diff(expected, decoder.keras_logits(model)) <= TOLERANCE


@pytest.mark.parametrize("arch", ["gemma", "llama"], ids=["tied", "untied"])
def test_exported_token_rows_reload_in_peft_with_equal_logits(
    arch, decoders, tmp_path
):
    decoder = decoders(arch)
    model = decoder.keras()
    keras_lowrank.adapt(
        model, rank=2, targets=["query", "value"], trainable_tokens=ROWS
    )
    rng = np.random.default_rng(4)
    for w in model.trainable_weights:
        w.assign(rng.normal(scale=0.2, size=w.shape).astype("float32"))
    expected = decoder.keras_logits(model)
    keras_lowrank.export_peft_adapter(model, tmp_path / "out")
    config, tensors = read_folder(tmp_path / "out")
    assert config["trainable_token_indices"] == ROWS
    key = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
    assert tensors[key].shape == (2, 32)
    again = peft.PeftModel.from_pretrained(
        copy.deepcopy(decoder.hf), tmp_path / "out"
    ).eval()
    assert max_diff(expected, decoder.torch_logits(again)) <= TOLERANCE


ROWS_KEY = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"


def _folder_refusals():
    return [
        (lambda c, t: t.pop(ROWS_KEY),
         "keras_lowrank: load_peft_adapter: the config sets trainable_token_indices=[5, 60], "
         "but the file holds no 'token_adapter.trainable_tokens_delta'; the "
         "file is incomplete."),
        (lambda c, t: c.update(trainable_token_indices=[5]),
         "keras_lowrank: load_peft_adapter: base_model.model.model."
         "embed_tokens.token_adapter.trainable_tokens_delta has shape (2, 32), but "
         "trainable_token_indices lists 1 id(s) of the Keras layer "
         "'gemma_backbone/token_embedding' (64x32), which needs (1, 32); the "
         "file and its config disagree."),
        (lambda c, t: c.update(trainable_token_indices=[5, 64]),
         "keras_lowrank: layer 'gemma_backbone/token_embedding': token id 64 "
         "is out of range: the embedding has 64 rows (ids 0 to 63). Add the "
         "token to the tokenizer and grow the table first, or train a row the "
         "vocabulary already has (a reserved or unused token)."),
        (lambda c, t: c.update(trainable_token_indices={"lm_head": [5, 60]}),
         "keras_lowrank: load_peft_adapter: the file trains token rows of 'model.embed_tokens'"
         ", but trainable_token_indices={'lm_head': [5, 60]} gives no list of "
         "ids for it; the file and its config disagree."),
    ]


@pytest.mark.parametrize("change,message", _folder_refusals())
def test_bad_token_row_folders_are_refused_unchanged(
    change, message, decoders, tmp_path
):
    decoder = decoders("gemma")
    _peft_with_rows(decoder).save_pretrained(tmp_path / "peft")
    config, tensors = read_folder(tmp_path / "peft")
    change(config, tensors)
    write_folder(tmp_path / "bad", config, tensors)
    model = decoder.keras()
    before = [keras.ops.convert_to_numpy(w).copy() for w in model.weights]
    with pytest.raises(ValueError) as caught:
        keras_lowrank.load_peft_adapter(model, tmp_path / "bad")
    assert str(caught.value) == message
    assert not hasattr(model, "_keras_lowrank")
    after = [keras.ops.convert_to_numpy(w) for w in model.weights]
    assert all(np.array_equal(x, y) for x, y in zip(before, after))


def test_an_adapter_of_token_rows_alone_is_refused_by_the_export(decoders, tmp_path):
    model = decoders("gemma").keras()
    keras_lowrank.adapt(model, targets=[], trainable_tokens=ROWS)
    with pytest.raises(ValueError) as caught:
        keras_lowrank.export_peft_adapter(model, tmp_path / "out")
    assert str(caught.value) == (
        "keras_lowrank: export_peft_adapter: adapter 'default' trains token rows only; a PEFT "
        "LoRA folder needs LoRA modules beside its trainable_token_indices. "
        "Adapt with targets as well (adapt(..., trainable_tokens=...) with the "
        "default targets)."
    )
    assert not (tmp_path / "out").exists()
