"""`ΔW` per layer between two models of one architecture, as NumPy.

A layer's *effective kernel* is what its forward pass multiplies by: the
kernel variable (with any merged adapters inside) plus every active,
unmerged adapter's `ΔW`. Between a base and a tuned model the update is the
difference of the two effective kernels, in the matrix form
`(*batch, d, k)` of the layer's `KernelLayout`.

When both models hold the same kernel values and the adapters are LoRA (an
adapted model and its base, two adapters of one base), the update is a sum
of products `s·A·B` and stays in factor form: `A = [s₁A₁ | … | −s'₁A'₁ …]`,
`B = [B₁; …; B'₁; …]`, so spectra and truncations never form a d×k matrix
(see `spectra.product_svd`). Otherwise (a full fine-tune) it is dense.

Example:

>>> import keras
>>> base = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="dense")])
>>> tuned = keras.models.clone_model(base)
>>> tuned.set_weights([w + 1.0 for w in base.get_weights()])
>>> [(d.path, d.matrix().shape) for d in layer_deltas(base, tuned)]
[('dense', (3, 2))]
"""

import dataclasses

import keras
import numpy as np

from keras_lowrank.layers import LowRankEmbedding
from keras_lowrank.layers import LowRankLayer
from keras_lowrank.layers import adapter_class_for
from keras_lowrank.state import owned
from keras_lowrank.surgery import targets as targeting
from keras_lowrank.surgery.walk import walk


@dataclasses.dataclass
class LayerDelta:
    """One layer's update.

    Attributes:
        path: the layer's path in the base model.
        layer: the base model's layer.
        layout: its `KernelLayout`.
        factors: `(A, B)`, `(*batch, d, R)` and `(*batch, R, k)`, when the
            update is a sum of products (exact), else `None`.
        dense: the `(*batch, d, k)` update when `factors` is `None`.
    """

    path: str
    layer: object
    layout: object
    factors: tuple = None
    dense: np.ndarray = None

    def matrix(self):
        """The update as a `(*batch, d, k)` float64 array."""
        if self.dense is not None:
            return self.dense
        a, b = self.factors
        return a @ b

    def is_zero(self):
        if self.dense is not None:
            return not np.any(self.dense)
        return not (np.any(self.factors[0]) and np.any(self.factors[1]))


def default_layers(model):
    """What `targets=None` selects: every adaptable layer but embeddings and
    a KerasHub task's head (whose changes `changed_weights` lists)."""
    head = {id(layer) for layer in targeting.default_trainable_layers(model)}
    return [
        visit
        for visit in walk(model)
        if adapter_class_for(visit.layer) is not None
        and not isinstance(visit.layer, (keras.layers.Embedding, LowRankEmbedding))
        and id(visit.layer) not in head
        and not any(id(p) in head for p in visit.parents)
    ]


def selected_layers(model, targets):
    if targets is None:
        return default_layers(model)
    targets = targeting.normalize("targets", targets)
    return targeting.select_layers(model, targets)


def layer_deltas(base, tuned, targets=None):
    """`[LayerDelta]` for the selected layers of `base` against their
    counterparts in `tuned` (`tuned=None`: `base`'s own active adapters)."""
    out = []
    counterparts = match_layers(base, tuned) if tuned is not None else {}
    for visit in selected_layers(base, targets):
        cls = adapter_class_for(visit.layer)
        layout = cls.kernel_layout(visit.layer)
        if tuned is None:
            if not isinstance(visit.layer, LowRankLayer):
                continue
            out.append(_delta(
                visit.path, visit.layer, layout, [],
                active_terms(visit.layer, merged=True),
            ))
            continue
        other, other_path = counterparts[visit.path]
        other_layout = adapter_class_for(other).kernel_layout(other)
        if other_layout.kernel_shape != layout.kernel_shape:
            raise ValueError(
                f"keras_lowrank: layer '{visit.path}' has kernel shape "
                f"{layout.kernel_shape} in the base model but "
                f"{other_layout.kernel_shape} in the tuned one ('{other_path}'): "
                "the models are not of one architecture."
            )
        base_kernel, base_terms = _kernel(visit.layer), active_terms(visit.layer)
        tuned_kernel, tuned_terms = _kernel(other), active_terms(other)
        same = len(base_kernel) == len(tuned_kernel) and all(
            np.array_equal(x, y) for x, y in zip(base_kernel, tuned_kernel)
        )
        if not same:
            if len(base_kernel) > 1 or len(tuned_kernel) > 1:
                raise ValueError(
                    f"keras_lowrank: layer '{visit.path}' has a quantized "
                    "kernel that differs between the two models, so its "
                    "update is not defined in float. Compare float models, "
                    "or models that share the quantized base."
                )
            tuned_terms = tuned_terms + [
                ("dense", to_matrix(layout, tuned_kernel[0] - base_kernel[0]))
            ]
        out.append(_delta(visit.path, visit.layer, layout, base_terms, tuned_terms))
    return out


def match_layers(base, tuned):
    """`{base path: (tuned layer, tuned path)}` for every adaptable layer.

    Paths match exactly, or (a backbone against the task that holds it) as
    the unique tuned path that ends with the base path or that the base path
    ends with.
    """
    find = finder(tuned, adaptable=True)
    out = {}
    for visit in walk(base):
        if adapter_class_for(visit.layer) is None:
            continue
        found = find(visit.path)
        if found is None:
            raise ValueError(
                f"keras_lowrank: layer '{visit.path}' of the base model "
                f"'{base.name}' has no counterpart in the tuned model "
                f"'{tuned.name}': the models are not of one architecture. "
                "Compare a model with its own fine-tune."
            )
        out[visit.path] = (found.layer, found.path)
    return out


def changed_weights(base, tuned, skip_paths):
    """Keys (`"<layer path>/<weight>"`, as adapter files name them) of the
    base model's own weights whose values differ in `tuned`, leaving out the
    kernels of the layers in `skip_paths` (their change is the update) and
    adapter variables. Weights `tuned` lacks are skipped."""
    find = finder(tuned, adaptable=False)
    out = []
    for visit in walk(base):
        other = find(visit.path)
        if other is None:
            continue
        skip = visit.path in skip_paths
        mine = _plain_weights(visit.layer, visit.path, skip)
        theirs = _plain_weights(other.layer, visit.path, skip)
        for key, variable in mine.items():
            twin = theirs.get(key)
            if twin is None or tuple(twin.shape) != tuple(variable.shape):
                continue
            if not np.array_equal(to_numpy(variable), to_numpy(twin)):
                out.append(key)
    return out


def finder(model, adaptable):
    visits = [
        v for v in walk(model)
        if not adaptable or adapter_class_for(v.layer) is not None
    ]
    by_path = {v.path: v for v in visits}

    def find(path):
        if path in by_path:
            return by_path[path]
        hits = [
            v for v in visits
            if v.path.endswith("/" + path) or path.endswith("/" + v.path)
        ]
        return hits[0] if len(hits) == 1 else None

    return find


def _plain_weights(layer, path, skip_kernel):
    """The layer's own weights by key, without adapter variables (and
    without the kernel when `skip_kernel`)."""
    drop = {id(v) for v in _adapter_variables(layer)}
    cls = adapter_class_for(layer)
    if skip_kernel and cls is not None:
        drop.add(id(cls.kernel_variable(layer)))
    return {
        key: variable
        for key, variable in owned.keyed_weights(layer, path).items()
        if id(variable) not in drop and not variable.name.startswith("lowrank_")
    }


def _adapter_variables(layer):
    if not isinstance(layer, LowRankLayer):
        return []
    return [
        v for name in layer.adapter_names
        for v in layer.adapter_variables(name).values()
    ]


def _kernel(layer):
    """The kernel's identity: `[kernel]` in the matrix-free kernel layout,
    float64, or for a quantized kernel every variable that defines it."""
    cls = adapter_class_for(layer)
    kernel = cls.kernel_variable(layer)
    if getattr(layer, "quantization_mode", None) is None:
        return [to_numpy(kernel).astype(np.float64)]
    names = [v for v in layer.weights if "scale" in v.name or v is kernel]
    return [to_numpy(v) for v in names]


def active_terms(layer, merged=False):
    """`[("lowrank", (s·A, B)) | ("dense", ΔW)]`: the active adapters of an
    adapted layer, in matrix form; merged ones only if `merged` (otherwise
    they are part of the kernel)."""
    if not isinstance(layer, LowRankLayer):
        return []
    layout = layer.lowrank_layout
    out = []
    for name in layer.active_adapters:
        if name in layer.merged_adapters and not merged:
            continue
        spec = layer.adapter_spec(name)
        if spec.method == "dora":
            out.append(("dense", to_matrix(layout, to_numpy(layer.delta(name)))))
            continue
        a, b = factor_matrices(layout, layer.adapter_variables(name))
        out.append(("lowrank", (a * spec.scale, b)))
    return out


def _delta(path, layer, layout, base_terms, tuned_terms):
    terms = tuned_terms + [(kind, _negate(kind, value)) for kind, value in base_terms]
    if terms and all(kind == "lowrank" for kind, _ in terms):
        a = np.concatenate([value[0] for _, value in terms], axis=-1)
        b = np.concatenate([value[1] for _, value in terms], axis=-2)
        return LayerDelta(path, layer, layout, factors=(a, b))
    dense = np.zeros(layout.batch_shape + (layout.d, layout.k))
    for kind, value in terms:
        dense = dense + (value[0] @ value[1] if kind == "lowrank" else np.asarray(value))
    return LayerDelta(path, layer, layout, dense=dense)


def _negate(kind, value):
    if kind == "lowrank":
        return (-value[0], value[1])
    return -np.asarray(value)


def to_matrix(layout, kernel):
    """A kernel-shaped array in the layout's `(*batch, d, k)` form, in
    float64 (`KernelLayout.to_matrix` in NumPy: no float32 round trip)."""
    kernel = np.transpose(np.asarray(kernel, np.float64), layout.perm)
    return kernel.reshape(layout.batch_shape + (layout.d, layout.k))


def factor_matrices(layout, variables):
    """An adapter's `A`, `B` as float64 `(*batch, d, r)`, `(*batch, r, k)`."""
    a = to_numpy(variables["A"]).astype(np.float64)
    b = to_numpy(variables["B"]).astype(np.float64)
    rank = a.shape[-1]
    return (a.reshape(layout.batch_shape + (layout.d, rank)),
            b.reshape(layout.batch_shape + (rank, layout.k)))


def from_matrix(layout, matrix, trailing):
    """`(*batch, d, r)` → `A`'s stored shape (`trailing="a"`) or
    `(*batch, r, k)` → `B`'s (`"b"`)."""
    if trailing == "a":
        return matrix.reshape(layout.a_shape(matrix.shape[-1]))
    return matrix.reshape(layout.b_shape(matrix.shape[-2]))


def to_numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))
