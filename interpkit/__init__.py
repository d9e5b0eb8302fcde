"""interpkit: mechanistic interpretability on nnsight, locally or on NDIF with the same code.

Kept import-free on purpose: modules such as ``interpkit.sites`` are shipped to NDIF and run inside its
import whitelist, so importing the package must not pull in ``os``/``pathlib`` users like the loader.
"""
__version__ = "0.1.0"
__all__ = ["LoadedModel", "UserError", "cache", "load_model"]


def __getattr__(name: str):
    if name in ("LoadedModel", "load_model"):
        from interpkit import models
        return getattr(models, name)
    if name == "cache":                            # the activation cache (analyses/tools/cache.py)
        from analyses.tools.cache import cache
        return cache
    if name == "UserError":
        from interpkit.errors import UserError
        return UserError
    raise AttributeError(f"module 'interpkit' has no attribute {name!r}")
