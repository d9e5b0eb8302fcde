"""Where interpkit keeps per-user data that outlives a run: converted models, dataset scans."""
from __future__ import annotations

import os
from pathlib import Path


def user_cache(*parts: str) -> Path:
    """``~/.cache/interpkit/<parts>`` (``INTERPKIT_CACHE`` moves the root)."""
    root = Path(os.environ.get("INTERPKIT_CACHE", Path.home() / ".cache" / "interpkit"))
    return root.joinpath(*parts)
