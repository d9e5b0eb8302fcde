"""interpkit: mechanistic interpretability on nnsight, locally or on NDIF with the same code.

Kept import-free on purpose: modules such as ``interpkit.sites`` are shipped to NDIF and run inside its
import whitelist, so importing the package must not pull in ``os``/``pathlib`` users like the loader.
"""
__version__ = "0.1.0"

# The repository keeps tasks/, analyses/ and cli.py at its top level, but they install as
# interpkit.tasks, interpkit.analyses and interpkit.cli (pyproject.toml maps them into the wheel), so
# nothing claims those generic top-level names. In a source checkout (editable installs, running from the
# repository) the folder above this package holds them: search it for subpackages too. String operations
# only, to stay import-free.
__path__.append(__path__[0][:max(__path__[0].rfind("/"), __path__[0].rfind("\\"))])
__all__ = ["LoadedModel", "UserError", "cache", "load_model"]


def __getattr__(name: str):
    if name in ("LoadedModel", "load_model"):
        from interpkit import models
        return getattr(models, name)
    if name == "cache":                            # the activation cache (analyses/tools/cache.py)
        from interpkit.analyses.tools.cache import cache
        return cache
    if name == "UserError":
        from interpkit.errors import UserError
        return UserError
    raise AttributeError(f"module 'interpkit' has no attribute {name!r}")
