"""One exception type for bad input, and the mapping of every other failure to one line.

The CLI prints a ``UserError`` as a single line and exits with code 2. Failures raised by libraries
(the hub, NDIF, the file system) are mapped here by ``explain`` to a ``UserError`` naming the problem and
the fix; anything else is a bug, printed as one line with exit code 1 (``--debug`` shows the traceback).
Trace code raises ``UserError`` on NDIF too, so this module imports nothing at the top (NDIF's whitelist).
"""


class UserError(Exception):
    """A problem with what the user asked for; the message names the problem and the fix."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first non-empty line of ``exc``'s message, shortened to ``limit`` characters."""
    for line in str(exc).splitlines():
        if line.strip():
            line = line.strip()
            return line if len(line) <= limit else line[: limit - 3] + "..."
    return type(exc).__name__


def explain(exc: BaseException) -> UserError | None:
    """A one-line ``UserError`` for a known failure of a library or the system, or None (a bug)."""
    for mapper in (_remote_error, _hub_error, _network_error, _os_error):
        mapped = mapper(exc)
        if mapped is not None:
            return mapped
    return None


def _remote_error(exc: BaseException) -> UserError | None:
    try:
        from nnsight.intervention.backends.remote import RemoteError
    except ImportError:                                  # pragma: no cover - nnsight is a dependency
        return None
    if not isinstance(exc, RemoteError):
        return None
    text = first_line(exc)
    low = text.lower()
    if "api key" in low or "401" in low or "unauthorized" in low:
        return UserError("NDIF refused the API key (missing or invalid); set a valid NDIF_API_KEY "
                         "(get one at https://login.ndif.us) and check NDIF_HOST")
    if "not deployed" in low or "not running" in low:
        return UserError(f"NDIF does not serve this model now ({text}); pick a running model "
                         f"(interpkit models) or run locally without --remote")
    if "not whitelisted" in low:
        return UserError(f"NDIF refused the trace code: {text}; inside traces use only whitelisted "
                         f"imports (see README, Remote runs)")
    return UserError(f"the NDIF request failed: {text}; check NDIF_HOST, your key and "
                     f"`interpkit doctor`, or run locally without --remote")


def _hub_error(exc: BaseException) -> UserError | None:
    try:
        from huggingface_hub.errors import HFValidationError
    except ImportError:                                  # pragma: no cover
        return None
    if isinstance(exc, HFValidationError):
        return UserError(f"not a model directory or hub id ({first_line(exc, 160)}); pass an existing "
                         f"local directory, a hub id such as gpt2, or tiny:<family>")
    return None


_NETWORK_MODULES = ("httpx", "httpcore", "websocket", "websockets", "socketio", "engineio", "requests", "urllib3")


def _network_error(exc: BaseException) -> UserError | None:
    import errno

    module = type(exc).__module__.split(".")[0]
    unreachable = isinstance(exc, OSError) and exc.errno in (errno.ECONNREFUSED, errno.ECONNRESET, errno.ETIMEDOUT,
                                                              errno.ENETUNREACH, errno.EHOSTUNREACH)
    if module in _NETWORK_MODULES or unreachable or isinstance(exc, (ConnectionError, TimeoutError)):
        return UserError(f"a network request failed ({type(exc).__name__}: {first_line(exc, 160)}); check your "
                         f"network and NDIF_HOST (interpkit doctor), or run locally without --remote")
    return None


def _os_error(exc: BaseException) -> UserError | None:
    import errno                                       # not at the top: this module ships to NDIF

    if not isinstance(exc, OSError) or exc.errno is None:
        return None
    where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return UserError(f"cannot write{where}: permission denied; pass a writable folder")
    if exc.errno == errno.ENOSPC:
        return UserError(f"no space left on the device{where and ' for' + where}; free space or pass another folder")
    if exc.errno == errno.ENOENT:
        return UserError(f"no such file or folder{where}; check the path")
    return None
