"""Fresh-process half of the `.keras` round-trip tests.

Run as `KERAS_BACKEND=<b> python tests/roundtrip_child.py <dir> <kind>...`.
`<dir>` holds, per kind, `<kind>.keras` (adapted), `<kind>_plain.keras`
(after `unload`) and `<kind>.npz` (inputs and expected outputs), written by
`test_adapt.py` on possibly another backend.

Phase 1 loads the plain files while `import keras_lowrank` is impossible, as
on a machine without it. Phase 2 imports keras_lowrank, loads the adapted
files with plain `keras.saving.load_model`, checks outputs and that the
adapters are separate trainable factors, then trains one step and checks that
only the factors moved. Prints one JSON object with every measurement.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


class _NoKerasLowrank:
    """An import hook that makes `keras_lowrank` unimportable."""

    def find_spec(self, name, path=None, target=None):
        if name == "keras_lowrank" or name.startswith("keras_lowrank."):
            raise ImportError("keras_lowrank is blocked in this process")
        return None


def main(directory, kinds):
    blocker = _NoKerasLowrank()
    sys.meta_path.insert(0, blocker)
    import keras
    import numpy as np

    import model_kinds

    results = {"backend": keras.backend.backend(), "kinds": {}}
    data = {k: dict(np.load(os.path.join(directory, f"{k}.npz"))) for k in kinds}

    def inputs_of(kind):
        arrays = data[kind]
        if "x" in arrays:
            return arrays["x"]
        return {k[2:]: v for k, v in arrays.items() if k.startswith("x_")}

    for kind in kinds:
        plain = keras.saving.load_model(os.path.join(directory, f"{kind}_plain.keras"))
        got = model_kinds.outputs(plain, inputs_of(kind))
        results["kinds"][kind] = {
            "plain_max_diff": float(np.max(np.abs(got - data[kind]["expected"]))),
            "plain_has_lowrank": any(
                "keras_lowrank" in type(layer).__module__
                for layer in plain._flatten_layers()
            ),
        }
    assert "keras_lowrank" not in sys.modules

    sys.meta_path.remove(blocker)
    import keras_lowrank  # noqa: F401  (registers the classes)

    for kind in kinds:
        entry = results["kinds"][kind]
        model = keras.saving.load_model(os.path.join(directory, f"{kind}.keras"))
        x = inputs_of(kind)
        entry["adapted_max_diff"] = float(
            np.max(np.abs(model_kinds.outputs(model, x) - data[kind]["expected"]))
        )
        report = keras_lowrank.report(model)
        entry["adapted_paths"] = [row.path for row in report.rows]
        trainable = model.trainable_weights
        entry["trainable"] = sorted(w.path for w in trainable)
        before = {
            id(w): keras.ops.convert_to_numpy(w).copy() for w in model.weights
        }
        spec = model_kinds.KINDS[kind]
        model_kinds.compile_for_training(model, spec)
        model.fit(x, data[kind]["labels"], epochs=1, batch_size=len(data[kind]["labels"]), verbose=0)
        moved, frozen_changed = [], []
        trainable_ids = {id(w) for w in trainable}
        for w in model.weights:
            changed = not np.array_equal(keras.ops.convert_to_numpy(w), before[id(w)])
            if id(w) in trainable_ids:
                if changed:
                    moved.append(w.path)
            elif changed:
                frozen_changed.append(w.path)
        entry["moved"] = sorted(moved)
        entry["frozen_changed"] = sorted(frozen_changed)
    print("RESULT " + json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
