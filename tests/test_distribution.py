"""Adapters under the backends' own distribution engines.

The multi-device runs need their device counts set before the backend
starts, so each runs a script from `tests/distributed/` in a subprocess (on
the backend that script is for) and checks the JSON it prints:

- JAX: `keras.distribution.DataParallel` and `ModelParallel` on 8 virtual
  CPU devices; `fit` equals one device; adapter shardings follow the kernels';
- TensorFlow: `tf.distribute.MirroredStrategy` on 2 logical CPU devices;
- PyTorch: `DistributedDataParallel`, 2 processes over gloo.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_lowrank
from keras_lowrank.layers import sharding

BACKEND = keras.backend.backend()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "tests", "distributed")


def _run_script(name, timeout=600, **env):
    environ = dict(os.environ)
    environ["PYTHONPATH"] = os.pathsep.join(
        [ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    )
    environ.update(env)
    proc = subprocess.run(
        [sys.executable, os.path.join(SCRIPTS, name)],
        env=environ,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert lines, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(lines[-1][len("RESULT "):])


# Kernel layout from the LayoutMap -> the layouts derived for A and B.
EXPECTED_MODEL_PARALLEL = {
    "wide/kernel": "(None, 'model')",
    "wide/lowrank_A_default": "(None, None)",
    "wide/lowrank_B_default": "(None, 'model')",
    "heads/kernel": "(None, 'model', None)",
    "heads/lowrank_A_default": "(None, None)",
    "heads/lowrank_B_default": "(None, 'model', None)",
    "narrow/kernel": "('model', None)",
    "narrow/lowrank_A_default": "('model', None)",
    "narrow/lowrank_B_default": "(None, None)",
}


@pytest.mark.slow
@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution runs on JAX")
def test_jax_data_and_model_parallel_fit_equals_one_device():
    result = _run_script(
        "jax_sharded_fit.py",
        KERAS_BACKEND="jax",
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
    )
    assert result["moved"] > 1e-2  # the factors did train
    assert result["data_parallel_gap"] < 1e-5
    assert result["model_parallel_gap"] < 1e-5
    assert all(
        spec.strip("()").replace("None", "").strip(", ") == ""
        for spec in result["data_parallel_shardings"].values()
    )
    shardings = result["model_parallel_shardings"]
    for path, spec in EXPECTED_MODEL_PARALLEL.items():
        assert shardings[path] == spec, (path, shardings[path])
    # Keras alone looks the adapters up in the LayoutMap by path: the broad
    # ".*wide/.*" rule would shard A's rank axis.
    assert result["keras_lookup_shardings"]["wide/lowrank_A_default"] == (
        "(None, 'model')"
    )


@pytest.mark.slow
@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute")
def test_tensorflow_mirrored_strategy_fit_equals_one_device():
    result = _run_script("tf_mirrored_fit.py", KERAS_BACKEND="tensorflow")
    assert result["replicas"] == 2
    assert result["variable_kinds"] == ["MirroredVariable"]
    assert result["moved"] > 1e-2
    assert result["mirrored_gap"] < 1e-5


@pytest.mark.slow
@pytest.mark.skipif(BACKEND != "torch", reason="torch.distributed")
def test_torch_ddp_two_processes_equals_one_process():
    result = _run_script("torch_ddp_fit.py", KERAS_BACKEND="torch")
    assert result["parameters_with_grad"] == 4  # A and B of two layers
    assert result["moved"] > 1e-2
    assert result["ddp_gap"] < 1e-5


# --- in-process checks --------------------------------------------------------


def _adapted(targets=("wide", "heads")):
    inputs = keras.Input((16,))
    h = keras.layers.Dense(32, use_bias=False, name="wide")(inputs)
    h = keras.layers.EinsumDense("ab,bcd->acd", (4, 8), name="heads")(h)
    model = keras.Model(inputs, h)
    keras_lowrank.adapt(model, rank=2, targets=list(targets))
    return model


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution runs on JAX")
def test_adapter_layouts_follow_the_kernel_layout():
    devices = keras.distribution.list_devices()[:1]
    mesh = keras.distribution.DeviceMesh((1, 1), ("batch", "model"), devices)
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*wide/.*"] = ("model", None)  # matches the adapters too
    layout_map[".*heads/kernel"] = (None, "model", None)
    distribution = keras.distribution.ModelParallel(layout_map=layout_map)
    with distribution.scope():
        model = _adapted()
        wide, heads = model.get_layer("wide"), model.get_layer("heads")
        axes = {
            (layer.name, key): sharding.adapter_layout(
                layer, key, layer.lowrank_layout
            ).axes
            for layer in (wide, heads)
            for key in ("A", "B", "magnitude")
        }
    assert axes == {
        ("wide", "A"): ("model", None),
        ("wide", "B"): (None, None),
        ("wide", "magnitude"): (None,),
        ("heads", "A"): (None, None),
        ("heads", "B"): (None, "model", None),
        ("heads", "magnitude"): ("model", None),
    }
    # (The 8-device script checks the variables' actual shardings.)


def test_no_distribution_no_layout():
    model = _adapted()
    layer = model.get_layer("wide")
    assert sharding.adapter_layout(layer, "A", layer.lowrank_layout) is None


@pytest.mark.skipif(BACKEND != "torch", reason="torch parameters")
def test_torch_parameters_follow_the_adapters():
    model = _adapted()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(n.rsplit(".", 1)[-1] for n in names) == [
        "heads/lowrank_A_default",
        "heads/lowrank_B_default",
        "wide/lowrank_A_default",
        "wide/lowrank_B_default",
    ]
    keras_lowrank.unload(model)
    names = [n for n, _ in model.named_parameters()]
    assert not any("lowrank_" in n for n in names)
    assert len(names) == len(model.weights)
    x = np.ones((2, 16), "float32")
    assert model(x).shape == (2, 4, 8)
