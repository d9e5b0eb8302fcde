"""NDIF configuration: API key, host, by-value shipping of our packages, client/server version check.

Everything here goes through nnsight's own ``CONFIG`` (``nnsight.schema.config``), so a setting made
here is the one ``model.trace(..., remote=True)`` uses. The API key is never returned or printed.
"""
from __future__ import annotations

import os
import sys

from interpkit.errors import UserError

# Our top-level packages. They are pip-installed (editable or not) here, so nnsight's ``pull_env``
# counts them as installed, NOT local, and does not ship them; NDIF does not have them. See
# ``ensure_shipped``.
SHIPPED_PACKAGES: tuple[str, ...] = ("interpkit", "analyses", "tasks")

# Packages whose client/server versions must agree for a remote run: nnsight (the payload format
# changes between releases) and transformers (module outputs and ``.source`` names change).
CHECKED_PACKAGES: tuple[str, ...] = ("nnsight", "transformers")


def _config():
    from nnsight import CONFIG

    return CONFIG


def api_key_present() -> bool:
    """Whether an NDIF API key is configured (env ``NDIF_API_KEY`` or nnsight's config). The key
    itself is never returned."""
    return bool(os.environ.get("NDIF_API_KEY") or _config().API.APIKEY)


def ndif_host() -> str:
    """The NDIF host remote runs go to (``CONFIG.API.HOST``; env ``NDIF_HOST`` overrides the default)."""
    return str(_config().API.HOST)


def host_url(host: str | None = None) -> str:
    """``host`` (default: the configured NDIF host) without a trailing slash."""
    return (host or ndif_host()).rstrip("/")


def get_json(url: str, timeout: float = 10.0, read: float = 60.0):
    """The JSON body of ``GET url`` (connect timeout ``timeout``, read timeout at least ``read`` seconds);
    raises ``httpx.HTTPError`` (no answer, an error status) or ``ValueError`` (not JSON)."""
    import httpx

    response = httpx.get(url, timeout=httpx.Timeout(timeout, read=max(timeout, read)))
    response.raise_for_status()
    return response.json()


def configure(api_key: str | None = None, host: str | None = None, *, persist: bool = False) -> None:
    """Apply an API key and/or host to nnsight's ``CONFIG`` for this process.

    ``persist=True`` also writes them to nnsight's user config file (as ``nnsight login`` does).
    """
    config = _config()
    if host is not None:
        if not host.startswith(("http://", "https://")):
            raise UserError(f"NDIF host must start with http:// or https:// (got {host!r})")
        config.API.HOST = host.rstrip("/")
    if api_key is not None:
        if not api_key.strip():
            raise UserError("the NDIF API key is empty; get one at https://login.ndif.us")
        config.API.APIKEY = api_key.strip()
    if persist and (api_key is not None or host is not None):
        config.save()


def ensure_shipped(*extra: str) -> tuple[str, ...]:
    """Register ``interpkit``, ``analyses`` and ``tasks`` (plus ``extra`` module names) for
    serialize-by-value, so functions and classes of ours used inside a remote trace travel as source.

    Needed because nnsight's ``pull_env`` only auto-registers modules importable from outside
    site-packages; a pip install (editable installs included) makes ours look installed, and NDIF
    does not have them. Idempotent and cheap; call it before any remote run. Registration covers
    submodules. Returns the registered names.
    """
    from nnsight.ndif import register

    names = tuple(dict.fromkeys(SHIPPED_PACKAGES + extra))
    for name in names:
        register(name)
    return names


def local_versions(packages: tuple[str, ...] = CHECKED_PACKAGES + ("torch",), missing: str = "-") -> dict[str, str]:
    """Installed versions of ``packages`` (import names), as nnsight's ``get_local_env`` keys them;
    ``missing`` for a package that is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in packages:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = missing
    return out


def server_env(host: str | None = None, timeout: float = 10.0) -> dict:
    """The NDIF server's environment, ``{"python_version": ..., "packages": {import name: version}}``,
    from the ``GET /env`` endpoint that ``nnsight.compare()`` reads."""
    import httpx

    host = host_url(host)
    try:
        return get_json(f"{host}/env", timeout, read=60.0)
    except (httpx.HTTPError, ValueError) as e:
        raise UserError(f"cannot read the NDIF server's versions from {host}/env "
                        f"({type(e).__name__}: {e}); check the host and your network") from None


def version_mismatches(remote_env: dict, local_env: dict | None = None,
                       packages: tuple[str, ...] = CHECKED_PACKAGES) -> dict[str, tuple[str, str]]:
    """``{package: (local, server)}`` for each of ``packages`` whose versions differ (a package the
    server does not report is not compared). Uses nnsight's ``EnvComparison``."""
    from nnsight.ndif import EnvComparison

    if local_env is None:
        local_env = {"python_version": sys.version, "packages": local_versions(packages)}
    diff = EnvComparison(local_env, remote_env).mismatches
    return {pkg: (diff[pkg]["local"], diff[pkg]["remote"]) for pkg in packages if pkg in diff}


def check_versions(model_repo_id: str, *, remote_env: dict | None = None, local_env: dict | None = None,
                   host: str | None = None) -> dict[str, str]:
    """Raise ``UserError`` (one line: both versions and the pip command that fixes it) when the NDIF
    server's nnsight or transformers differs from this machine's; return the server's versions of the
    checked packages otherwise.

    ``remote_env`` (the ``/env`` JSON) may be passed in; otherwise it is fetched from ``host`` (default
    the configured NDIF host), so a loopback server reporting other versions exercises the same path.
    """
    if remote_env is None:
        remote_env = server_env(host)
    bad = version_mismatches(remote_env, local_env)
    if bad:
        where = host_url(host)
        parts = ", ".join(f"{pkg} {srv} but this machine has {loc}" for pkg, (loc, srv) in bad.items())
        pins = " ".join(f"{pkg}=={srv}" for pkg, (_, srv) in bad.items())
        raise UserError(f"version mismatch for remote runs of {model_repo_id}: NDIF ({where}) runs {parts}; "
                        f"fix: pip install {pins}")
    packages = remote_env.get("packages", {})
    return {pkg: packages[pkg] for pkg in CHECKED_PACKAGES if pkg in packages}
