"""Runs the docstring examples of every module of keras_lowrank.

The modules are found by walking the package, so a module added later is
tested without touching this file. The examples' printed outputs must be the
same on every backend (shapes as `tuple(...)`, arrays through
`keras.ops.convert_to_numpy`), since the suite runs once per backend.
"""

import doctest
import importlib
import pkgutil

import pytest

import keras_lowrank


def _module_names():
    names = [keras_lowrank.__name__]
    for info in pkgutil.walk_packages(
        keras_lowrank.__path__, prefix=keras_lowrank.__name__ + "."
    ):
        names.append(info.name)
    return sorted(names)


MODULES = _module_names()


def test_the_walk_finds_the_core_modules():
    for name in (
        "keras_lowrank.adapter_math",
        "keras_lowrank.spec",
        "keras_lowrank.layers.base",
        "keras_lowrank.layers.dense",
        "keras_lowrank.layers.einsum_dense",
        "keras_lowrank.layers.einsum_factorization",
        "keras_lowrank.layers.embedding",
        "keras_lowrank.layers.conv",
        "keras_lowrank.layers.layout",
    ):
        assert name in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as error:
        # An optional dependency (keras_hub, safetensors, ...) is missing;
        # a missing keras_lowrank module is a real failure.
        if (error.name or "").startswith("keras_lowrank"):
            raise
        pytest.skip(f"{name} needs {error.name}, which is not installed")
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    )
    # Only the examples defined in this module (not re-exported objects).
    tests = [
        t
        for t in finder.find(module, name)
        if t.examples and _owned(t, name)
    ]
    if not tests:
        pytest.skip(f"{name} has no docstring examples")
    report = []
    for test in tests:
        runner.run(test, out=report.append)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, "".join(report)


def _owned(test, module_name):
    filename = test.filename or ""
    return filename.endswith(module_name.replace(".", "/") + ".py") or (
        filename.endswith(module_name.replace(".", "/") + "/__init__.py")
    )
