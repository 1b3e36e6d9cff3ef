"""The package's shape rules (docs/architecture.md): small files, small functions, the oracle kept out of the
production path (only `ops.dispatch` imports `ops.reference` or `ops.kernels`; no kernel does), and the functional
layer `ops/` standing on its own (it imports nothing of the package but `errors`)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pema_triton"
SOURCES = sorted(PACKAGE.rglob("*.py"))
MAX_FILE_LINES, MAX_FUNCTION_LINES = 350, 60


def _relative(path: Path) -> str:
    return str(path.relative_to(PACKAGE.parent))


@pytest.mark.parametrize("path", SOURCES, ids=_relative)
def test_files_and_functions_stay_small(path):
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_FILE_LINES
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(text))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (docstring included): {long}"


def _imported_modules(path: Path) -> set[str]:
    """Names of pema_triton modules a file imports, relative imports resolved (`..reference` -> `reference`)."""
    package = path.relative_to(PACKAGE).parent.parts
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)]
            module = ".".join((*base, *(node.module.split(".") if node.module else ())))
            names.add(module)
            names.update(f"{module}.{alias.name}".lstrip(".") for alias in node.names)
    return names


def test_only_dispatch_chooses_between_kernels_and_reference():
    for chosen in ("ops.reference", "ops.kernels"):
        importers = sorted(_relative(p) for p in SOURCES if chosen in _imported_modules(p)
                           and not _relative(p).startswith(f"pema_triton/{chosen.replace('.', '/')}/"))
        assert importers == ["pema_triton/ops/dispatch.py"], chosen


def test_ops_imports_nothing_of_the_package_but_errors():
    outside = {
        _relative(path): sorted(name for name in _imported_modules(path)
                                if name.split(".")[0] not in ("ops", "errors") and name)
        for path in SOURCES if path.relative_to(PACKAGE).parts[0] == "ops"
    }
    assert {path: names for path, names in outside.items() if names} == {}


def test_ops_has_no_absolute_imports_of_the_package():
    """`import pema_triton.x` inside ops/ would dodge the relative-import rule above."""
    for path in SOURCES:
        if path.relative_to(PACKAGE).parts[0] == "ops":
            assert "import pema_triton" not in path.read_text() and "from pema_triton" not in path.read_text()
