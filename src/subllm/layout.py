"""The package's import graph, read from the source: its layers and its cycles.

Used by the layout tests and by `subllm bench startup`'s report. Layers, lowest first:
nothing may import a module of a higher layer (function-level imports included), and the
module-level graph has no cycles.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent

# module name prefix -> layer; the longest matching prefix wins
LAYERS: dict[str, int] = {
    "subllm.model": 0,
    "subllm.errors": 0,
    "subllm.autoregister": 0,
    "subllm.atomic": 0,
    "subllm.flags": 1,
    "subllm.planner": 1,
    "subllm.interop": 2,
    "subllm.hf": 2,
    "subllm.train": 3,
    "subllm.serve": 3,
    "subllm.bench": 4,
    "subllm.layout": 4,
    "subllm.commands": 5,
    "subllm.cli": 6,
    "subllm.__main__": 6,
    "subllm": 6,  # the package's own __init__ (lazy re-exports)
}


def layer_of(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def module_files() -> dict[str, Path]:
    """subllm module name -> source file."""
    out = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(module: str, path: Path, top_level_only: bool) -> set[str]:
    """The subllm modules `module` imports (TYPE_CHECKING blocks excluded; with
    `top_level_only`, imports inside functions excluded too)."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
        elif top_level_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            skip.update(id(n) for n in ast.walk(node))
    known = module_files()
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "subllm")
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node, path.name == "__init__.py")
            if target.split(".")[0] != "subllm":
                continue
            for a in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{target}.{a.name}"
                found.add(sub if sub in known else target)
    found.discard(module)
    return found


def graph(top_level_only: bool = True) -> dict[str, set[str]]:
    return {m: imports(m, p, top_level_only) for m, p in module_files().items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g.get(v, ()):
            if w not in g:
                continue
            if w not in index:
                strong(w)
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
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            strong(v)
    return out


def upward_imports() -> list[tuple[str, str]]:
    """(importer, imported) pairs where a module imports a higher layer."""
    return sorted((m, t) for m, targets in graph(top_level_only=False).items()
                  for t in targets if layer_of(t) > layer_of(m))
