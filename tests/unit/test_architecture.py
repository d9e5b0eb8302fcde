"""The project's module structure: no import cycles, no private names imported across modules, no test
module importing another.

The checks read the source with ``ast`` (nothing is imported), function-local imports included: a lazy
import still ties two modules together, and it is where a cycle usually hides.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("interpkit", "analyses", "tasks")          # with cli.py: the import graph's nodes
SCANNED = (*PACKAGES, "tests", "bench")                # where a private import across modules is refused


def _module_name(path: Path) -> str:
    """The import name: tasks/, analyses/ and cli.py install inside the interpkit package."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] in ("tasks", "analyses", "cli"):
        parts.insert(0, "interpkit")
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
    assert "interpkit.validate" in graph["interpkit.cli"]       # a function-local `from interpkit import validate`
    assert "interpkit.analyses.patching.sweep" in graph["interpkit.analyses.patching.command"]


def test_code_imports_the_namespaced_names_only():
    """tasks/, analyses/ and cli.py install as interpkit.tasks, interpkit.analyses and interpkit.cli: an
    import of the bare top-level name works in a checkout but breaks an installed wheel."""
    bad = []
    for name, path in _sources(SCANNED).items():
        for base, _, line in _imports(name, path):
            if base.split(".")[0] in ("tasks", "analyses", "cli"):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {base}")
    assert not bad, "bare top-level imports (use interpkit.<name>):\n" + "\n".join(bad)


def _is_test_module(module: str) -> bool:
    """``tests.test_x`` or, in a tier folder, ``tests.<tier>.test_x``."""
    parts = module.split(".")
    return parts[0] == "tests" and len(parts) in (2, 3) and parts[-1].startswith("test_")


def _test_module_imports(name: str, path: Path) -> list[tuple[str, int]]:
    """(test module imported, line) for every import of a test module in the file, nested ones too:
    ``import tests.test_x``, ``from tests.test_x import ...``, ``from tests import test_x``, the same in a
    tier folder (``tests.unit.test_x``, ``from tests.unit import test_x``) and the relative spellings."""
    found = []
    for base, names, line in _imports(name, path):
        targets = [base, *(f"{base}.{n}" for n in names)]
        found += [(t, line) for t in targets if _is_test_module(t) and t != name]
    return found


def test_test_modules_do_not_import_each_other():
    """A helper two test modules share lives in tests/conftest.py (``from tests.conftest import ...``): one
    test file importing another ties it to that file's internals and module-level code (and a test function
    imported by name would be collected twice). Every tier folder (unit/, integration/, ...) is scanned."""
    bad = []
    paths = sorted((ROOT / "tests").rglob("test_*.py"))
    assert ROOT / "tests" / "unit" / "test_architecture.py" in paths     # the tier folders are scanned
    for path in paths:
        name = _module_name(path)
        bad += [f"{path.relative_to(ROOT)}:{line} imports {target}"
                for target, line in _test_module_imports(name, path)]
    assert not bad, "test modules importing other test modules (move the helper to tests/conftest.py):\n" + \
        "\n".join(bad)


def test_the_test_module_import_check_itself(tmp_path):
    """Every spelling of an import of a test module is found, nested ones too; conftest and non-test
    helpers are not."""
    src = tmp_path / "test_a.py"
    src.write_text("import tests.test_b\nfrom tests.test_c import x\nfrom tests import test_d, conftest\n"
                   "from .test_e import y\nfrom . import test_f\nfrom tests.conftest import tiny\n"
                   "from tests.references.causal_tracing_ref import z\nimport tests.test_a\n"
                   "def f():\n    from tests.test_g import w\n")
    found = _test_module_imports("tests.test_a", src)
    assert sorted(found) == [("tests.test_b", 1), ("tests.test_c", 2), ("tests.test_d", 3), ("tests.test_e", 4),
                             ("tests.test_f", 5), ("tests.test_g", 10)]
    tiered = tmp_path / "test_h.py"
    tiered.write_text("from tests.integration.test_b import x\nfrom tests.unit import test_c, conftest\n"
                      "from .test_d import y\nfrom tests.references.acc_selection import z\n")
    found = _test_module_imports("tests.unit.test_h", tiered)
    assert sorted(found) == [("tests.integration.test_b", 1), ("tests.unit.test_c", 2), ("tests.unit.test_d", 3)]
