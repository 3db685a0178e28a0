"""The model kinds the surgery tests run over, each small and deterministic.

Importable by child processes (the fresh-process and cross-backend checks),
so the subclassed test classes are registered wherever the file is loaded.

Each kind is a `ModelKind`: how to build the model, a batch of inputs, the
layers `adapt(model)` targets by default, and the layers that stay trainable.
"""

import dataclasses

import keras
import numpy as np

SEQ = 6


@keras.saving.register_keras_serializable(package="keras_lowrank_tests")
class Block(keras.layers.Layer):
    """A custom layer holding two Dense layers and an EinsumDense."""

    def __init__(self, units=16, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.inner = keras.layers.Dense(units, activation="gelu", name="inner")
        self.mix = keras.layers.EinsumDense(
            "abc,cd->abd", (None, units), bias_axes="d", name="mix"
        )

    def build(self, input_shape):
        self.inner.build(input_shape)
        self.mix.build(input_shape[:-1] + (self.units,))

    def call(self, x):
        return self.mix(self.inner(x))

    def get_config(self):
        return {**super().get_config(), "units": self.units}


@keras.saving.register_keras_serializable(package="keras_lowrank_tests")
class Subclassed(keras.Model):
    """A subclassed model: a custom block, a nested block, and a head."""

    def __init__(self, units=16, classes=3, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.classes = classes
        self.stem = keras.layers.Dense(units, name="stem")
        self.block = Block(units, name="block")
        self.head = keras.layers.Dense(classes, name="head")

    def call(self, x):
        return self.head(self.block(self.stem(x)))

    def get_config(self):
        return {
            **super().get_config(),
            "units": self.units,
            "classes": self.classes,
        }


@keras.saving.register_keras_serializable(package="keras_lowrank_tests")
class Tower(keras.layers.Layer):
    """Two `Block`s in a list: the same leaf names (`inner`, `mix`) twice,
    two custom layers deep, told apart only by their paths."""

    def __init__(self, units=16, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.blocks = [Block(units, name="lower"), Block(units, name="upper")]

    def build(self, input_shape):
        for block in self.blocks:
            block.build(input_shape[:-1] + (self.units,))

    def call(self, x):
        for block in self.blocks:
            x = block(x)
        return x

    def get_config(self):
        return {**super().get_config(), "units": self.units}


@keras.saving.register_keras_serializable(package="keras_lowrank_tests")
class NestedSubclassed(keras.Model):
    """A subclassed model whose Dense/EinsumDense layers live inside custom
    layers inside a custom layer."""

    def __init__(self, units=16, classes=3, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.classes = classes
        self.stem = keras.layers.Dense(units, name="stem")
        self.tower = Tower(units, name="tower")
        self.head = keras.layers.Dense(classes, name="head")

    def call(self, x):
        return self.head(self.tower(self.stem(x)))

    def get_config(self):
        return {
            **super().get_config(),
            "units": self.units,
            "classes": self.classes,
        }


@dataclasses.dataclass(frozen=True)
class ModelKind:
    name: str
    build: callable
    inputs: callable
    default_targets: tuple
    kept: tuple = ()
    hub: bool = False


def _features(batch=4, features=8):
    rng = np.random.default_rng(0)
    return rng.normal(size=(batch, SEQ, features)).astype("float32")


def _labels(batch=4, classes=3):
    return np.arange(batch) % classes


def build_sequential():
    return keras.Sequential(
        [
            keras.Input((SEQ, 8)),
            keras.layers.Dense(16, activation="relu", name="hidden"),
            keras.layers.Dense(16, name="hidden2"),
            keras.layers.GlobalAveragePooling1D(name="pool"),
            keras.layers.Dense(3, name="out"),
        ],
        name="seq_model",
    )


def build_functional():
    inputs = keras.Input((SEQ, 8), name="features")
    x = keras.layers.Conv1D(8, 3, padding="same", name="conv")(inputs)
    x = keras.layers.EinsumDense(
        "abc,cde->abde", (None, 2, 8), bias_axes="de", name="proj"
    )(x)
    x = keras.layers.Reshape((SEQ, 16), name="merge_heads")(x)
    x = keras.layers.LayerNormalization(name="norm")(x)
    x = keras.layers.Dense(16, activation="tanh", name="ffn")(x)
    x = keras.layers.GlobalAveragePooling1D(name="pool")(x)
    outputs = keras.layers.Dense(3, name="out")(x)
    return keras.Model(inputs, outputs, name="func_model")


def build_subclassed():
    model = Subclassed(name="sub_model")
    model(_features())
    return model


def build_subclassed_nested():
    model = NestedSubclassed(name="nested_model")
    model(_features())
    return model


def _bert_backbone():
    import keras_hub

    return keras_hub.models.BertBackbone(
        vocabulary_size=50,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=SEQ,
        dropout=0.0,
    )


def build_bert_classifier():
    import keras_hub

    return keras_hub.models.BertTextClassifier(
        _bert_backbone(), num_classes=3, preprocessor=None, dropout=0.0
    )


def build_llama_causal_lm():
    import keras_hub

    backbone = keras_hub.models.Llama3Backbone(
        vocabulary_size=50,
        num_layers=2,
        num_query_heads=4,
        num_key_value_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
    )
    return keras_hub.models.Llama3CausalLM(backbone, preprocessor=None)


def build_gemma_causal_lm():
    import keras_hub

    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=50,
        num_layers=2,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=16,
        intermediate_dim=32,
        head_dim=8,
    )
    return keras_hub.models.GemmaCausalLM(backbone, preprocessor=None)


def _token_inputs(batch=4):
    rng = np.random.default_rng(0)
    return {
        "token_ids": rng.integers(1, 50, size=(batch, SEQ)).astype("int32"),
        "segment_ids": np.zeros((batch, SEQ), "int32"),
        "padding_mask": np.ones((batch, SEQ), "int32"),
    }


def _lm_inputs(batch=4):
    inputs = _token_inputs(batch)
    del inputs["segment_ids"]
    return inputs


KINDS = {
    "sequential": ModelKind(
        "sequential",
        build_sequential,
        _features,
        default_targets=("hidden", "hidden2"),
    ),
    "functional": ModelKind(
        "functional",
        build_functional,
        _features,
        default_targets=("proj", "ffn"),
    ),
    "subclassed": ModelKind(
        "subclassed",
        build_subclassed,
        _features,
        default_targets=("stem", "block/inner", "block/mix"),
    ),
    "subclassed_nested": ModelKind(
        "subclassed_nested",
        build_subclassed_nested,
        _features,
        default_targets=(
            "stem",
            "tower/lower/inner",
            "tower/lower/mix",
            "tower/upper/inner",
            "tower/upper/mix",
        ),
    ),
    "bert_classifier": ModelKind(
        "bert_classifier",
        build_bert_classifier,
        _token_inputs,
        default_targets=tuple(
            f"bert_backbone/transformer_layer_{i}/self_attention_layer/{n}"
            for i in range(2)
            for n in ("query", "value")
        ),
        kept=("logits",),
        hub=True,
    ),
    "llama_causal_lm": ModelKind(
        "llama_causal_lm",
        build_llama_causal_lm,
        _lm_inputs,
        default_targets=tuple(
            f"llama3_backbone/transformer_layer_{i}/self_attention/{n}"
            for i in range(2)
            for n in ("query", "value")
        ),
        hub=True,
    ),
    "gemma_causal_lm": ModelKind(
        "gemma_causal_lm",
        build_gemma_causal_lm,
        _lm_inputs,
        default_targets=tuple(
            f"gemma_backbone/decoder_block_{i}/attention/{n}"
            for i in range(2)
            for n in ("query", "value")
        ),
        hub=True,
    ),
}


def labels_for(kind, model, inputs):
    """Integer targets shaped like the model's output without its last axis."""
    if "causal_lm" in kind.name:
        return np.roll(inputs["token_ids"], -1, axis=1)
    shape = outputs(model, inputs).shape
    return (np.arange(int(np.prod(shape[:-1]))) % shape[-1]).reshape(shape[:-1])


def compile_for_training(model, kind, learning_rate=0.05):
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )


def outputs(model, inputs):
    """The model's output as NumPy, in inference mode."""
    return keras.ops.convert_to_numpy(model(inputs, training=False))


def randomize_adapters(model, seed=0, scale=0.3):
    """Non-zero B factors (and perturbed A), so adapters change outputs."""
    from keras_lowrank.state.model_state import adapted_layers

    rng = np.random.default_rng(seed)
    for layer in adapted_layers(model):
        for name in layer.adapter_names:
            for key, var in layer.adapter_variables(name).items():
                if key in ("A", "B"):
                    var.assign(
                        rng.normal(scale=scale, size=var.shape).astype("float32")
                    )


def randomize_adapter(model, name, seed=0, scale=0.3):
    """Non-zero factors for adapter `name` (B starts at zero), through the
    public surface only: its variables among `model.weights`, found by
    their names `lowrank_A_<name>` and `lowrank_B_<name>`."""
    rng = np.random.default_rng(seed)
    leaves = (f"lowrank_A_{name}", f"lowrank_B_{name}")
    found = [w for w in model.weights if w.path.rsplit("/", 1)[-1] in leaves]
    if not found:
        raise AssertionError(f"model has no variables of adapter {name!r}")
    for w in found:
        w.assign(rng.normal(scale=scale, size=w.shape).astype("float32"))


def fingerprint(model):
    """Everything a failed operation must leave untouched: classes, weight
    paths, values and trainable flags, layer trainable flags."""
    from keras_lowrank.surgery.walk import walk

    return {
        "model_class": type(model),
        "layers": [
            (v.path, type(v.layer), v.layer.trainable) for v in walk(model)
        ],
        "weights": [
            (w.path, w.trainable, keras.ops.convert_to_numpy(w).tobytes())
            for w in model.weights
        ],
    }
