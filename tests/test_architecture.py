"""The package's shape: subpackages in layers, no import cycles, no private names across
subpackages. Read from the source (every import, lazy ones included), not from what
happens to be imported at run time."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import torch_nvdla

PKG = Path(torch_nvdla.__file__).parent

#: Subpackage -> layer. A subpackage imports only from lower layers (and itself).
LAYERS = {
    "errors": 0,
    "utils": 1, "model": 1,
    "calib": 2, "caffe": 2, "zoo": 2,
    "nvdla": 3,
    "sim": 4,
    "export": 5,
    "cli": 6,
}


def _module(path: Path) -> tuple[str, str]:
    """(dotted module, its package) for a file of torch_nvdla."""
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
        return ".".join(parts), ".".join(parts)
    return ".".join(parts), ".".join(parts[:-1])


def _imports() -> list[tuple[str, str, str]]:
    """(importer, imported module, imported name) for every import inside the package."""
    out = []
    for path in PKG.rglob("*.py"):
        mod, pkg = _module(path)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                elif node.module and node.module.startswith("torch_nvdla"):
                    target = node.module
                else:
                    continue
                out += [(mod, target, a.name) for a in node.names]
            elif isinstance(node, ast.Import):
                out += [(mod, a.name, "") for a in node.names if a.name.startswith("torch_nvdla")]
    return out


def _sub(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_subpackage_has_a_layer():
    subs = {p.parent.name for p in PKG.glob("*/__init__.py")} | {p.stem for p in PKG.glob("*.py") if p.stem != "__init__"}
    assert subs == set(LAYERS), subs


def test_no_upward_imports():
    bad = []
    for importer, target, _ in _imports():
        a, b = _sub(importer), _sub(target)
        if not a or a == b or b == "models" and a == "zoo":
            continue
        if b not in LAYERS or LAYERS[b] >= LAYERS[a]:
            bad.append(f"{importer} imports {target}")
    assert not bad, "\n".join(sorted(bad))


def test_no_private_names_across_subpackages():
    bad = [f"{i} imports {n} from {t}" for i, t, n in _imports()
           if n.startswith("_") and _sub(i) != _sub(t) and _sub(i)]
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycles():
    graph: dict[str, set[str]] = defaultdict(set)
    modules = {_module(p)[0] for p in PKG.rglob("*.py")}
    for importer, target, name in _imports():
        dest = f"{target}.{name}" if f"{target}.{name}" in modules else target
        if dest != importer and dest in modules:
            graph[importer].add(dest)
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(u: str, stack: list[str]) -> None:
        state[u] = 1
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                cycles.append(stack[stack.index(v):] + [v])
            elif v not in state:
                visit(v, stack + [v])
        state[u] = 2

    for m in sorted(modules):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles
