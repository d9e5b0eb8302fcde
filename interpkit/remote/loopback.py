"""A loopback NDIF: an in-process server that speaks nnsight 0.8.1's remote protocol to a local model.

Production code runs unchanged against it::

    from interpkit.remote.loopback import LoopbackNDIF

    with LoopbackNDIF(model) as server:          # points nnsight's CONFIG.API.HOST at 127.0.0.1:<port>
        with model.trace(prompt, remote=True):
            out = model.lm_head.output.save()
    assert server.n_requests == 1

What the client (``nnsight.intervention.backends.remote.RemoteBackend``) does, and what answers it here:

* ``GET /subscribe`` (websocket): the first message is ``{"session_id": ...}``; status updates for the
  requests posted with that session id follow as JSON text frames. COMPLETED arrives as a binary frame
  (``ResponseModel.pickle()`` with the result blob inline) or, above ``inline_limit`` bytes, as JSON
  whose ``data`` is a ``/result/<id>`` URL the client downloads.
* ``POST /request``: multipart form, field ``data`` = ``RequestModel`` JSON (model key, session id,
  compress flag, per-request env), file ``blob`` = the serialized trace. Headers ``ndif-api-key``,
  ``nnsight-version``, ``python-version``. Answers with the RECEIVED ``ResponseModel``.
* ``GET /response/<id>`` (non-blocking ``remote=True, blocking=False`` polling), ``GET /result/<id>``,
  ``GET /env`` (versions, read by ``nnsight.compare()`` and ``interpkit.remote.check_versions``),
  ``GET /status``, ``GET /ping``, ``GET /whoami``.

Server side it does what the NDIF model actor does (ndif-team/ndif, ``deployments/modeling/base.py`` and
``nns.py``): statuses QUEUED/RUNNING/COMPLETED|ERROR; ``RequestModel.deserialize`` with the model's
``_remoteable_persistent_objects()`` and an unpickler that refuses modules outside NDIF's
deserialization whitelist; user code runs under an import guard enforcing NDIF's execution whitelist
(``interpkit.remote.whitelist``): a refused import yields a placeholder that raises
``ImportError: Module abc is not whitelisted`` on first use, as NDIF's does; ``print`` output becomes
LOG statuses; parameters are frozen (``requires_grad_(False)``) while a request runs, as NDIF freezes
its models, so gradients need an activation made to require grad; the values marked with
``.save()`` are returned as a ``torch.save`` blob (zstd-compressed when the request was).

``interpkit``, ``analyses`` and ``tasks`` are not installed on NDIF, so the server refuses them like any
module that is not whitelisted: a trace that uses them without ``interpkit.remote.ensure_shipped()``
fails here as it would there. Hiding is done at the unpickler and import guard, not by removing them
from ``sys.modules``: the served model's own code may live in them and must keep working. As on NDIF
(whose ``dynamic_subimport`` check refuses any module name outside the whitelist), a *module object*
shipped by value is refused too: trace code must reference our functions and classes, not modules.

The server runs in threads of this process (an HTTP server with one handler thread per connection, one
executor thread running jobs in turn, a watchdog), so it can serve the very model object the client
traces without copying weights; the client blocks while a job runs, so the two never touch the model
at once. Start it from one client thread at a time.
Process-wide state the job mutates (``linecache``, nnsight's parse caches, ``sys.stdout``, the
model's ``requires_grad`` flags and attention implementation) is restored after each job, and the
import guard is a thread-local switch, active only in the job's thread. A job that runs past
``timeout`` seconds is answered with ERROR and interrupted (an asynchronous ``SystemExit``, as NDIF's
``kill_thread``), so a client never waits forever.

Not mirrored: NDIF's dunder-attribute guard, its restricted builtins/compile, its audit hook, and its
protection of model attributes; imports made with ``importlib`` rather than the ``import`` statement
are not checked.
"""
from __future__ import annotations

import builtins
import contextlib
import ctypes
import hashlib
import io
import json
import linecache
import logging
import queue
import select
import sys
import threading
import time
import traceback
import types
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from interpkit.remote import whitelist as W
from interpkit.remote.config import SHIPPED_PACKAGES, local_versions

_log = logging.getLogger("interpkit.remote.loopback")

# The websockets protocol logs every handshake header (the API key among them) at DEBUG level; give it
# a logger that is never enabled, whatever the logging configuration.
_SILENT = logging.Logger("interpkit.remote.loopback.websocket", level=logging.CRITICAL + 1)
_SILENT.propagate = False

_DESCRIPTIONS = {
    "RECEIVED": "Your job has been received and is waiting to be queued.",
    "QUEUED": "Your job has been queued.",
    "RUNNING": "Your job has started running.",
    "COMPLETED": "Your job has been completed.",
}


@contextlib.contextmanager
def frozen(module, on: bool = True):
    """``module``'s parameters with ``requires_grad`` off inside (restored after), as NDIF serves them: the flag
    alone changes some CPU kernels' float rounding, so a local run compared bit for bit with a remote one
    runs frozen too. ``on=False``: nothing changes."""
    params = list(module.parameters()) if on else []
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# -- the import guard ---------------------------------------------------------------------------------
class _UnauthorizedModule:
    """Stands in for a refused import; any use raises NDIF's ImportError (ndif ``importer.py``: the
    error is deferred so speculative ``try: import x`` code behaves as it does there)."""

    def __init__(self, name: str) -> None:
        object.__setattr__(self, "_module_name", name)

    def _fail(self, *args: Any, **kwargs: Any) -> Any:
        raise ImportError(W.NOT_WHITELISTED.format(name=object.__getattribute__(self, "_module_name")))

    def __getattribute__(self, name: str) -> Any:
        object.__getattribute__(self, "_fail")()

    __setattr__ = __delattr__ = __call__ = __iter__ = __next__ = __len__ = _fail
    __getitem__ = __setitem__ = __delitem__ = __contains__ = __bool__ = _fail

    def __repr__(self) -> str:
        return f"<UnauthorizedModule {object.__getattribute__(self, '_module_name')!r}>"


class _ProtectedModule(types.ModuleType):
    """A whitelisted module as user code sees it: read-only, submodules wrapped in turn, no reaching
    other modules through it (``torch.os``), and only the listed attributes when the rule has some."""

    def __init__(self, rule: W.ModuleRule, real: types.ModuleType) -> None:
        object.__setattr__(self, "_rule", rule)
        object.__setattr__(self, "_real", real)
        super().__init__(real.__name__)

    def __getattr__(self, name: str) -> Any:
        rule = object.__getattribute__(self, "_rule")
        real = object.__getattribute__(self, "_real")
        if rule.attributes and name not in rule.attributes:
            raise AttributeError(f"Attribute '{name}' is not in the allowed list for module '{real.__name__}'")
        attr = getattr(real, name)
        if not isinstance(attr, types.ModuleType):
            return attr
        inside = attr.__name__ == real.__name__ if rule.strict else attr.__name__.startswith(real.__name__ + ".")
        if not inside or W.rule_for(attr.__name__) is None:
            raise AttributeError(f"Module attribute {attr.__name__} is not whitelisted")
        return _ProtectedModule(rule, attr)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"Cannot modify protected module: setting '{name}' is not allowed")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"Cannot modify protected module: deleting '{name}' is not allowed")


class _ImportGuard:
    """Replaces ``builtins.__import__`` while any loopback server runs. It only acts in a thread whose
    ``mode`` is "execute" (a job thread running user code), and only for imports made by user code:
    the shipped block and functions rebuilt from shipped source. Imports made by installed libraries
    (the frame's globals are a module in ``sys.modules``) pass, as the server's own code would."""

    def __init__(self) -> None:
        self.local = threading.local()
        self.lock = threading.Lock()
        self.users = 0
        self.original = builtins.__import__

    def install(self) -> None:
        with self.lock:
            if self.users == 0 and builtins.__import__ is not self:
                self.original = builtins.__import__
                builtins.__import__ = self
            self.users += 1

    def uninstall(self) -> None:
        # ``original`` is kept: a thread already inside ``__call__`` (or a later wrapper that captured
        # the guard) still reaches the real import, and the guard is inert outside job threads.
        with self.lock:
            self.users -= 1
            if self.users == 0 and builtins.__import__ is self:
                builtins.__import__ = self.original

    @property
    def mode(self) -> str | None:
        return getattr(self.local, "mode", None)

    @mode.setter
    def mode(self, value: str | None) -> None:
        self.local.mode = value

    @staticmethod
    def _trusted(frame_globals: Any) -> bool:
        name = frame_globals.get("__name__") if isinstance(frame_globals, dict) else None
        module = sys.modules.get(name) if isinstance(name, str) else None
        return module is not None and getattr(module, "__dict__", None) is frame_globals

    def __call__(self, name: str, globals: Any = None, locals: Any = None, fromlist: Any = (), level: int = 0):
        if self.mode != "execute" or self._trusted(sys._getframe(1).f_globals):
            return self.original(name, globals, locals, fromlist, level)
        self.mode = None                      # the real import may run library code: unguarded
        try:
            if level > 0:
                result = self.original(name, globals, locals, fromlist, level)
                name = result.__name__
            elif W.is_allowed(name):
                result = self.original(name, globals, locals, fromlist, level)
            else:
                return _UnauthorizedModule(name)
        finally:
            self.mode = "execute"
        rule = W.rule_for(name)
        return _UnauthorizedModule(name) if rule is None else _ProtectedModule(rule, result)


_GUARD = _ImportGuard()


# -- deserialization -----------------------------------------------------------------------------------
def _refusal(module: str, hidden: tuple[str, ...], by_value: bool = False) -> ImportError:
    message = W.NOT_WHITELISTED.format(name=module)
    root = module.split(".")[0]
    if root in hidden:
        if by_value:
            message += (f" ({root} is not installed on NDIF. This module object was shipped by value, which "
                        f"NDIF refuses: inside traces use its functions and classes (from {module} import f), "
                        f"not the module object)")
        else:
            message += (f" ({root} is not installed on NDIF: it must ship by value; call "
                        f"interpkit.remote.ensure_shipped() before remote runs)")
    return ImportError(message)


def _make_unpickler(hidden: tuple[str, ...]) -> type:
    """An unpickler that resolves persistent ids like nnsight's and refuses every module outside NDIF's
    deserialization whitelist (ndif ``protector.py``: ``find_class``, ``subimport``, ``dynamic_subimport``)."""
    import cloudpickle.cloudpickle as cp
    from nnsight.intervention.serialization import CustomCloudUnpickler

    def subimport(name: str):
        if name.split(".")[0] in hidden or not W.is_allowed(name, deserializing=True):
            raise _refusal(name, hidden)
        return cp.subimport(name)

    def dynamic_subimport(name: str, vars: dict):
        if name.split(".")[0] in hidden or not W.is_allowed(name, deserializing=True):
            raise _refusal(name, hidden, by_value=True)
        return cp.dynamic_subimport(name, vars)

    class WhitelistUnpickler(CustomCloudUnpickler):
        def find_class(self, module: str, name: str) -> Any:
            if module in ("cloudpickle", "cloudpickle.cloudpickle") and name == "subimport":
                return subimport
            if module in ("cloudpickle", "cloudpickle.cloudpickle") and name == "dynamic_subimport":
                return dynamic_subimport
            if module.split(".")[0] in hidden or not W.is_allowed(module, deserializing=True):
                raise _refusal(module, hidden)
            return super().find_class(module, name)

    return WhitelistUnpickler


class _RequestScope:
    """Confine a job's writes to process-wide caches to the job (ndif ``nns.block_scope``): the block's
    source is registered in ``linecache`` under the client's filename, and nnsight memoizes parses in
    ``SOURCES``/``BLOCKS``. The job starts with empty nnsight caches, as a fresh server would."""

    def __enter__(self) -> None:
        from nnsight.tracing.globals import BLOCKS, SOURCES

        self.saved = (dict(linecache.cache), dict(SOURCES), dict(BLOCKS))
        SOURCES.clear()
        BLOCKS.clear()

    def __exit__(self, *exc: Any) -> None:
        from nnsight.tracing.globals import BLOCKS, SOURCES

        for live, saved in zip((linecache.cache, SOURCES, BLOCKS), self.saved):
            live.clear()
            live.update(saved)


class _StdoutToLog:
    """``sys.stdout`` while a job runs: lines printed by the job's thread become LOG statuses; writes
    from any other thread (the waiting client's status display) go to the real stdout."""

    def __init__(self, emit, thread_id: int, real) -> None:
        self.emit, self.thread_id, self.real, self.buffer = emit, thread_id, real, ""

    def write(self, text: str) -> int:
        if threading.get_ident() != self.thread_id:
            return self.real.write(text)
        self.buffer += text
        while "\n" in self.buffer:
            line, self.buffer = self.buffer.split("\n", 1)
            self.emit(line)
        return len(text)

    def flush(self) -> None:
        if threading.get_ident() != self.thread_id:
            self.real.flush()

    def close_out(self) -> None:
        if self.buffer:
            self.emit(self.buffer)
            self.buffer = ""

    def __getattr__(self, name: str) -> Any:   # isatty, encoding, fileno ...: the real stream's
        return getattr(self.real, name)


def _describe(error: BaseException) -> str:
    """The ERROR description: the exception on the first line, then the user-code frames (the shipped
    block and shipped functions; library frames are dropped, as nnsight's clean_traceback does)."""
    head = "".join(traceback.format_exception_only(type(error), error)).strip()
    library = ("site-packages", "dist-packages", "/lib/python", __file__)
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if not any(part in f.filename for part in library) and not f.filename.startswith("<frozen")]
    if not frames:
        return head
    return head + "\nTraceback (user code, most recent call last):\n" + "".join(traceback.format_list(frames))


def _interrupt(thread: threading.Thread) -> None:
    """Raise SystemExit asynchronously in ``thread`` (what NDIF's ``kill_thread`` does)."""
    if thread.ident is not None:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(SystemExit))


# -- bookkeeping ----------------------------------------------------------------------------------------
@dataclass
class RequestRecord:
    """What the server saw of one POST /request. The API key is kept only as its SHA-256."""

    id: str
    model_key: str
    session_id: str
    compress: bool
    env: dict
    nnsight_version: str
    python_version: str
    api_key_sha256: str | None
    payload_bytes: int
    statuses: list[str] = field(default_factory=list)
    error: str | None = None
    saved: tuple[str, ...] = ()
    result_bytes: int | None = None
    seconds: float | None = None

    @property
    def status(self) -> str | None:
        """The latest status sent for this request (None before the first)."""
        return self.statuses[-1] if self.statuses else None

    @property
    def blocking(self) -> bool:
        """Posted by a blocking client (it subscribed over the websocket first)."""
        return bool(self.session_id)


class _Job:
    def __init__(self, record: RequestRecord, blob: bytes) -> None:
        self.record, self.blob = record, blob
        self.done = threading.Event()
        self.started = 0.0
        self.finished = False                 # COMPLETED or ERROR sent (first one wins)
        self.description: str | None = None   # the ERROR text, when written where the source is at hand


# -- HTTP + websocket ------------------------------------------------------------------------------------
class _Handler(BaseHTTPRequestHandler):
    server_version = "LoopbackNDIF/0.1"
    protocol_version = "HTTP/1.0"

    @property
    def owner(self) -> "LoopbackNDIF":
        return self.server.owner  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:  # never log headers (they carry the key)
        _log.debug("%s %s", self.command, urlsplit(self.path).path)

    def _send(self, code: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, code: int, obj: Any) -> None:
        self._send(code, obj.encode() if isinstance(obj, str) else json.dumps(obj).encode())

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def do_GET(self) -> None:
        path = urlsplit(self.path).path.rstrip("/")
        owner = self.owner
        if path == "/subscribe" and self.headers.get("Upgrade", "").lower() == "websocket":
            return self._websocket()
        if path == "/ping":
            return self._json(200, "pong")
        if path == "/env":
            return self._json(200, owner.env())
        if path == "/status":
            return self._json(200, owner.status())
        if path == "/whoami":
            return self._json(200, {"email": None, "tags": []})
        if path.startswith("/response/"):
            latest = owner._latest.get(path.split("/")[-1])
            return self._json(200, latest) if latest else self._json(404, {"detail": "no status yet"})
        if path.startswith("/result/"):
            data = owner._results.get(path.split("/")[-1])
            if data is None:
                return self._json(404, {"detail": "no such result"})
            return self._send(200, data, "application/octet-stream")
        self._json(404, {"detail": f"not found: {path}"})

    def do_POST(self) -> None:
        path = urlsplit(self.path).path.rstrip("/")
        if path != "/request":
            return self._json(404, {"detail": f"not found: {path}"})
        try:
            fields = _multipart(self.headers.get("Content-Type", ""), self._body())
            code, body = self.owner._submit(self.headers, fields)
        except Exception as e:  # a malformed request: say why, like FastAPI's {"detail": ...}
            code, body = 400, {"detail": f"bad request: {type(e).__name__}: {e}"}
        self._json(code, body)

    def _websocket(self) -> None:
        from websockets.frames import Opcode
        from websockets.server import ServerProtocol

        owner = self.owner
        protocol = ServerProtocol(max_size=None, logger=_SILENT)
        # http.server already read the handshake; replay it so the sans-I/O protocol's state machine
        # (CONNECTING -> OPEN) runs as if it had read it itself.
        raw = f"GET {self.path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in self.headers.items())
        protocol.receive_data((raw + "\r\n").encode("latin-1"))
        request = next(e for e in protocol.events_received())
        response = protocol.accept(request)
        protocol.send_response(response)
        sock = self.connection
        sock.sendall(b"".join(protocol.data_to_send()))
        self.close_connection = True
        if response.status_code != 101:
            return
        session = uuid.uuid4().hex
        outbox: queue.Queue = queue.Queue()
        owner._sessions[session] = outbox
        protocol.send_text(json.dumps({"session_id": session}).encode())
        try:
            sock.sendall(b"".join(protocol.data_to_send()))
            while not owner._stopping.is_set():
                try:
                    kind, payload = outbox.get(timeout=0.05)
                    (protocol.send_binary if kind == "binary" else protocol.send_text)(payload)
                except queue.Empty:
                    pass
                if select.select([sock], [], [], 0)[0]:
                    data = sock.recv(1 << 16)
                    if data:
                        protocol.receive_data(data)
                    else:
                        protocol.receive_eof()
                    for frame in protocol.events_received():
                        if frame.opcode is Opcode.CLOSE:
                            _log.debug("websocket %s closed by client", session[:8])
                pending = protocol.data_to_send()
                if pending:
                    sock.sendall(b"".join(pending))
                if protocol.close_expected() or protocol.state.name == "CLOSED":
                    break
            else:
                protocol.send_close(1001, "server shutting down")
                sock.sendall(b"".join(protocol.data_to_send()))
        except OSError:
            pass
        finally:
            owner._sessions.pop(session, None)


def _multipart(content_type: str, body: bytes) -> dict[str, bytes]:
    """Fields of a multipart/form-data body (httpx's encoding: CRLF-delimited parts)."""
    params = dict(p.strip().split("=", 1) for p in content_type.split(";")[1:] if "=" in p)
    boundary = params.get("boundary", "").strip('"')
    if not content_type.startswith("multipart/form-data") or not boundary:
        raise ValueError(f"expected multipart/form-data, got {content_type!r}")
    fields = {}
    for part in body.split(b"--" + boundary.encode())[1:]:
        if part.startswith(b"--"):
            break
        head, _, value = part[2:].partition(b"\r\n\r\n")
        disposition = next((line for line in head.decode("latin-1").split("\r\n")
                            if line.lower().startswith("content-disposition")), "")
        name = next((p.split("=", 1)[1].strip('"') for p in disposition.split(";")[1:]
                     if p.strip().startswith("name=")), None)
        if name is not None:
            fields[name] = value[:-2] if value.endswith(b"\r\n") else value
    return fields


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request: Any, client_address: Any) -> None:  # quiet, no headers in logs
        _log.debug("connection error from %s: %s", client_address, sys.exc_info()[1])


# -- the server ---------------------------------------------------------------------------------------
class LoopbackNDIF:
    """An NDIF-compatible server on 127.0.0.1 (random free port) serving ``model`` in this process.

    As a context manager it starts the server, points nnsight's ``CONFIG.API.HOST`` at it, sets
    ``CONFIG.API.APIKEY`` to ``api_key`` (a test key: a real key never reaches the loopback), and lets
    the model's repo id be used offline (see ``start``); all of that is undone on exit.

    Args:
        model: the nnsight model (e.g. a ``TransformersModel``) every request runs against.
        api_key: the key put in nnsight's config while running (None leaves the config's key alone).
        require_key: refuse (HTTP 401) a request that does not carry ``api_key``.
        versions: package versions reported by ``GET /env`` on top of this machine's (e.g.
            ``{"nnsight": "0.7.0"}`` to exercise a version mismatch); mutable as ``server.versions``.
        timeout: seconds a job may run before it is answered with ERROR and interrupted.
        freeze: set ``requires_grad_(False)`` on the parameters while a job runs, as NDIF does.
        inline_limit: results up to this many bytes are sent inside the COMPLETED websocket message,
            larger ones through a ``/result/<id>`` download (both paths exist on NDIF).
        hidden: top-level packages the server does not have (refused even if whitelisted).
    """

    def __init__(self, model: Any, *, api_key: str | None = "loopback-key", require_key: bool = True,
                 versions: dict[str, str] | None = None, timeout: float = 60.0, freeze: bool = True,
                 inline_limit: int = 1 << 20, hidden: tuple[str, ...] = SHIPPED_PACKAGES) -> None:
        self.model = model
        self.api_key = api_key
        self.require_key = require_key and api_key is not None
        self.versions: dict[str, str] = dict(versions or {})
        self.timeout = timeout
        self.freeze = freeze
        self.inline_limit = inline_limit
        self.hidden = tuple(hidden)
        self.requests: list[RequestRecord] = []
        self.model_key: str | None = None
        self._key_sha = _sha256(api_key) if api_key is not None else None
        self._server: _Server | None = None
        self._threads: list[threading.Thread] = []
        self._jobs: queue.Queue = queue.Queue()
        self._sessions: dict[str, queue.Queue] = {}
        self._latest: dict[str, str] = {}
        self._results: dict[str, bytes] = {}
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._unpickler = _make_unpickler(self.hidden)
        self._restore: list = []
        self._current: _Job | None = None
        self._url: str | None = None
        self._worker: threading.Thread | None = None

    # -- lifecycle --
    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>`` (the last one, once stopped)."""
        if self._url is None:
            raise RuntimeError("LoopbackNDIF has not been started")
        return self._url

    def start(self) -> "LoopbackNDIF":
        """Start serving and configure nnsight to use this server.

        The client canonicalises the repo id through the Hugging Face hub (``HfApi().model_info``) to
        build the model key; for the served model's own id only, nnsight's ``_ID_CACHE`` is seeded with
        the id itself (removed again on stop), so ids such as ``tiny:gpt2`` work offline. Other ids
        still go through the hub as in production.
        """
        import nnsight.modeling.huggingface as hf
        from nnsight import CONFIG

        if self._server is not None:
            return self
        repo_id = getattr(self.model, "repo_id", None)
        if isinstance(repo_id, str) and repo_id not in hf._ID_CACHE:
            hf._ID_CACHE[repo_id] = repo_id
            self._restore.append(lambda: hf._ID_CACHE.pop(repo_id, None))
        self.model_key = self.model.to_model_key()

        self._stopping.clear()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.owner = self  # type: ignore[attr-defined]
        host, port = self._server.server_address[:2]
        self._url = f"http://{host}:{port}"
        _GUARD.install()
        self._restore.append(_GUARD.uninstall)
        host, key = CONFIG.API.HOST, CONFIG.API.APIKEY
        CONFIG.API.HOST = self.url
        self._restore.append(lambda: setattr(CONFIG.API, "HOST", host))
        if self.api_key is not None:
            CONFIG.API.APIKEY = self.api_key
            self._restore.append(lambda: setattr(CONFIG.API, "APIKEY", key))
        for target, name in ((self._server.serve_forever, "http"), (self._work, "executor"),
                             (self._watch, "watchdog")):
            thread = threading.Thread(target=target, name=f"loopback-ndif-{name}", daemon=True,
                                      kwargs={"poll_interval": 0.05} if name == "http" else {})
            thread.start()
            self._threads.append(thread)
        self._worker = self._threads[1]
        _log.debug("loopback NDIF serving %s at %s", self.model_key, self.url)
        return self

    def stop(self) -> None:
        """Stop serving (waits at most a few seconds) and undo the configuration ``start`` applied."""
        if self._server is None:
            return
        self._stopping.set()
        self._jobs.put(None)
        self._server.shutdown()
        self._server.server_close()
        for thread in self._threads:
            thread.join(timeout=5.0)
        self._threads.clear()
        self._server = None
        while self._restore:
            self._restore.pop()()

    def __enter__(self) -> "LoopbackNDIF":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- recorded requests --
    @property
    def n_requests(self) -> int:
        """How many requests (POST /request) the server has received."""
        return len(self.requests)

    def reset(self) -> None:
        """Forget the recorded requests (results already fetched are dropped too)."""
        self.requests.clear()
        self._latest.clear()
        self._results.clear()

    def saw_api_key(self, key: str) -> bool:
        """Whether any request carried ``key`` in its ``ndif-api-key`` header (compared by hash)."""
        return any(r.api_key_sha256 == _sha256(key) for r in self.requests)

    # -- endpoints --
    def env(self) -> dict:
        """What ``GET /env`` reports: this machine's versions, overridden by ``self.versions``."""
        packages = local_versions(("nnsight", "transformers", "torch", "numpy", "einops", "tokenizers"))
        packages.update(self.versions)
        return {"python_version": sys.version, "packages": packages}

    def status(self) -> dict:
        """What ``GET /status`` reports: the served model as one HOT, RUNNING deployment."""
        data = json.loads(self.model_key.split(":", 1)[1]) if self.model_key else {}
        return {"deployments": {self.model_key: {
            "model_key": self.model_key, "repo_id": data.get("repo_id"), "revision": data.get("revision"),
            "task": data.get("task"), "deployment_level": "HOT", "application_state": "RUNNING"}}}

    def _submit(self, headers: Any, fields: dict[str, bytes]) -> tuple[int, Any]:
        from nnsight.schema.request import RequestModel

        key = headers.get("ndif-api-key")
        if self.require_key and (key is None or _sha256(key) != self._key_sha):
            _log.info("request refused: %s API key", "wrong" if key else "missing")
            return 401, {"detail": "Missing or invalid NDIF API key (header ndif-api-key)."}
        meta = RequestModel.model_validate_json(fields["data"])
        blob = fields["blob"]
        record = RequestRecord(
            id=uuid.uuid4().hex, model_key=meta.model_key, session_id=meta.session_id,
            compress=meta.compress, env=dict(meta.env), nnsight_version=headers.get("nnsight-version", ""),
            python_version=headers.get("python-version", ""),
            api_key_sha256=_sha256(key) if key else None, payload_bytes=len(blob))
        with self._lock:
            self.requests.append(record)
        _log.debug("request %s: %d bytes, session %s, api key %s", record.id[:8], len(blob),
                   record.session_id[:8] or "-", "present" if key else "absent")
        received = self._respond(record, "RECEIVED", send=False)
        if meta.model_key != self.model_key:
            job = _Job(record, blob)
            return 200, self._finish(job, "ERROR", f"Model {meta.model_key} is not deployed on this server "
                                                   f"(it serves {self.model_key}).", send=False)
        self._jobs.put(_Job(record, blob))
        self._respond(record, "QUEUED")
        return 200, received

    # -- statuses --
    def _respond(self, record: RequestRecord, status: str, description: str | None = None, *,
                 data: Any = None, send: bool = True, binary: bytes | None = None) -> str:
        from nnsight.schema.response import ResponseModel

        text = ResponseModel(id=record.id, status=status, description=_DESCRIPTIONS.get(status, "")
                             if description is None else description, data=data).model_dump_json()
        if status != "LOG":
            record.statuses.append(status)
        self._latest[record.id] = text
        outbox = self._sessions.get(record.session_id) if record.session_id else None
        if send and outbox is not None:
            outbox.put(("binary", binary) if binary is not None else ("text", text.encode()))
        return text

    def _finish(self, job: _Job, status: str, description: str | None = None, result: bytes | None = None,
                send: bool = True) -> str | None:
        from nnsight.schema.response import ResponseModel

        with self._lock:
            if job.finished:
                return None
            job.finished = True
        record = job.record
        binary = None
        if status == "ERROR":
            record.error = description
        if result is not None:
            self._results[record.id] = result
            record.result_bytes = len(result)
            if len(result) <= self.inline_limit:
                binary = ResponseModel(id=record.id, status="COMPLETED", description=_DESCRIPTIONS["COMPLETED"],
                                       data=result).pickle()
        data = f"{self.url}/result/{record.id}" if result is not None else None
        return self._respond(record, status, description, data=data, send=send, binary=binary)

    # -- execution --
    def _work(self) -> None:
        """The executor: runs jobs one at a time in one long-lived thread (as a model actor does;
        a thread per job would also pay for a fresh torch/OpenMP thread pool every time)."""
        while not self._stopping.is_set():
            try:
                job = self._jobs.get(timeout=0.1)
            except (queue.Empty, SystemExit):   # SystemExit: an interrupt that landed between jobs
                continue
            if job is None:
                return
            job.started = time.perf_counter()
            self._current = job
            try:
                self._run(job)
            except SystemExit:
                pass
            finally:
                self._current = None
                job.record.seconds = time.perf_counter() - job.started
                job.done.set()

    def _watch(self) -> None:
        """Answer a job that runs past ``timeout`` with ERROR, then interrupt it (NDIF's kill_thread)."""
        while not self._stopping.wait(0.1):
            job = self._current
            if job is None or job.done.is_set() or time.perf_counter() - job.started <= self.timeout:
                continue
            if self._finish(job, "ERROR", f"Job took longer than timeout: {self.timeout} seconds") is not None:
                _log.warning("request %s timed out after %.0f s; interrupting it", job.record.id[:8], self.timeout)
                if self._current is job:
                    _interrupt(self._worker)

    def _run(self, job: _Job) -> None:
        try:
            self._respond(job.record, "RUNNING")
            result = self._execute(job)
            self._finish(job, "COMPLETED", result=result)
        except BaseException as e:  # noqa: BLE001 - every failure goes back to the client as ERROR
            self._finish(job, "ERROR", job.description or _describe(e))

    def _execute(self, job: _Job) -> bytes:
        import torch
        from nnsight.schema.request import RequestModel
        from nnsight.tracing.tracer import _saves, dec, inc

        record, model = job.record, self.model
        weights = frozen(model._module, self.freeze)
        attn = getattr(model, "attn_implementation", None)
        real_stdout = sys.stdout
        router = _StdoutToLog(lambda line: self._respond(record, "LOG", line), threading.get_ident(), real_stdout)
        scope = _RequestScope()
        scope.__enter__()
        try:
            weights.__enter__()
            model._remoteable_set_env(record.env)
            persistent = model._remoteable_persistent_objects()
            try:
                tracer = RequestModel.deserialize(job.blob, persistent, compress=record.compress,
                                                  unpickler=self._unpickler)
            except Exception as e:
                job.description = "Failed to deserialize the request: " + _describe(e)
                raise
            inc()                             # a trace scope, so .save() marks into this thread's set
            sys.stdout = router
            _GUARD.mode = "execute"
            try:
                tracer.execute(tracer.info.code)
                saves = _saves()
                saved = {k: v for k, v in tracer.info.frame.f_locals.items() if id(v) in saves}
            except BaseException as e:
                job.description = _describe(e)    # while the shipped source is still in linecache
                raise
            finally:
                _GUARD.mode = None
                router.close_out()
                if sys.stdout is router:
                    sys.stdout = real_stdout
                dec()
        finally:
            weights.__exit__(None, None, None)
            if attn is not None and getattr(model, "attn_implementation", attn) != attn:
                model._module.set_attn_implementation(attn)
            scope.__exit__()
        record.saved = tuple(saved)
        buffer = io.BytesIO()
        torch.save(saved, buffer, pickle_protocol=4)
        data = buffer.getvalue()
        if record.compress:
            import zstandard

            data = zstandard.ZstdCompressor(level=3).compress(data)
        return data
