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


# --- the smoke subset: `pytest -m smoke` -------------------------------------
# What `bash scripts/run_tests.sh --keras-min` runs on the oldest Keras that
# pyproject.toml admits, in an environment with one backend (JAX) and no
# keras-hub, torch, tensorflow or peft. It is every test of these files but
# those that need one of them; the rule lives here, not in the test files,
# so a new test in these files joins the smoke run by default (and, if it
# needs keras-hub, fails there loudly until it is listed below).
SMOKE_FILES = (
    "test_layers.py",
    "test_adapter_math.py",
    "test_layer_errors.py",
    "test_adapt.py",
    "test_lifecycle.py",
    "test_adapter_files.py",
    "test_quantized.py",
    "test_variants.py",
    "test_einsum_factorization.py",
    "test_inference_fold.py",
    "test_loraplus.py",
    "test_remat.py",
    "test_verbs_table.py",
    "test_serving.py",
)
# Tests of those files that build a KerasHub model without a `kind`
# parameter, or start processes on the other backends.
SMOKE_EXCLUDED = {
    "test_adapt.py": (
        "test_keras_files_load_in_a_fresh_process",
        "test_plain_keras_without_keras_lowrank_fails_loudly",
    ),
    "test_lifecycle.py": ("test_each_adapter_owns_its_copy_of_the_task_head",),
    "test_adapter_files.py": (
        "test_dora_and_keras_hub_adapters_round_trip",
        "test_layers_keras_numbered_differently_are_found",
        "test_save_on_this_backend_load_on_another",
        "test_a_file_for_another_layer_of_a_deeper_bert_is_refused",
    ),
}


def _hub_params():
    import model_kinds

    return {name for name, kind in model_kinds.KINDS.items() if kind.hub} | {
        "keras_hub"
    }


def _smoke_selected(config):
    return "smoke" in (config.getoption("markexpr", "") or "")


def pytest_ignore_collect(collection_path, config):
    # A smoke run does not even import the other test files: they may need
    # packages the smoke environment does not have.
    if not _smoke_selected(config):
        return None
    name = collection_path.name
    if name.startswith("test_") and name.endswith(".py") and name not in SMOKE_FILES:
        return True
    return None


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    hub = _hub_params()
    for item in items:
        name = item.path.name
        if name not in SMOKE_FILES:
            continue
        function = getattr(item, "originalname", item.name)
        if function in SMOKE_EXCLUDED.get(name, ()):
            continue
        params = getattr(getattr(item, "callspec", None), "params", {})
        if any(isinstance(v, str) and v in hub for v in params.values()):
            continue
        item.add_marker(pytest.mark.smoke)
    if _smoke_selected(config):
        here = os.path.dirname(os.path.abspath(__file__))
        missing = [f for f in SMOKE_FILES if not os.path.exists(os.path.join(here, f))]
        if missing:
            raise pytest.UsageError(
                f"tests/conftest.py SMOKE_FILES names missing files {missing}; "
                "update the list"
            )
