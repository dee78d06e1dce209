"""The layout's rules, checked: no import cycle among safemerge's modules (function-level imports
included), no module over 450 lines, no function over 60 lines.

    python scripts/check_layout.py
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "safemerge"
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 450, 60


def module_name(path: Path) -> str:
    parts = ["safemerge", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """The safemerge modules PATH imports anywhere (a package import counts as its __init__)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("safemerge"):
            for alias in node.names:  # from safemerge.x import y: y may be a module
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("safemerge")}
    return {m for m in found if m in modules}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def long_functions(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                out.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}() is {length} lines")
    return out


def main() -> int:
    files = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    modules = set(files)
    # a package's __init__ is imported with any of its modules, so it must not import them back
    graph = {m: imports(p, modules) | ({m.rpartition(".")[0]} - {""} if m.count(".") > 1 else set())
             for m, p in files.items()}
    problems = [" -> ".join(c) + " (import cycle)" for c in cycles(graph)]
    problems += [f"{p.relative_to(PACKAGE.parent)} is {n} lines" for p in files.values()
                 if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]
    problems += [line for p in files.values() for line in long_functions(p)]
    print("\n".join(problems) or f"{len(files)} modules: no cycle, none over {MAX_MODULE_LINES} lines, "
          f"no function over {MAX_FUNCTION_LINES} lines")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
