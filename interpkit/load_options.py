"""``--dtype`` / ``--device`` for every command that loads a model, without threading two parameters through
every analysis: the CLI sets them for the duration of one command (``load_options``) and ``load_model``
uses them whenever its own ``dtype`` / ``device`` arguments are None."""
from __future__ import annotations

import contextvars
from contextlib import contextmanager

from interpkit.errors import UserError

DTYPES = ("float32", "bfloat16", "float16")      # torch is imported on use: the CLI imports this module
_OPTIONS: contextvars.ContextVar = contextvars.ContextVar("interpkit_load_options", default=(None, None))


def parse_dtype(name):
    """``--dtype`` text -> torch dtype (None or "auto": the model's own)."""
    import torch

    if name is None or name == "auto" or isinstance(name, torch.dtype):
        return None if name in (None, "auto") else name
    if name not in DTYPES:
        raise UserError(f"unknown --dtype {name!r}; use one of {', '.join(DTYPES)}")
    return getattr(torch, name)


@contextmanager
def load_options(dtype: str | None = None, device: str | None = None):
    """Models loaded inside use ``dtype`` / ``device`` unless ``load_model`` is given its own."""
    token = _OPTIONS.set((parse_dtype(dtype), device or None))
    try:
        yield
    finally:
        _OPTIONS.reset(token)


def current(dtype=None, device: str | None = None) -> tuple:
    """The explicit arguments, else the command's options."""
    d, dev = _OPTIONS.get()
    return dtype or d, device or dev


def apply(hf, dtype, device: str | None) -> None:
    """Cast / move a loaded model's weights (weightless remote models are left alone)."""
    import torch

    try:
        p = next(hf.parameters())
    except StopIteration:
        return
    if p.device.type == "meta":
        return
    if dtype is not None and p.dtype != dtype:
        hf.to(dtype)
    if device is not None and str(p.device) != str(torch.device(device)):
        try:
            hf.to(device)
        except (RuntimeError, AssertionError) as e:
            raise UserError(f"cannot use --device {device!r}: {str(e).splitlines()[0]}; try cpu") from None


def with_load_options(fn):
    """Decorator for a Typer command: adds ``--dtype`` and ``--device`` and applies them (``load_options``)
    to every model the command loads."""
    import functools
    import inspect

    import typer

    @functools.wraps(fn)
    def command(*args, dtype: str | None = None, device: str | None = None, **kwargs):
        with load_options(dtype, device):
            return fn(*args, **kwargs)

    sig = inspect.signature(fn)
    extra = [inspect.Parameter("dtype", inspect.Parameter.KEYWORD_ONLY, annotation=str,
                               default=typer.Option(None, help="float32 | bfloat16 | float16 (default: the model's own).")),
             inspect.Parameter("device", inspect.Parameter.KEYWORD_ONLY, annotation=str,
                               default=typer.Option(None, help="cpu, cuda, cuda:1, ... (default: where it loads)."))]
    command.__signature__ = sig.replace(parameters=[*sig.parameters.values(), *extra])
    command.__annotations__ = {**getattr(fn, "__annotations__", {}), "dtype": str, "device": str}
    return command
