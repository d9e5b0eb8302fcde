"""The project's module structure: no import cycles, no private names imported across modules.

Both checks read the source with ``ast`` (nothing is imported), function-local imports included: a lazy
import still ties two modules together, and it is where a cycle usually hides.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("interpkit", "analyses", "tasks")          # with cli.py: the import graph's nodes
SCANNED = (*PACKAGES, "tests", "bench")                # where a private import across modules is refused


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources(tops: tuple[str, ...]) -> dict[str, Path]:
    files = [p for top in tops for p in sorted((ROOT / top).rglob("*.py"))]
    if "interpkit" in tops:
        files.append(ROOT / "cli.py")
    return {_module_name(p): p for p in files}


def _imports(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(module imported from, names imported from it, line) for every import in the file, nested ones too;
    relative imports are resolved against ``name``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.append((base, [a.name for a in node.names], node.lineno))
    return found


def _graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (``from pkg import sub`` counts as an import of pkg.sub)."""
    modules = _sources(PACKAGES)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for base, names, _ in _imports(name, path):
            targets = [f"{base}.{n}" for n in names if f"{base}.{n}" in modules]
            if len(targets) < len(names) or not names:      # a name defined in ``base`` itself
                targets.append(base)
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles (each a set of modules that import each other, lazily or not): " + \
        "; ".join(" <-> ".join(c) for c in cycles)


def test_no_private_names_imported_across_modules():
    """``from x import _name`` between the project's own modules (tests and benches included): a name
    other modules need is public."""
    modules = _sources(SCANNED)
    bad = []
    for name, path in modules.items():
        for base, names, line in _imports(name, path):
            if base in modules and base != name:
                bad += [f"{path.relative_to(ROOT)}:{line} imports {n} from {base}"
                        for n in names if n.startswith("_") and not n.startswith("__")]
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


def test_the_cycle_check_itself():
    """A two-module cycle is one component, a chain is none, and function-local imports are edges."""
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    graph = _graph()
    assert "interpkit.validate" in graph["cli"]                 # a function-local `from interpkit import validate`
