"""The run store's integrity: checksums, manifest rebuilt from the HDF5, one writer, remote kept apart."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from interpkit.errors import UserError
from interpkit.store import RunStore, remote_scope

CFG = {"chunks": 6, "size": 5}
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def _filled(root, n=3) -> RunStore:
    s = RunStore("demo", CFG, model="m", root=root)
    for i in range(n):
        s.write_chunk(i, {"x": np.full(64, 1000 + i, dtype=np.int64), "y": np.arange(4.0) + i})
    s.finish()
    return s


def _bytes(path) -> bytes:
    return open(path, "rb").read()


def test_flipped_bytes_inside_a_chunk_are_detected_and_the_file_left_alone(tmp_path):
    s = _filled(tmp_path)
    raw = bytearray(_bytes(s.h5_path))
    needle = np.full(64, 1001, dtype=np.int64).tobytes()
    at = raw.find(needle)
    assert at > 0                                            # chunk 000001's data, stored contiguously
    raw[at + 200] ^= 0xFF                                    # one byte inside it
    s.h5_path.write_bytes(bytes(raw))
    manifest = _bytes(s.manifest_path)
    with pytest.raises(UserError, match=r"chunk 000001 \(dataset 'x'\) fails its sha256 checksum"):
        RunStore("demo", CFG, model="m", root=tmp_path)       # verified on resume
    with pytest.raises(UserError, match="chunk 000001"):
        RunStore("demo", CFG, model="m", root=tmp_path, readonly=True).read("x")
    assert _bytes(s.h5_path) == bytes(raw) and _bytes(s.manifest_path) == manifest
    assert not (s.dir / "results.h5.partial").exists()


def test_garbage_in_the_file_is_one_error_never_data(tmp_path):
    s = _filled(tmp_path)
    raw = bytearray(_bytes(s.h5_path))
    at = raw.find(np.arange(4.0).tobytes())                  # chunk 000000's y
    raw[at:at + 8] = np.float32(3.4e38).tobytes() * 2
    s.h5_path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="chunk 000000"):
        RunStore("demo", CFG, model="m", root=tmp_path, readonly=True).read_chunk(0)


def test_read_verifies_every_chunk(tmp_path):
    s = _filled(tmp_path)
    store = RunStore("demo", CFG, model="m", root=tmp_path, readonly=True)
    np.testing.assert_array_equal(store.read("x")[::64], [1000, 1001, 1002])
    import h5py

    with h5py.File(s.h5_path, "a") as f:                     # the checksum itself tampered with
        f["chunks/000002/y"].attrs["sha256"] = "0" * 64
    with pytest.raises(UserError, match="chunk 000002"):
        store.read("y")


def test_deleted_manifest_is_rebuilt_from_the_hdf5(tmp_path):
    s = _filled(tmp_path, n=3)
    s.manifest_path.unlink()
    again = RunStore("demo", CFG, model="m", root=tmp_path)
    m = json.loads(again.manifest_path.read_text())
    assert m["chunks"] == ["000000", "000001", "000002"] and m["rebuilt_from_h5"]
    again.write_chunk(3, {"x": np.zeros(64, dtype=np.int64), "y": np.zeros(4)})
    assert json.loads(again.manifest_path.read_text())["chunks"][-1] == "000003"
    again.close()
    s.manifest_path.unlink()
    with pytest.raises(UserError, match="different config"):
        RunStore("demo", {"chunks": 7}, model="m", root=tmp_path, run_id=s.run_id)


def test_manifest_chunk_list_follows_the_hdf5(tmp_path):
    s = _filled(tmp_path, n=3)
    m = json.loads(s.manifest_path.read_text())
    m["chunks"] = []
    s.manifest_path.write_text(json.dumps(m))
    again = RunStore("demo", CFG, model="m", root=tmp_path)
    assert again.manifest["chunks"] == ["000000", "000001", "000002"]
    again.close()


@pytest.mark.parametrize("text", ["[1, 2]", "42", '"text"', "null"])
def test_manifest_that_is_not_an_object_is_refused(tmp_path, text):
    s = _filled(tmp_path, n=1)
    s.manifest_path.write_text(text)
    before = _bytes(s.h5_path)
    with pytest.raises(UserError, match="not written by interpkit"):
        RunStore("demo", CFG, model="m", root=tmp_path)
    assert _bytes(s.h5_path) == before and s.manifest_path.read_text() == text


def test_leftover_partial_is_cleaned_when_a_writer_opens(tmp_path):
    s = _filled(tmp_path, n=1)
    (s.dir / "results.h5.partial").write_bytes(b"half a file")
    again = RunStore("demo", CFG, model="m", root=tmp_path)
    assert not (s.dir / "results.h5.partial").exists() and again.done_chunks() == ["000000"]
    again.close()


# -- one writer per run folder ---------------------------------------------------------------------------
WRITER = textwrap.dedent("""
    import sys, time, numpy as np
    from interpkit.errors import UserError
    from interpkit.store import RunStore
    root, pause = sys.argv[1], float(sys.argv[2])
    try:
        store = RunStore("demo", {"chunks": 6, "size": 5}, model="tiny:gpt2", seed=0, root=root)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for i in range(6):
        if not store.has_chunk(i):
            store.write_chunk(i, {"x": np.full((5, 3), i, dtype=np.float32), "row": np.arange(5) + 5 * i})
            time.sleep(pause)
    store.finish(total=6)
""")


def _writer(root, pause):
    return subprocess.Popen([sys.executable, "-c", WRITER, str(root), str(pause)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_concurrent_writers_one_refused_the_other_complete(tmp_path):
    first = _writer(tmp_path / "run", 0.3)
    lock = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:                        # wait until the first holds the lock
        found = list((tmp_path / "run").glob("demo/*/run.lock"))
        if found and found[0].read_text().strip() == str(first.pid):
            lock = found[0]
            break
        time.sleep(0.05)
    assert lock is not None, first.communicate()
    second = _writer(tmp_path / "run", 0.0)
    _, err = second.communicate(timeout=60)
    assert second.returncode == 2
    assert len(err.strip().splitlines()) == 1 and f"pid {first.pid}" in err and "Traceback" not in err
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert _writer(tmp_path / "single", 0.0).wait(timeout=60) == 0
    a = RunStore("demo", CFG, model="tiny:gpt2", seed=0, root=tmp_path / "run", readonly=True)
    b = RunStore("demo", CFG, model="tiny:gpt2", seed=0, root=tmp_path / "single", readonly=True)
    assert a.done_chunks() == b.done_chunks() == [f"{i:06d}" for i in range(6)]
    for key in ("x", "row"):
        np.testing.assert_array_equal(a.read(key), b.read(key))
    assert a.manifest["status"] == "complete" and lock.read_text() == ""        # released


def test_stale_lock_of_a_dead_writer_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    s = RunStore("demo", CFG, model="m", root=tmp_path, run_id="r")
    s.close()
    (s.dir / "run.lock").write_text(f"{dead.pid}\n")          # left behind by a killed writer
    again = RunStore("demo", CFG, model="m", root=tmp_path, run_id="r")
    assert (s.dir / "run.lock").read_text().strip() == str(os.getpid())
    again.write_chunk(0, {"x": np.zeros(2)})
    again.finish()


# -- remote and local runs are kept apart ----------------------------------------------------------------
def test_remote_and_local_runs_of_one_config_are_kept_apart(tmp_path, monkeypatch):
    from nnsight import CONFIG

    local = RunStore("demo", CFG, model="m", root=tmp_path)
    local.write_chunk(0, {"x": np.zeros(2)})
    local.finish()
    monkeypatch.setattr(CONFIG.API, "HOST", "https://api.ndif.us")
    remote = RunStore("demo", CFG, model="m", root=tmp_path, remote=True)
    assert remote.dir != local.dir and remote.done_chunks() == []
    assert remote.manifest["remote"] == {"id": "https://api.ndif.us", "host": "https://api.ndif.us"}
    assert local.manifest["remote"] is False
    remote.close()
    with remote_scope(True):                                  # the CLI's way of saying "remote"
        assert RunStore("demo", CFG, model="m", root=tmp_path).dir == remote.dir
    monkeypatch.setattr(CONFIG.API, "HOST", "https://other.example")
    other = RunStore("demo", CFG, model="m", root=tmp_path, remote=True)
    assert other.dir not in (local.dir, remote.dir)           # another host, another run
    other.close()
    with pytest.raises(UserError, match="exists as a local run, this one is remote"):
        RunStore("demo", CFG, model="m", root=tmp_path, run_id=local.run_id, remote=True)
    monkeypatch.setattr(CONFIG.API, "HOST", "http://127.0.0.1:5123")
    a = RunStore("demo", CFG, model="m", root=tmp_path, remote=True)
    a.close()
    monkeypatch.setattr(CONFIG.API, "HOST", "http://127.0.0.1:6000")
    assert RunStore("demo", CFG, model="m", root=tmp_path, remote=True, readonly=True).dir == a.dir
