"""Packaging and import direction: the kernels are tpserve.kernels (never a top-level `kernels`,
in the wheel or in the repository root, which would shadow the PyPI package of that name that
transformers imports), nothing under tpserve/kernels/ imports the rest of tpserve, and tpserve's
import graph has no cycles (function-level imports included)."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_modules() -> dict[str, Path]:
    paths = list((ROOT / "tpserve").rglob("*.py"))
    return {module_name(p): p for p in paths}


def imported_names(path: Path, name: str) -> set[str]:
    """Every module an import statement in `path` names (at any depth, TYPE_CHECKING blocks
    excluded), with relative imports resolved."""
    tree = ast.parse(path.read_text())
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out: set[str] = set()
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
               for n in ast.walk(node)}
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            module = ".".join(x for x in (base, node.module) if x)
            out.add(module)
            out.update(f"{module}.{a.name}" for a in node.names)
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the tpserve modules it imports, each with its parent packages (importing a.b.c
    runs a and a.b first), except a module's own parent packages (already initialising)."""
    mods = source_modules()
    graph = {}
    for name, path in mods.items():
        deps = set()
        for imported in imported_names(path, name):
            parts = imported.split(".")
            deps.update(".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in mods)
        graph[name] = {d for d in deps if not (name == d or name.startswith(d + "."))}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(u: str) -> list[str] | None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if v not in state and (cycle := visit(v)):
                return cycle
        stack.pop()
        state[u] = 2
        return None

    for u in sorted(graph):
        if u not in state and (cycle := visit(u)):
            return cycle
    return None


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_tpserve_import_graph_has_no_cycles():
    graph = import_graph()
    assert "tpserve.config" in graph and "tpserve.kernels.flash_prefill" in graph
    assert "tpserve.quant.config" in graph["tpserve.config"]  # the direction that remains
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_kernels_import_nothing_from_tpserve():
    assert not (ROOT / "kernels").exists(), "a top-level kernels/ shadows the PyPI package when run from the root"
    for folder in ("benchmarks", "launch", "scripts"):  # a script's own folder is first on sys.path
        assert not (ROOT / folder / "kernels.py").exists() and not (ROOT / folder / "kernels").exists(), folder
    for path in (ROOT / "tpserve" / "kernels").glob("*.py"):
        name = module_name(path)
        outside = {m for m in imported_names(path, name)
                   if (m == "tpserve" or m.startswith("tpserve.")) and not m.startswith("tpserve.kernels")}
        assert not outside, f"{path.name} imports {sorted(outside)}"
        assert not any(m == "kernels" or m.startswith("kernels.") for m in imported_names(path, name)), path.name


@pytest.mark.slow
def test_wheel_installs_kernels_as_tpserve_kernels(tmp_path):
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--disable-pip-version-check",
                          "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    (wheel,) = tmp_path.glob("tpserve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    tops = {n.split("/")[0] for n in names}
    assert tops == {"tpserve", next(t for t in tops if t.endswith(".dist-info"))}, tops
    for path in source_modules().values():
        rel = path.relative_to(ROOT)
        assert rel.as_posix() in names, f"{rel} is missing from the wheel"
