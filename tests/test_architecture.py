"""The package's shape as a contract: layers follow the data flow, no import cycles, no private imports.

DESIGN.md section 2: data <- models <- scoring <- evaluation <- run, over the shared modules. The layer
contract itself is import-linter's (``[tool.importlinter]`` in pyproject.toml); import-linter has no
"no cycles" contract, so cycles are found here with grimp, the graph library import-linter is built on.
Function-level imports count: an import moved into a function still makes a cycle.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pipeline"
MAX_LINES = 700
LONG_ALLOWED = {"data/synthetic.py"}  # one seeded generator reads better whole (the house issue allows it)


def import_cycles(package: str) -> list[list[str]]:
    """Strongly connected components of more than one module in ``package``'s import graph (Tarjan)."""
    graph = grimp.build_graph(package)
    modules = sorted(graph.modules)
    edges = {m: sorted(graph.find_modules_directly_imported_by(m) & graph.modules) for m in modules}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for m in modules:
        if m not in index:
            visit(m)
    return cycles


def test_layers_contract_holds():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if exe is None:
        pytest.fail("lint-imports is not installed. Fix: pip install -e '.[test]'")
    res = subprocess.run([exe, "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "1 kept, 0 broken" in res.stdout


def test_no_import_cycles():
    cycles = import_cycles("pipeline")
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_cycle_check_finds_a_cycle(tmp_path, monkeypatch):
    """The check above can fail: a scratch package with a -> b -> a (one import inside a function)."""
    pkg = tmp_path / "scratchpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from scratchpkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from scratchpkg import a\n    return a\n")
    (pkg / "c.py").write_text("from scratchpkg import a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert import_cycles("scratchpkg") == [["scratchpkg.a", "scratchpkg.b"]]


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_no_private_name_crosses_a_module_boundary():
    bad = []
    for path in _modules():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline"):
                bad += [
                    f"{path.relative_to(ROOT)}:{node.lineno} imports {a.name}"
                    for a in node.names
                    if a.name.startswith("_") and a.name != "__version__"
                ]
    assert not bad, "\n".join(bad)


def test_no_relative_imports_and_no_module_over_the_size_limit():
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in _modules()
        if (n := len(p.read_text().splitlines())) > MAX_LINES and str(p.relative_to(PACKAGE)) not in LONG_ALLOWED
    }
    assert not long, f"modules over {MAX_LINES} lines (split them along the data flow): {long}"
    rel = [
        str(p)
        for p in _modules()
        if any(isinstance(n, ast.ImportFrom) and n.level > 0 for n in ast.walk(ast.parse(p.read_text())))
    ]
    assert not rel, f"relative imports (use absolute ones: they name the layer): {rel}"
