"""Shared fixtures. The backend is chosen by KERAS_BACKEND per pytest process."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# JAX runs each op eagerly as its own small XLA program, so the suite compiles
# hundreds of them; skipping LLVM's optimisation passes cuts the JAX run time
# by about a third. Tests only; a user's own XLA_FLAGS win.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


def pytest_report_header(config):
    return f"keras {keras.__version__}, backend {keras.backend.backend()}"


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    """Every test starts from a clean Keras session and a fixed seed."""
    # free_memory=False: the full gc.collect() it would run costs ~0.5 s per
    # test once JAX or TensorFlow is loaded; the tests are small.
    keras.backend.clear_session(free_memory=False)
    keras.utils.set_random_seed(1234)
    np.random.seed(1234)
    yield
    keras.config.set_dtype_policy("float32")
