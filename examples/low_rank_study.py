"""Test the low-rank hypothesis on the real MiniLM and the tweet task.

    python examples/low_rank_study.py                 # JAX, ~40 min on 2 CPU cores
    python examples/low_rank_study.py --ranks 1,8,64 --lora-ranks 8

Five measurements on one split of the data `examples/text_classification.py`
uses (same loader, same seed):

1. head only: the pretrained backbone frozen, the classifier head trained;
2. full fine-tuning (every weight, AdamW 5e-5): `full.keras`;
3. `keras_lowrank.analysis.delta_spectrum(base, full)`: how much of each
   kernel update's energy lies in its top r directions (table, JSON, plot);
4. `keras_lowrank.extract(base, full, rank=r, keep_changed=True)` for each r:
   the full fine-tune truncated to a rank-r LoRA adapter (plus the changed
   biases, norms, embeddings and head kept with it), evaluated held out;
5. LoRA trained directly at each rank (all linear layers, alpha = 2r, the
   head trainable), with a `GradientSubspace` probe on one of the runs.

Everything lands in `--out` (default `runs/low_rank_study/`):
`results.json`, `spectrum.json`, `spectrum.png`, `accuracy_vs_rank.png`,
`gradient_subspace.png`. Finished stages are cached there (a rerun skips
them); delete the folder to start over. docs/low_rank.md shows one run.
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_lowrank  # noqa: E402
from keras_lowrank import analysis  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tweets  # noqa: E402
from text_classification import accuracy  # noqa: E402
from text_classification import load_classifier  # noqa: E402


def _compile(model, lr):
    model.compile(
        optimizer=keras.optimizers.AdamW(lr, weight_decay=0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["sparse_categorical_accuracy"],
    )


def _kept_values(model, keys):
    from keras_lowrank.state import owned

    return [v for k, v in owned.resolve(model, list(keys)).items()]


class Study:
    def __init__(self, args):
        self.args = args
        os.makedirs(args.out, exist_ok=True)
        self.results_path = os.path.join(args.out, "results.json")
        self.results = {}
        if os.path.exists(self.results_path):
            with open(self.results_path) as f:
                self.results = json.load(f)
        texts, labels = tweets.load(seed=args.seed)
        n, m = args.train_size, args.test_size
        self.train = (texts[:n], labels[:n])
        self.test = (texts[n:n + m], labels[n:n + m])
        self.base_path = os.path.join(args.out, "base.keras")
        if not os.path.exists(self.base_path):
            keras.utils.set_random_seed(args.seed)
            load_classifier(args.sequence_length).save(self.base_path)

    def save(self):
        tmp = self.results_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.results, f, indent=1)
        os.replace(tmp, self.results_path)

    def base(self):
        return keras_lowrank.load_model(self.base_path)

    def evaluate(self, model):
        return accuracy(model, *self.test, 64)

    def fit(self, model, lr, callbacks=()):
        _compile(model, lr)
        keras.utils.set_random_seed(self.args.seed)
        start = time.perf_counter()
        model.fit(*self.train, batch_size=self.args.batch_size, epochs=self.args.epochs,
                  verbose=2, callbacks=list(callbacks))
        return time.perf_counter() - start

    def stage(self, key, run):
        if key not in self.results:
            print(f"--- {key}", flush=True)
            self.results[key] = run()
            self.save()
        print(f"{key}: {self.results[key]}", flush=True)
        return self.results[key]

    def head_only(self):
        model = self.base()
        model.backbone.trainable = False
        seconds = self.fit(model, 1e-3)
        return {"accuracy": self.evaluate(model), "seconds": seconds}

    def full(self):
        model = self.base()
        seconds = self.fit(model, 5e-5)
        model.save(os.path.join(self.args.out, "full.keras"))
        return {"accuracy": self.evaluate(model), "seconds": seconds,
                "trainable": sum(int(np.prod(w.shape)) for w in model.trainable_weights)}

    def spectrum(self, full):
        result = analysis.delta_spectrum(self.base(), full)
        print(result.table(ranks=(1, 2, 4, 8, 16, 32, 64)))
        with open(os.path.join(self.args.out, "spectrum.json"), "w") as f:
            f.write(result.to_json())
        try:
            result.plot(os.path.join(self.args.out, "spectrum.png"))
        except ImportError as error:
            print(error)
        return {str(r): result.median_energy(r) for r in (1, 2, 4, 8, 16, 32, 64)}

    def extracted(self, full, rank):
        model = self.base()
        # Keep the changed biases, norms and head with the adapter, not the
        # embedding tables (11.7M values: no longer a small adapter).
        changed = analysis.delta_spectrum(model, full).changed_weights
        keep = sorted({k.rsplit("/", 1)[0] for k in changed if not k.endswith("/embeddings")})
        result = analysis.extract(model, full, rank=rank, keep_changed=keep)
        kept = sum(int(np.prod(np.shape(w))) for w in _kept_values(model, result.kept))
        return {"accuracy": self.evaluate(model), "params": result.params,
                "full_params": result.full_params, "kept_params": kept,
                "mean_error": float(np.mean([row.error for row in result.layers])),
                "kept": len(result.kept)}

    def kept_only(self, full):
        """The control: the base with only what `extracted` keeps besides
        the factors (changed biases, norms, head), no kernel update."""
        from keras_lowrank.analysis import deltas
        from keras_lowrank.state import owned

        model = self.base()
        changed = analysis.delta_spectrum(model, full).changed_weights
        keys = [k for k in changed if not k.endswith("/embeddings")]
        find = deltas.finder(full, adaptable=False)
        mine = owned.resolve(model, keys)
        for key in keys:
            path = key.rsplit("/", 1)[0]
            # A NumPy copy: sharing the JAX buffer would let a later donation
            # by one model's compiled function delete the other's weight.
            value = owned.keyed_weights(find(path).layer, path)[key]
            mine[key].assign(np.array(keras.ops.convert_to_numpy(value)))
        return {"accuracy": self.evaluate(model), "kept": len(keys)}

    def lora(self, rank, probe=False):
        model = self.base()
        keras_lowrank.adapt(model, rank=rank, alpha=2 * rank, targets="all-linear")
        callbacks = []
        if probe:
            x = self.train[0][:32]
            y = self.train[1][:32]
            callbacks.append(analysis.GradientSubspace((x, y), rank=rank, every=25, verbose=True))
        seconds = self.fit(model, 1e-3, callbacks)
        out = {"accuracy": self.evaluate(model), "seconds": seconds,
               "trainable": sum(int(np.prod(w.shape)) for w in model.trainable_weights)}
        if probe:
            gs = callbacks[0]
            out["gradient_subspace"] = [{"step": r["step"], **r["mean"]} for r in gs.history]
            try:
                gs.plot(os.path.join(self.args.out, "gradient_subspace.png"))
            except ImportError as error:
                print(error)
        return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", default="1,4,8,16,32,64")
    p.add_argument("--lora-ranks", default="1,4,8,16,32,64")
    p.add_argument("--probe-rank", type=int, default=8)
    p.add_argument("--train-size", type=int, default=2000)
    p.add_argument("--test-size", type=int, default=1000)
    p.add_argument("--sequence-length", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default=os.path.join("runs", "low_rank_study"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    ranks = [int(r) for r in args.ranks.split(",") if r]
    lora_ranks = [int(r) for r in args.lora_ranks.split(",") if r]
    print(f"backend: {keras.backend.backend()}")
    study = Study(args)
    study.stage("base", lambda: {"accuracy": study.evaluate(study.base())})
    head = study.stage("head_only", study.head_only)
    full_result = study.stage("full", study.full)
    full = keras_lowrank.load_model(os.path.join(args.out, "full.keras"))
    study.stage("median_energy", lambda: study.spectrum(full))
    study.stage("kept_only", lambda: study.kept_only(full))
    for r in ranks:
        study.stage(f"extracted_r{r}", lambda r=r: study.extracted(full, r))
    for r in lora_ranks:
        study.stage(f"lora_r{r}", lambda r=r: study.lora(r, probe=r == args.probe_rank))
    gain = full_result["accuracy"] - head["accuracy"]
    print(f"\nhead only {head['accuracy']:.4f}, full {full_result['accuracy']:.4f} "
          f"(gain {gain:+.4f})")
    print("rank  extracted  share of gain  LoRA direct")
    accs, loras = [], []
    for r in ranks:
        acc = study.results[f"extracted_r{r}"]["accuracy"]
        lora = study.results.get(f"lora_r{r}", {}).get("accuracy")
        accs.append(acc)
        loras.append(lora)
        share = (acc - head["accuracy"]) / gain if gain else float("nan")
        print(f"{r:4d}  {acc:9.4f}  {share:13.1%}  {lora if lora is not None else '-'}")
    try:
        from keras_lowrank.analysis import plots

        plots.plot_accuracy_vs_rank(
            ranks, accs, path=os.path.join(args.out, "accuracy_vs_rank.png"),
            full=full_result["accuracy"], head_only=head["accuracy"],
            lora=loras if all(v is not None for v in loras) else None,
        )
    except ImportError as error:
        print(error)


if __name__ == "__main__":
    main()
