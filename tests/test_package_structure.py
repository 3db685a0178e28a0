"""The package's shape: small modules, no import cycles, no backend imports.

These read the source only (no Keras backend needed), so they are the same
on every backend.
"""

import ast
import io
import pathlib
import tokenize

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "keras_lowrank"
MAX_CODE_LINES = 400
BACKENDS = ("jax", "torch", "tensorflow")


def _modules():
    return sorted(PACKAGE.rglob("*.py"))


def _name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def code_lines(source):
    """Lines holding code: not blank, not comments, not docstrings."""
    tree = ast.parse(source)
    docstrings = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if not isinstance(body, list) or not body:
            continue
        first = body[0]
        if (
            isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                              ast.AsyncFunctionDef))
            and isinstance(first, ast.Expr)
            and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str)
        ):
            docstrings.update(range(first.lineno, first.end_lineno + 1))
    skip = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
            tokenize.DEDENT, tokenize.ENDMARKER)
    lines = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in skip:
            lines.update(range(token.start[0], token.end[0] + 1))
    return len(lines - docstrings)


def test_code_lines_counts_code_only():
    source = '"""Doc.\n\nMore."""\n\n# comment\nx = 1\n\n\ndef f():\n    """Doc."""\n    return (1,\n            2)\n'
    assert code_lines(source) == 4


@pytest.mark.parametrize("path", _modules(), ids=_name)
def test_module_is_small(path):
    lines = code_lines(path.read_text())
    assert lines <= MAX_CODE_LINES, (
        f"{_name(path)} has {lines} lines of code (limit {MAX_CODE_LINES}): "
        "split it by job."
    )


def _imports(path):
    """Every keras_lowrank module `path` imports, at any depth (function-level
    imports included: a lazy import that hides a cycle is still a cycle)."""
    tree = ast.parse(path.read_text())
    known = {_name(p) for p in _modules()}
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            # `from pkg import module` imports the module; `from pkg import
            # name` imports what pkg/__init__ defines.
            names = [
                f"{node.module}.{alias.name}"
                if f"{node.module}.{alias.name}" in known
                else node.module
                for alias in node.names
            ]
        else:
            continue
        for name in names:
            if name in known:
                found.add(name)
    return found


def _graph():
    graph = {}
    for path in _modules():
        name = _name(path)
        # A package's __init__ re-exports its modules; importing a module
        # runs its package's __init__ first, so edges into a package are
        # edges into what it re-exports, which the walk below follows.
        graph[name] = _imports(path) - {name}
    return graph


def _find_cycle(graph):
    state = {}
    stack = []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_find_cycle_finds_one():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    # The top-level package re-exports everything, so it is left out: every
    # module may be imported through it.
    graph = {
        name: {n for n in deps if n != "keras_lowrank"}
        for name, deps in _graph().items()
        if name != "keras_lowrank"
    }
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("path", _modules(), ids=_name)
def test_no_backend_import(path):
    if _name(path).startswith("keras_lowrank.bench"):
        pytest.skip("the benchmark measures backends on purpose")
    if _name(path) == "keras_lowrank.analysis.autodiff":
        pytest.skip("Keras has no backend-neutral gradient function (see the module)")
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots = [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            roots = [node.module.split(".")[0]]
        else:
            continue
        bad = set(roots) & set(BACKENDS)
        assert not bad, f"{_name(path)} imports {sorted(bad)}: use keras.ops"
