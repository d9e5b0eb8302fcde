"""NDIF's import whitelist, as data, and the checks built on it.

Code that runs inside a remote trace (the traced block itself and every function shipped by value
with it) may only import the modules listed here. The loopback server (``interpkit.remote.loopback``)
enforces these rules; ``disallowed_imports`` lets a test lint a helper module before it ever reaches
the service.

Where it comes from: the ndif-team/ndif repository, ``src/ndif/services/ray/nn/security/
whitelist.yaml`` (``modules`` and ``deserialization_modules``), with the matching rules of
``whitelist.py`` (``WhitelistedModule.check``: strict = exact name, otherwise the module and its
submodules minus ``blocked_submodules``) and ``importer.py`` / ``protector.py`` (a non-whitelisted
import yields a placeholder that raises ``ImportError("Module <name> is not whitelisted")`` on first
use; cloudpickle's ``subimport`` / ``dynamic_subimport`` and the unpickler's ``find_class`` are
checked against the deserialization list). The older layout of the same policy is
``src/services/ray/src/ray/nn/security/protected_environment.py``. Read in 2026; re-check against
the live service (``nnsight.compare()`` / a smoke run) when NDIF upgrades.

Not mirrored: one development branch of ndif let the whole standard library through the import layer
("OPEN SANDBOX"); the main policy above does not, so ``abc``, ``itertools``, ``os``, ``logging``,
``random``, ``copy``, ``pathlib`` ... are refused here, as NDIF refuses them.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass

NOT_WHITELISTED = "Module {name} is not whitelisted"


@dataclass(frozen=True)
class ModuleRule:
    """One whitelist entry: ``strict`` allows exactly ``name``; otherwise ``name`` and its submodules,
    except those under ``blocked``. A non-empty ``attributes`` restricts what user code may read from
    the imported module (NDIF exposes only ``nnsight.save``)."""

    name: str
    strict: bool = False
    blocked: tuple[str, ...] = ()
    attributes: tuple[str, ...] = ()

    def allows(self, module: str) -> bool:
        if any(module == b or module.startswith(b + ".") for b in self.blocked):
            return False
        if self.strict:
            return module == self.name
        return module == self.name or module.startswith(self.name + ".")


def _loose(*names: str) -> tuple[ModuleRule, ...]:
    return tuple(ModuleRule(n) for n in names)


# whitelist.yaml ``modules``: what user code may import while it runs.
EXECUTION_RULES: tuple[ModuleRule, ...] = (
    ModuleRule("PIL"),
    ModuleRule("re"),
    ModuleRule("dataclasses"),
    ModuleRule("builtins", strict=True),
    ModuleRule("torch", blocked=("torch.multiprocessing", "torch.utils.cpp_extension", "torch.package",
                                 "torch.hub", "torch.utils.model_zoo")),
    ModuleRule("collections"),
    ModuleRule("nnsight", strict=True, attributes=("save",)),
    ModuleRule("nnsight.intervention.envoy"),
    ModuleRule("nnsight.intervention.tracing.globals"),
    ModuleRule("time"),
    ModuleRule("numpy", blocked=("numpy.ctypeslib", "numpy.distutils")),
    *_loose("sympy", "nnterp", "math", "einops", "urllib3", "typing"),
    ModuleRule("_operator", strict=True),
    ModuleRule("operator", strict=True),
    *_loose("pandas", "enum", "__future__", "diffusers", "transformers", "tqdm", "heapq", "json",
            "warnings", "functools", "_functools", "jinja2", "encodings", "peft", "pydantic", "argparse",
            "datasets", "tokenizers", "huggingface_hub", "httpcore", "fsspec", "scipy", "regex",
            "concurrent", "io", "_frozen_importlib_external", "_frozen_importlib"),
)

# whitelist.yaml ``deserialization_modules``: additionally allowed while the request is unpickled
# (pickle machinery and nnsight/transformers internals), but not to the user code that then runs.
DESERIALIZATION_RULES: tuple[ModuleRule, ...] = (
    *_loose("pickle", "cloudpickle", "copyreg", "nnsight", "transformers", "transformers_modules"),
    *EXECUTION_RULES,
)

# Every ``blocked`` entry applies whichever rule matched (ndif's ``is_module_blocked``).
BLOCKED: frozenset[str] = frozenset(b for rule in DESERIALIZATION_RULES for b in rule.blocked)


def rule_for(module: str, *, deserializing: bool = False) -> ModuleRule | None:
    """The entry allowing ``module`` (None if none does, or it is a blocked submodule)."""
    if any(module == b or module.startswith(b + ".") for b in BLOCKED):
        return None
    rules = DESERIALIZATION_RULES if deserializing else EXECUTION_RULES
    return next((rule for rule in rules if rule.allows(module)), None)


def is_allowed(module: str, *, deserializing: bool = False) -> bool:
    """Whether NDIF lets ``module`` be imported by user code (or, with ``deserializing``, by the
    unpickler rebuilding a request)."""
    return rule_for(module, deserializing=deserializing) is not None


def disallowed_imports(source: str, package: str | None = None) -> list[str]:
    """Modules imported anywhere in ``source`` that NDIF's execution whitelist refuses, in order.

    A lint for helper modules that run inside traces. Relative imports (``from . import x``) are
    skipped: a package's own modules ship by value with it. ``package`` names the module's own top
    package (e.g. ``"interpkit"``) so absolute imports of it are skipped too. Conservative: a module
    shipped by value only carries what its functions reference, so an import that no trace-run
    function uses is harmless on NDIF, but flagged here.
    """
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            if package and (name == package or name.startswith(package + ".")):
                continue
            if not is_allowed(name) and name not in found:
                found.append(name)
    return found
