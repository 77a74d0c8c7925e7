"""The house's import rules, read from the source (no import is run): `shared` imports
neither `api` nor `worker`, `api` and `worker` never import each other, and the
module-level imports have no cycle (a cycle breaks the module imported first, as a
ManifestDoc/Outcome cycle once did). Imports inside functions and under TYPE_CHECKING are
how a cycle is legitimately broken, so they are not edges."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("api", "worker", "shared")


def _module(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(tree: ast.Module, module: str, is_package: bool) -> set[str]:
    found: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = module.split(".")
                    anchor = anchor if is_package else anchor[:-1]
                    anchor = anchor[:len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)
            elif isinstance(node, ast.If | ast.Try):
                visit(node.body)
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
                visit(node.orelse)
    visit(tree.body)
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        imports = _top_level_imports(ast.parse(path.read_text()), module,
                                     path.name == "__init__.py")
        graph[module] = {i for i in imports if i in files and i != module}
    return graph


def test_shared_imports_neither_api_nor_worker_and_they_never_import_each_other() -> None:
    graph = _graph()
    files = {_module(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    wrong = []
    for module, path in files.items():
        every = {n.module or "" for n in ast.walk(ast.parse(path.read_text()))
                 if isinstance(n, ast.ImportFrom)}
        every |= {a.name for n in ast.walk(ast.parse(path.read_text()))
                  if isinstance(n, ast.Import) for a in n.names}
        top = module.split(".")[0]
        banned = {"shared": ("api", "worker"), "api": ("worker",), "worker": ("api",)}[top]
        wrong += [f"{module} imports {i}" for i in every if i.split(".")[0] in banned]
    assert not wrong and graph


def test_module_level_imports_have_no_cycle() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            walk(module)
    # a package's __init__ importing its own submodules is how a package is built
    real = [c for c in cycles if not all(m.startswith(c[0] + ".") or m == c[0] for m in c)]
    assert not real, "\n".join(" -> ".join(c) for c in real)
