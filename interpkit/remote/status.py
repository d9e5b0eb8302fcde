"""Which models NDIF runs now: the pre-check before a remote run, and a record of the ids seen running.

``GET /status`` lists NDIF's deployments (what ``nnsight.is_model_running`` reads; that function also asks
the hub to canonicalise the id, so it is not used here: it fails offline and with the loopback server).
Every successful look-up is remembered in ``$INTERPKIT_CACHE/ndif_seen.json`` (default
``~/.cache/interpkit``) so ``interpkit models`` can say which ids were seen running, and when.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from interpkit.errors import UserError


def seen_path() -> Path:
    return Path(os.environ.get("INTERPKIT_CACHE", "~/.cache/interpkit")).expanduser() / "ndif_seen.json"


def running_deployments(host: str | None = None, timeout: float = 10.0) -> list[dict] | None:
    """The RUNNING deployments of the NDIF host (``repo_id``, ``revision``, ...), or None when its
    ``/status`` cannot be read (offline, or a server without it)."""
    import httpx

    from interpkit.remote.config import get_json, host_url

    host = host_url(host)
    try:
        deployments = get_json(f"{host}/status", timeout, read=30.0).get("deployments", {})
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
    if not isinstance(deployments, dict):
        return None
    running = [d for d in deployments.values() if isinstance(d, dict) and d.get("application_state") == "RUNNING"]
    record_seen(running, host)
    return running


def matches(name: str, deployment: dict, revision: str | None = None) -> bool:
    """Whether ``deployment`` serves ``name`` (``gpt2`` also matches ``openai-community/gpt2``)."""
    repo = str(deployment.get("repo_id") or "")
    same = repo == name or ("/" not in name and repo.split("/")[-1] == name)
    return same and (revision is None or (deployment.get("revision") or "main") == revision)


def check_model_running(name: str, revision: str | None = None, host: str | None = None) -> None:
    """One-line ``UserError`` when NDIF answers ``/status`` and ``name`` is not among its running models."""
    from interpkit.remote.config import host_url

    running = running_deployments(host)
    if running is None:
        return                                     # status unknown: the request itself will tell
    if any(matches(name, d, revision) for d in running):
        return
    names = sorted({str(d.get("repo_id")) for d in running})
    shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    raise UserError(f"{name} is not running on NDIF ({host_url(host)}) now"
                    f"{'; running: ' + shown if names else '; no model is running there'}; pick a running model "
                    f"(interpkit models) or run locally without --remote")


def record_seen(running: list[dict], host: str) -> None:
    """Remember when each running id was last seen (best effort: an unwritable cache is skipped)."""
    seen = seen_running()
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for d in running:
        if d.get("repo_id"):
            seen[str(d["repo_id"])] = {"host": host, "last_seen": now}
    path = seen_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(seen, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass


def seen_running() -> dict[str, dict]:
    """``{repo_id: {"host": ..., "last_seen": UTC time}}`` of every id seen running so far."""
    try:
        data = json.loads(seen_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def last_seen(name: str) -> dict | None:
    """The record of ``name`` (or of ``<org>/name``) in ``seen_running()``, or None."""
    seen = seen_running()
    for repo, info in seen.items():
        if matches(name, {"repo_id": repo}) and isinstance(info, dict):
            return info
    return None
