"""The house's import rules, checked on the source: one-way layers, no circles.

Every module of ``distmlip/`` is parsed (top-level imports and imports inside functions alike);
each import of another distmlip module is an arrow. The layers, low to high (docs/architecture.md):

    typing, options, errors  ->  graph  ->  partition, models  ->  runtime  ->  calculators
    ->  md, drivers, cli, testing

A module may import its own layer and the layers below it, never above; and no set of modules may
import each other in a circle (within a package too). Deferred (in-function) imports of distmlip
modules are not allowed either: they existed to keep circles importable.
"""

from __future__ import annotations

import ast
from pathlib import Path

import distmlip

ROOT = Path(distmlip.__file__).resolve().parent

#: top-level name under distmlip/ -> layer (higher may import lower). The package's own
#: ``__init__`` (the public surface) and ``__main__`` stand above everything.
LAYERS = {
    "typing": 0, "options": 0, "errors": 0,
    "graph": 1,
    "partition": 2, "models": 2,
    "runtime": 3,
    "calculators": 4,
    "md": 5, "drivers": 5, "testing": 5,
    "serve": 5,  # the deprecated alias of drivers (2026-12-02)
    "cli": 6,
    "__init__": 7, "__main__": 7,
}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve(name: str, path: Path, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    base = package.split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(known: dict[str, Path]) -> list[tuple[str, str, int, bool]]:
    """(importer, imported distmlip module, line, inside a function) for every import."""
    out = []
    for name, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        deferred = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                    for n in ast.walk(f)}
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, path, node)
                # ``from . import x`` / ``from .pkg import mod``: the module if it is one
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
            for target in targets:
                if not target.startswith("distmlip"):
                    continue
                while target not in known and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target != name:
                    out.append((name, target, node.lineno, id(node) in deferred))
    return sorted(set(out))


def layer(name: str) -> int:
    parts = name.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    return LAYERS[top]


def circles(edges) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for a, b, *_ in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _where(known, a, b, line):
    return f"{known[a].relative_to(ROOT.parent)}:{line} imports {b}"


def test_every_module_has_a_layer():
    known = modules()
    missing = sorted({n.split(".")[1] for n in known if "." in n} - set(LAYERS))
    assert not missing, f"distmlip/{missing}: add the package to LAYERS (and docs/architecture.md)"


def test_no_upward_imports():
    known = modules()
    # a package's __init__ re-exports its own modules: it is at its package's layer
    bad = [_where(known, a, b, line) + f" (layer {layer(a)} -> {layer(b)})"
           for a, b, line, _ in imports(known) if layer(b) > layer(a)]
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_no_import_circles():
    known = modules()
    edges = imports(known)
    found = circles(edges)
    detail = []
    for comp in found:
        members = set(comp)
        detail += [_where(known, a, b, line) for a, b, line, _ in edges if a in members and b in members]
    assert not found, f"import circles {found}:\n" + "\n".join(detail)


def test_no_deferred_imports_of_distmlip():
    known = modules()
    bad = [_where(known, a, b, line) for a, b, line, deferred in imports(known) if deferred]
    assert not bad, ("imports of distmlip modules inside functions (import at the top; a deferred "
                     "import is for optional third-party packages only):\n" + "\n".join(bad))


#: The longest a module may be (lines), and the runner, which only orchestrates.
MAX_LINES, MAX_RUNNER_LINES = 600, 400


def test_modules_are_small():
    sizes = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    big = {name: n for name, n in sizes.items() if n > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines (split them by job): {big}"
    assert sizes["distmlip.runtime.runner"] <= MAX_RUNNER_LINES, sizes["distmlip.runtime.runner"]


def test_the_checker_sees_arrows():
    """The parser finds the arrows it should (a checker that finds nothing passes everything)."""
    edges = {(a, b) for a, b, *_ in imports(modules())}
    assert ("distmlip.calculators.distributed", "distmlip.runtime") in edges or any(
        a.startswith("distmlip.calculators") and b.startswith("distmlip.runtime") for a, b in edges)
    assert circles([("a", "b", 1, False), ("b", "c", 1, False), ("c", "a", 1, False)]) == [["a", "b", "c"]]
