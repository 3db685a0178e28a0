"""Between a KerasHub model and PEFT's module names and tensor layouts.

`Target` is one supported KerasHub model: its architecture table
(`names.ARCHITECTURES`), its backbone and its task, and the two lookups
`resolve` (a `transformers` module name → a Keras layer path) and `hf_name`
(the reverse). The tensor functions are the one place where PEFT's layouts
meet Keras's, all through the layer's `KernelLayout`:

- an `nn.Linear` weight is `(out_features, in_features)`, the Keras kernel's
  matrix form `(d, k)` transposed;
- `lora_A.weight` `(r, in)` is the Keras `A` `(*in_axes, r)` as a matrix,
  transposed, and `lora_B.weight` `(out, r)` the Keras `B` `(r, *out_axes)`;
- DoRA's `lora_magnitude_vector` `(out,)` is the magnitude (`unit_shape`)
  flattened.

Both libraries compute DoRA's norm per output unit over the input features,
excluding the bias, and detach it, so a magnitude means the same on both
sides.
"""

import dataclasses
import re

import keras
import numpy as np

from keras_lowrank.integrations import keras_hub as hub_integration
from keras_lowrank.integrations.peft import names as peft_tables
from keras_lowrank.integrations.peft.format import fail
from keras_lowrank.layers import adapter_class_for
from keras_lowrank.surgery.walk import walk


@dataclasses.dataclass(frozen=True)
class Target:
    """A supported KerasHub model: its table, backbone and task.

    Args:
        model: the KerasHub backbone or task model.
        arch: its `names.Architecture`.
        backbone: the backbone inside `model` (`model` itself for a backbone).
        backbone_path: the backbone's path prefix in `model`: `""` for a
            backbone, `"bert_backbone/"` in a task.
        task: the `names.Task` of `model`, `None` for a backbone or a task
            the table does not know.

    Example:

    >>> import keras_hub
    >>> bert = keras_hub.models.BertBackbone(
    ...     vocabulary_size=8, num_layers=1, num_heads=1, hidden_dim=4,
    ...     intermediate_dim=8, max_sequence_length=4)
    >>> target = Target.of(bert, "example")
    >>> target.resolve("encoder.layer.0.attention.self.query")[2]
    'transformer_layer_0/self_attention_layer/query'
    >>> target.hf_name("transformer_layer_0/self_attention_layer/query", "")
    ('linear', 'encoder.layer.0.attention.self.query')
    """

    model: object
    arch: peft_tables.Architecture
    backbone: object
    backbone_path: str
    task: peft_tables.Task

    @classmethod
    def of(cls, model, verb):
        """The `Target` for `model`, or a `TypeError` naming what is
        supported."""
        backbone = hub_integration.backbone_of(model)
        if backbone is None:
            fail(
                f"{verb} works on KerasHub backbones and task models "
                f"(keras_hub.models.*), got {type(model).__name__} "
                f"'{getattr(model, 'name', '?')}'. Load the base model with "
                "keras_hub.models.<Architecture>Backbone.from_preset(...) or "
                "a task's from_preset.",
                TypeError,
            )
        names = _class_names(backbone)
        arch = next(
            (a for a in peft_tables.ARCHITECTURES if names & set(a.backbones)),
            None,
        )
        if arch is None:
            supported = ", ".join(
                b for a in peft_tables.ARCHITECTURES for b in a.backbones
            )
            fail(
                f"{verb}: no PEFT name table for {type(backbone).__name__}. "
                f"Supported backbones: {supported}. Adding an architecture "
                "is adding a table to keras_lowrank/integrations/peft/"
                "names.py.",
                TypeError,
            )
        if backbone is model:
            return cls(model, arch, backbone, "", None)
        prefix = next(v.path for v in walk(model) if v.layer is backbone)
        task_names = _class_names(model)
        task = next(
            (t for key, t in arch.tasks.items() if key in task_names), None
        )
        return cls(model, arch, backbone, prefix + "/", task)

    def _tables(self):
        return (
            ("linear", self.arch.linear),
            ("norm", self.arch.norms),
            ("embedding", self.arch.embeddings),
        )

    def _heads(self):
        return self.task.heads if self.task else ()

    def resolve(self, key):
        """`(kind, Module, keras path)` for a `transformers` module name
        (without `base_model.model.`), or `None`."""
        for prefix in self.arch.prefixes:
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix):]
            for kind, modules in self._tables():
                for module in modules:
                    match = _template(module.hf).fullmatch(rest)
                    if match:
                        path = self.backbone_path + module.keras.format(
                            **match.groupdict()
                        )
                        return kind, module, path
        for module in self._heads():
            if key == module.hf:
                return "head", module, module.keras
        return None

    def hf_name(self, path, prefix):
        """`(kind, transformers module name)` for a Keras layer path, or
        `None`."""
        if path.startswith(self.backbone_path):
            inner = path[len(self.backbone_path):]
            for kind, modules in self._tables():
                for module in modules:
                    match = _template(module.keras).fullmatch(inner)
                    if match:
                        return kind, prefix + module.hf.format(
                            **match.groupdict()
                        )
        for module in self._heads():
            if path == module.keras:
                return "head", module.hf
        return None


def _class_names(obj):
    return {cls.__name__ for cls in type(obj).__mro__}


_TEMPLATES = {}


def _template(text):
    pattern = _TEMPLATES.get(text)
    if pattern is None:
        pattern = re.compile(
            re.escape(text).replace(r"\{i\}", r"(?P<i>\d+)")
        )
        _TEMPLATES[text] = pattern
    return pattern


def linear_adapter_class(layer, key, path, verb):
    """The adapter class of `layer`; an `nn.Linear` maps onto Dense and
    EinsumDense only, anything else is refused.

    Args:
        layer: the Keras layer a module maps to.
        key: the module name, for messages.
        path: the layer's path, for messages.
        verb: the public function, for messages.

    Example:

    >>> import keras
    >>> linear_adapter_class(keras.layers.Dense(2), "fc", "fc", "ex").__name__
    'LowRankDense'
    """
    cls = adapter_class_for(layer)
    if cls is None or not issubclass(
        cls, (keras.layers.Dense, keras.layers.EinsumDense)
    ):
        fail(
            f"{verb}: module '{key}' maps to Keras layer '{path}' "
            f"({type(layer).__name__}), which is not a Dense or EinsumDense "
            "layer."
        )
    return cls


# --- tensors -----------------------------------------------------------------


def as_numpy(value):
    """A variable or tensor as a float32 NumPy array.

    Args:
        value: a `keras.Variable`, backend tensor or array.

    Example:

    >>> as_numpy(keras.ops.ones((2,), "float16")).dtype
    dtype('float32')
    """
    return np.asarray(keras.ops.convert_to_numpy(value), dtype=np.float32)


def linear_weight(layout, kernel):
    """A Keras kernel as the `nn.Linear` weight `(out, in)`.

    Args:
        layout: the layer's `KernelLayout` (no batch axes).
        kernel: the kernel (variable, tensor or array).

    Example:

    >>> from keras_lowrank.layers.layout import KernelLayout
    >>> layout = KernelLayout((4, 2, 3), (), (0,), (1, 2))
    >>> weight = np.arange(24, dtype="float32").reshape(6, 4)
    >>> kernel = kernel_from_linear(layout, weight)
    >>> kernel.shape, bool((linear_weight(layout, kernel) == weight).all())
    ((4, 2, 3), True)
    """
    return as_numpy(layout.to_matrix(kernel)).T


def kernel_from_linear(layout, weight):
    """An `nn.Linear` weight `(out, in)` in the Keras kernel's layout.

    Args:
        layout: the layer's `KernelLayout` (no batch axes).
        weight: the `(out_features, in_features)` array.

    Example: see `linear_weight`.
    """
    return as_numpy(layout.from_matrix(np.asarray(weight).T))


def peft_factors(layout, variables):
    """PEFT's tensors (by name suffix) for an adapter's Keras variables.

    Args:
        layout: the layer's `KernelLayout` (no batch axes).
        variables: the adapter's variables (`A`, `B`, and `magnitude` for
            DoRA), as `adapter_variables(name)` gives them.

    Example:

    >>> from keras_lowrank.layers.layout import KernelLayout
    >>> layout = KernelLayout((4, 2, 3), (), (0,), (1, 2))
    >>> keras_values = {"A": np.ones((4, 2)), "B": np.ones((2, 2, 3))}
    >>> {k: v.shape for k, v in peft_factors(layout, keras_values).items()}
    {'lora_A.weight': (2, 4), 'lora_B.weight': (6, 2)}
    """
    out = {
        "lora_A.weight": as_numpy(layout.a_to_matrix(variables["A"])).T,
        "lora_B.weight": as_numpy(layout.b_to_matrix(variables["B"])).T,
    }
    if "magnitude" in variables:
        out["lora_magnitude_vector"] = as_numpy(
            layout.units_to_matrix(variables["magnitude"])
        )
    return out


def keras_factors(layout, tensors):
    """The Keras variable values (`A`, `B`, `magnitude`) for PEFT's
    tensors; the reverse of `peft_factors`.

    Args:
        layout: the layer's `KernelLayout` (no batch axes).
        tensors: `lora_A.weight` as `"A"`, `lora_B.weight` as `"B"`, and
            `lora_magnitude_vector` as `"magnitude"` for DoRA.

    Example:

    >>> from keras_lowrank.layers.layout import KernelLayout
    >>> layout = KernelLayout((4, 2, 3), (), (0,), (1, 2))
    >>> peft = {"A": np.ones((2, 4)), "B": np.ones((6, 2)),
    ...         "magnitude": np.ones(6)}
    >>> {k: v.shape for k, v in keras_factors(layout, peft).items()}
    {'A': (4, 2), 'B': (2, 2, 3), 'magnitude': (2, 3)}
    """
    out = {
        "A": layout.a_from_matrix(np.asarray(tensors["A"]).T),
        "B": layout.b_from_matrix(np.asarray(tensors["B"]).T),
    }
    if "magnitude" in tensors:
        out["magnitude"] = layout.units_from_matrix(tensors["magnitude"])
    return {key: as_numpy(value) for key, value in out.items()}


# --- messages and small rules shared by load and export ---------------------


def first(items, limit=5):
    """`'a', 'b' and 3 more`: the start of a list, for messages.

    Args:
        items: the names.
        limit: how many to show.

    Example:

    >>> first(["a", "b", "c"], limit=2)
    "'a', 'b' and 1 more"
    """
    items = list(items)
    shown = ", ".join(repr(i) for i in items[:limit])
    if len(items) > limit:
        shown += f" and {len(items) - limit} more"
    return shown


def most_common(values):
    """The most frequent value (the smallest of a tie): the config-wide `r`
    and `lora_alpha`, with patterns for the rest.

    Args:
        values: the per-module values.

    Example:

    >>> most_common([4, 2, 4, 2, 8])
    2
    """
    values = list(values)
    return max(sorted(set(values)), key=values.count)
