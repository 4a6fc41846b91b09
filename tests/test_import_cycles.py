"""No import cycle among tetri's modules, counting lazy (function-level) imports too: the
dependency between two modules runs one way (a cycle hidden behind a lazy import is still a
cycle of design, e.g. the old sched/predictor.py <-> predictor/model.py)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_files(package: Path) -> dict[str, Path]:
    out = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The tetri modules `name` imports anywhere in its body (`from pkg import sub` counts
    as importing the submodule `pkg.sub` when there is one)."""

    def known(dotted: str) -> str | None:
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str | None] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(known(a.name) for a in node.names if a.name.split(".")[0] == "tetri")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                head = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(head + ([node.module] if node.module else []))
            if base.split(".")[0] != "tetri":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else known(base))
    found.discard(None)
    found.discard(name)
    return found  # type: ignore[return-value]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle (as a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_sees_a_cycle_and_its_absence():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_imports_of_resolves_relative_lazy_and_submodule_imports(tmp_path):
    pkg = tmp_path / "tetri"
    (pkg / "sub").mkdir(parents=True)
    for rel in ("__init__.py", "sub/__init__.py", "sub/a.py", "sub/b.py", "c.py"):
        (pkg / rel).write_text("")
    (pkg / "sub" / "a.py").write_text("from . import b\nimport os\n\ndef f():\n    from tetri.c import x\n")
    modules = module_files(pkg)
    assert imports_of("tetri.sub.a", pkg / "sub" / "a.py", modules) == {"tetri.sub.b", "tetri.c"}


def test_tetri_has_no_import_cycle():
    modules = module_files(ROOT / "tetri")
    assert {"tetri.sched.predictor", "tetri.predictor.model", "tetri.sched.mlfq"} <= set(modules)
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    assert "tetri.sched.predictor" in graph["tetri.predictor.model"]  # the walk sees real edges
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
