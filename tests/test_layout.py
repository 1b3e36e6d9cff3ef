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


# -- test tiers ----------------------------------------------------------------------------------------------------
# `make test` (-m "not slow") must stay within ~3 minutes on 2 cores: what costs tens of seconds a test, or starts
# processes, belongs to the slow tier. A fast test must not reach any of these, directly or through a function of
# its own file or of tests/helpers/.
TESTS = PACKAGE.parent / "tests"
SLOW_ONLY = {
    "subprocess": "a subprocess launcher (torchrun, accelerate, a fresh interpreter)",
    "torch.compile": "torch.compile",
    "smollm2": "the real SmolLM2-135M",
}


def _is_slow_mark(node: ast.expr) -> bool:
    marks = node.elts if isinstance(node, (ast.List, ast.Tuple)) else [node]
    return any(ast.unparse(mark) in ("pytest.mark.slow", "mark.slow") for mark in marks)


def _functions(path: Path) -> dict[str, ast.FunctionDef]:
    return {n.name: n for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)}


def _helper_functions() -> dict[str, dict[str, ast.FunctionDef]]:
    return {p.stem: _functions(p) for p in (TESTS / "helpers").glob("*.py")}


def _reached(function: ast.FunctionDef, local: dict, helpers: dict, seen: set) -> set[str]:
    """SLOW_ONLY names the function's code reaches: its own, and those of the functions it names, of its own file
    (`local`: name -> def) or of tests/helpers/ (`helpers`: module -> name -> def; `name(...)` or `module.name`)."""
    found = set()
    for node in ast.walk(function):
        if not isinstance(node, (ast.Name, ast.Attribute)):
            continue
        text = ast.unparse(node)
        found.update(name for name in SLOW_ONLY if text == name or text.endswith("." + name))
        if isinstance(node, ast.Name):
            callee_file = local if node.id in local else next((f for f in helpers.values() if node.id in f), {})
            callee = callee_file.get(node.id)
        else:
            callee_file = helpers.get(node.value.id, {}) if isinstance(node.value, ast.Name) else {}
            callee = callee_file.get(node.attr)
        if callee is not None and id(callee) not in seen:
            seen.add(id(callee))
            found |= _reached(callee, callee_file, helpers, seen)
    return found


def _fast_tests(path: Path):
    tree = ast.parse(path.read_text())
    module_slow = any(isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "pytestmark" for t in n.targets)
                      and _is_slow_mark(n.value) for n in tree.body)
    if module_slow:
        return
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
            if not any(_is_slow_mark(d) for d in node.decorator_list):
                yield node


@pytest.mark.parametrize("path", sorted(TESTS.glob("test_*.py")), ids=lambda p: p.name)
def test_the_fast_tier_starts_no_process_compiles_nothing_and_loads_no_smollm2(path):
    local, helpers = _functions(path), _helper_functions()
    offending = {test.name: sorted(_reached(test, local, helpers, set())) for test in _fast_tests(path)}
    offending = {name: [SLOW_ONLY[n] for n in names] for name, names in offending.items() if names}
    assert not offending, f"mark these @pytest.mark.slow (or move what they reach out of them): {offending}"


def test_the_tier_rule_sees_what_it_forbids(tmp_path):
    """The rule above can fail: a fast test that reaches subprocess through a local function is caught."""
    path = tmp_path / "test_probe.py"
    path.write_text("import subprocess\n\ndef _launch():\n    subprocess.run(['true'])\n\n"
                    "def test_probe():\n    _launch()\n\n@pytest.mark.slow\ndef test_slow():\n    _launch()\n")
    fast = list(_fast_tests(path))
    assert [t.name for t in fast] == ["test_probe"]
    assert _reached(fast[0], _functions(path), {}, set()) == {"subprocess"}
