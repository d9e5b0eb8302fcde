"""The run store: ``artifacts/<analysis>/<run-id>/`` with ``manifest.json`` and ``results.h5``.

Results are appended chunk by chunk. Each append writes a copy of ``results.h5`` with the new chunk and
atomically renames it over the old one, so a run killed at any moment leaves either the previous or the
new file, never a half-written one; a rerun with the same config resumes after the last finished chunk.

Integrity: every dataset carries the sha256 of its contents (written with its chunk) and every chunk is
verified when a run is reopened and whenever it is read; a mismatch names the chunk and leaves the file
as it is. ``results.h5`` also holds the run's identity, so it is the source of truth: a missing manifest
is rebuilt from it, and the manifest's chunk list always follows it. One writer per run folder: a
second process gets a one-line error naming the holder's pid (``run.lock``, an flock the kernel drops
when the holder dies, so a stale lock never blocks). Whether a run was remote, and against which host,
is part of its identity and manifest, so remote and local runs of one config never share a folder.

What a run assembles from its chunks at the end (a table, a matrix over all chunks) goes to the same
file, group ``result/<name>`` (``write_result`` / ``read_result``): one HDF5 file per run.
"""
from __future__ import annotations

import contextlib
import contextvars
import errno
import hashlib
import json
import os
import platform
import shutil
import subprocess
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from interpkit.errors import UserError

STORE_TAG = "interpkit-run-store/1"
RESULT = "result"                          # results.h5 group of assembled results (``RunStore.write_result``)
_SECRET_WORDS = ("key", "token", "secret", "password")


def config_dict(config) -> dict:
    """A JSON-able dict of a config dataclass (or dict), with anything secret-looking removed."""
    d = asdict(config) if is_dataclass(config) else dict(config)
    return _scrub(json.loads(json.dumps(d, default=str)))


def _scrub(obj):
    secrets = {v for k in ("NDIF_API_KEY", "HF_TOKEN") if (v := os.environ.get(k))}
    if isinstance(obj, dict):
        return {k: ("<redacted>" if any(w in k.lower() for w in _SECRET_WORDS) else _scrub(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_scrub(v) for v in obj]
    if isinstance(obj, str) and any(s in obj for s in secrets):
        return "<redacted>"
    return obj


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]


def package_versions() -> dict[str, str]:
    from interpkit.remote.config import local_versions

    packages = ("interpkit", "torch", "nnsight", "transformers", "numpy", "h5py")
    return {"python": platform.python_version(), **local_versions(packages, missing="not installed")}


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# -- remote identity ----------------------------------------------------------------------------------
_REMOTE: contextvars.ContextVar = contextvars.ContextVar("interpkit_store_remote", default=False)


@contextlib.contextmanager
def remote_scope(remote: bool | str):
    """Stores opened inside without an explicit ``remote=`` take this one (the CLI sets it per command)."""
    token = _REMOTE.set(remote)
    try:
        yield
    finally:
        _REMOTE.reset(token)


def remote_identity(remote: bool | str | None) -> dict | None:
    """None for a local run; else ``{"id": ..., "host": ...}``: ``id`` (part of the run's identity) is the
    NDIF host, ``"loopback"`` for a server on this machine (its port changes per start) or
    ``"nnsight-local"`` for nnsight's in-process serialize round-trip (``remote="local"``)."""
    if remote is None:
        remote = _REMOTE.get()
    if not remote:
        return None
    if remote == "local":
        return {"id": "nnsight-local", "host": None}
    from interpkit.remote.config import host_url

    host = host_url()
    name = urlsplit(host).hostname or host
    return {"id": "loopback" if name in ("127.0.0.1", "localhost", "::1") else host, "host": host}


# -- the per-folder lock ------------------------------------------------------------------------------
_HELD: dict[str, int] = {}                 # run folder -> lock fd held by this process (re-entrant)


class RunLock:
    """One writer per run folder: an exclusive flock on ``<dir>/run.lock`` holding the writer's pid.

    The kernel drops an flock when its process dies, so a lock left by a killed run is stale and is
    taken over (``stale_pid`` says whose it was). Stores of one process share the lock."""

    def __init__(self, directory: Path):
        self.path = directory / "run.lock"
        self.key = str(directory.resolve())
        self.stale_pid: int | None = None

    def acquire(self) -> bool:
        """Take the lock (True), or find it already held by this process (False); UserError if another has it."""
        import fcntl

        if self.key in _HELD:
            return False
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            holder = _read_pid(self.path)
            raise UserError(f"run folder {self.path.parent} is being written by another interpkit process "
                            f"(pid {holder if holder else 'unknown'}); wait for it to finish or pass another "
                            f"--run-id") from None
        previous = _read_pid(self.path)
        if previous and previous != os.getpid():
            self.stale_pid = previous       # its holder died without releasing: the kernel dropped its flock
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
        _HELD[self.key] = fd
        return True

    def release(self) -> None:
        fd = _HELD.pop(self.key, None)
        if fd is not None:
            os.ftruncate(fd, 0)             # an empty lock file: released cleanly
            os.close(fd)                    # closing drops the flock


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


# -- checksums ----------------------------------------------------------------------------------------
def digest(array) -> str:
    """sha256 of an array's dtype, shape and contents (object/string elements by their bytes)."""
    a = np.asarray(array)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    if a.dtype.kind == "O":
        for x in a.ravel():
            h.update(x if isinstance(x, bytes) else str(x).encode())
            h.update(b"\0")
    else:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


class RunStore:
    """One run's directory. Open with the run's config; reopening with the same config resumes.

    ``remote``: whether the run executes remotely (``True``: on the configured NDIF host; ``"local"``:
    nnsight's simulated round-trip); None takes ``remote_scope``'s value (default local). ``readonly``
    opens an existing run to read it: no lock, nothing written."""

    def __init__(self, analysis: str, config, *, model: str, revision: str | None = None,
                 seed: int | None = None, root: str | Path = "artifacts", run_id: str | None = None,
                 remote: bool | str | None = None, readonly: bool = False):
        from interpkit.validate import run_id as check_run_id

        check_run_id(run_id)
        self.analysis = analysis
        self.config = config_dict(config)
        self.remote = remote_identity(remote)
        self.identity = {"config": self.config, "model": model, "revision": revision, "seed": seed}
        if self.remote:
            self.identity["remote"] = self.remote["id"]
        self.run_id = run_id or f"{_slug(model)}-{config_hash(self.identity)}"
        self.dir = Path(root) / analysis / self.run_id
        self.h5_path = self.dir / "results.h5"
        self.manifest_path = self.dir / "manifest.json"
        self.readonly = readonly
        self._lock = RunLock(self.dir)
        if readonly:
            if not self.dir.is_dir():
                raise UserError(f"no run folder {self.dir}; run the analysis first")
            self._verify_h5()
            self.manifest = self._open_manifest(model, revision, seed)
            return
        self._make_dir()
        taken = self._lock.acquire()
        try:
            self._remove_partial()
            self._verify_h5()
            self.manifest = self._open_manifest(model, revision, seed)
        except BaseException:
            if taken:                                   # not a lock another store of this process holds
                self._lock.release()
            raise

    def _make_dir(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the run folder {self.dir} ({e.strerror}); pass a writable "
                            f"--root / output folder") from None
        if not os.access(self.dir, os.W_OK):
            raise UserError(f"the run folder {self.dir} is not writable; pass a writable output folder")

    def _remove_partial(self) -> None:
        """A ``results.h5.partial`` left by a killed writer (we hold the lock: nobody else writes it)."""
        for leftover in (self.h5_path.with_suffix(".h5.partial"), self.manifest_path.with_suffix(".json.tmp")):
            if leftover.exists():
                leftover.unlink()

    def close(self) -> None:
        """Release the run folder's lock (``finish`` does this too)."""
        self._lock.release()

    def __enter__(self) -> "RunStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- manifest ---------------------------------------------------------------------------------
    def _open_manifest(self, model, revision, seed) -> dict:
        if not self.manifest_path.exists():
            return self._rebuild_manifest(model, revision, seed)
        try:
            m = json.loads(self.manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{self.manifest_path} is corrupted (not JSON); move the run directory "
                            f"away or pick another --run-id") from None
        if not isinstance(m, dict) or m.get("store") != STORE_TAG:
            raise UserError(f"{self.manifest_path} was not written by interpkit; pick another --run-id")
        model_info = m.get("model") if isinstance(m.get("model"), dict) else {}
        if m.get("config") != self.config or model_info.get("name") != model:
            raise UserError(f"run {self.run_id!r} exists with a different config or model; "
                            f"pick another --run-id or delete {self.dir}")
        stored_remote = m.get("remote") or None
        if (stored_remote or {}).get("id") != (self.remote or {}).get("id"):
            where = lambda r: f"remote ({r['id']})" if r else "local"  # noqa: E731
            raise UserError(f"run {self.run_id!r} exists as a {where(stored_remote)} run, this one is "
                            f"{where(self.remote)}; pick another --run-id (or leave it out)")
        chunks = self.done_chunks()
        if m.get("chunks") != chunks and not self.readonly:
            m["chunks"] = chunks                        # results.h5 is the source of truth
            self._write_manifest(m)
        return m

    def _new_manifest(self, model, revision, seed) -> dict:
        return {"store": STORE_TAG, "analysis": self.analysis, "run_id": self.run_id, "config": self.config,
                "model": {"name": model, "revision": revision}, "seed": seed,
                "remote": self.remote or False, "versions": package_versions(), "git_commit": git_commit(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "status": "running", "timings": {}, "chunks": []}

    def _rebuild_manifest(self, model, revision, seed) -> dict:
        """No manifest: a fresh run, or one rebuilt from results.h5's stored identity and chunks."""
        m = self._new_manifest(model, revision, seed)
        if self.h5_path.exists():
            stored = self._h5_identity()
            if stored is None:
                raise UserError(f"{self.manifest_path} is missing and {self.h5_path} does not record its run's "
                                f"config; move the run folder away to rerun")
            if stored != json.loads(json.dumps(_scrub(self.identity), sort_keys=True, default=str)):
                raise UserError(f"{self.h5_path} holds a run with a different config, model or remote host; "
                                f"pick another --run-id or delete {self.dir}")
            m["chunks"] = self.done_chunks()
            m["rebuilt_from_h5"] = True
        if self._lock.stale_pid:
            m["stale_lock_taken_over"] = self._lock.stale_pid
        if not self.readonly:
            self._write_manifest(m)
        return m

    def _write_manifest(self, m: dict | None = None) -> None:
        self._writable()
        m = _scrub(m if m is not None else self.manifest)
        tmp = self.manifest_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(m, indent=2, default=str))
        os.replace(tmp, self.manifest_path)

    def _writable(self) -> None:
        if self.readonly:
            raise ValueError(f"run store {self.dir} was opened read-only")
        self._lock.acquire()                            # re-entrant; re-taken after finish()

    def note(self, **fields) -> None:
        """Add fields (summaries, figure paths, ...) to the manifest."""
        self.manifest.update(fields)
        self._write_manifest()

    def time(self, name: str, seconds: float) -> None:
        self.manifest["timings"][name] = round(self.manifest["timings"].get(name, 0.0) + seconds, 4)
        self._write_manifest()

    def finish(self, **summary) -> None:
        self.manifest["status"] = "complete"
        if summary:
            self.manifest["summary"] = summary
        self._write_manifest()
        self.close()

    # -- results ----------------------------------------------------------------------------------
    def _open_h5(self):
        import h5py

        try:
            return h5py.File(self.h5_path, "r")
        except OSError:
            raise UserError(f"{self.h5_path} is corrupted (not readable HDF5); the file was left as it is: "
                            f"move it away to rerun") from None

    def _h5_identity(self) -> dict | None:
        with self._open_h5() as f:
            text = f.attrs.get("identity")
        return json.loads(text) if text is not None else None

    def _verify_h5(self) -> None:
        """The file is ours and every chunk matches its checksums (UserError naming the chunk if not)."""
        if not self.h5_path.exists():
            return
        with self._open_h5() as f:
            if f.attrs.get("store") != STORE_TAG:
                raise UserError(f"{self.h5_path} was not written by interpkit; move it away or pick another --run-id")
            for name in self._chunk_names(f):
                self._read_group(f, name)
            for name in f.get(RESULT, {}):
                self._read_group(f, name, RESULT)

    def _chunk_names(self, f) -> list[str]:
        try:
            return sorted(f["chunks"].keys()) if "chunks" in f else []
        except (OSError, KeyError, RuntimeError) as e:
            raise UserError(f"{self.h5_path}: the chunk index is damaged ({e}); the file was left as it is: "
                            f"move it away to rerun") from None

    def _read_group(self, f, name: str, where: str = "chunks") -> dict[str, np.ndarray]:
        """Every dataset of chunk ``name`` (``where=RESULT``: of the result ``name``), each checked against
        the sha256 written with it."""
        checked = f.attrs.get("checksums") == "sha256"
        what = "chunk" if where == "chunks" else "result"
        try:
            g = f[where][name]
            out = {}
            for key in g.keys():
                value = g[key][()]
                stored = g[key].attrs.get("sha256")
                if (checked or stored is not None) and stored != digest(value):
                    raise UserError(f"{self.h5_path}: {what} {name} (dataset {key!r}) fails its sha256 checksum: the "
                                    f"stored data changed after it was written; the file was left as it is: move "
                                    f"it away to recompute the run")
                out[key] = value
            return out
        except (OSError, KeyError, RuntimeError, ValueError) as e:
            raise UserError(f"{self.h5_path}: {what} {name} cannot be read ({type(e).__name__}); the file was "
                            f"left as it is: move it away to recompute the run") from None

    def done_chunks(self) -> list[str]:
        if not self.h5_path.exists():
            return []
        with self._open_h5() as f:
            return self._chunk_names(f)

    def has_chunk(self, chunk: str | int) -> bool:
        return _chunk_name(chunk) in self.done_chunks()

    def write_chunk(self, chunk: str | int, arrays: dict[str, np.ndarray], seconds: float | None = None) -> None:
        """Append one finished chunk atomically (copy, add with checksums, fsync, rename)."""
        self._writable()
        name = _chunk_name(chunk)
        if self.has_chunk(name):
            raise ValueError(f"chunk {name} already stored")
        self._add_group("chunks", name, arrays)
        self.manifest["chunks"] = self.done_chunks()
        if seconds is not None:
            self.manifest["timings"][f"chunk/{name}"] = round(seconds, 4)
        self._write_manifest()

    def write_result(self, name: str, arrays: dict[str, np.ndarray], attrs: dict | None = None) -> None:
        """The run's assembled result ``name`` (group ``result/<name>`` of results.h5, replacing an earlier
        one), written atomically and with checksums as a chunk is. It is derived from the chunks: resuming
        never reads it, and an interrupted run simply has none yet."""
        self._writable()
        self._add_group(RESULT, name, arrays, attrs)

    def read_result(self, name: str) -> dict[str, np.ndarray]:
        """The arrays of the assembled result ``name`` (checksums verified)."""
        with self._open_h5() as f:
            if name not in f.get(RESULT, {}):
                raise UserError(f"{self.h5_path} has no result {name!r}; run the analysis to the end first")
            return self._read_group(f, name, RESULT)

    def _add_group(self, where: str, name: str, arrays: dict, attrs: dict | None = None) -> None:
        """Group ``where/name`` of ``arrays`` (each dataset with its sha256) in a copy of results.h5 that is
        fsynced and renamed over it: a kill at any moment leaves the old file or the new one."""
        import h5py

        tmp = self.h5_path.with_suffix(".h5.partial")
        if self.h5_path.exists():
            shutil.copyfile(self.h5_path, tmp)
        with h5py.File(tmp, "a") as f:
            f.attrs["store"] = STORE_TAG
            f.attrs["checksums"] = "sha256"
            f.attrs["analysis"] = self.analysis
            f.attrs["identity"] = json.dumps(_scrub(self.identity), sort_keys=True, default=str)
            parent = f.require_group(where)
            if name in parent:
                del parent[name]
            g = parent.create_group(name)
            g.attrs.update(attrs or {})
            for k, v in arrays.items():
                ds = g.create_dataset(k, data=np.asarray(v))
                ds.attrs["sha256"] = digest(ds[()])     # of what a reader gets back
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self.h5_path)

    def read(self, key: str) -> np.ndarray:
        """``key`` from every chunk, concatenated along axis 0 in chunk order (checksums verified)."""
        with self._open_h5() as f:
            parts = [self._read_group(f, c)[key] for c in self._chunk_names(f)]
        return np.concatenate(parts, axis=0)

    def read_chunk(self, chunk: str | int) -> dict[str, np.ndarray]:
        """One chunk's arrays (checksums verified)."""
        with self._open_h5() as f:
            return self._read_group(f, _chunk_name(chunk))


def _chunk_name(chunk: str | int) -> str:
    return f"{chunk:06d}" if isinstance(chunk, int) else str(chunk)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-")
