"""The run store: atomic chunks, resume after a kill, detection of corrupted or foreign files."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from interpkit.errors import UserError
from interpkit.store import RunStore

CFG = {"chunks": 6, "size": 5}

WORKER = textwrap.dedent("""
    import sys, numpy as np
    from interpkit.store import RunStore
    root, kill_after = sys.argv[1], int(sys.argv[2])
    store = RunStore("demo", {"chunks": 6, "size": 5}, model="tiny:gpt2", seed=0, root=root)
    written = 0
    for i in range(6):
        if store.has_chunk(i):
            continue
        if written == kill_after:
            import os; os._exit(9)                     # die mid-run, like a kill -9
        store.write_chunk(i, {"x": np.full((5, 3), i, dtype=np.float32), "row": np.arange(5) + 5 * i})
        written += 1
    store.finish(total=6)
""")


def _run(root, kill_after):
    return subprocess.run([sys.executable, "-c", WORKER, str(root), str(kill_after)],
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))), timeout=60).returncode


def test_killed_run_resumes_without_duplicates(tmp_path):
    assert _run(tmp_path / "a", 99) == 0                      # uninterrupted
    assert _run(tmp_path / "b", 2) == 9                       # killed after 2 chunks
    partial = RunStore("demo", CFG, model="tiny:gpt2", seed=0, root=tmp_path / "b", readonly=True)
    assert partial.done_chunks() == ["000000", "000001"]
    assert _run(tmp_path / "b", 99) == 0                      # resumed
    full = RunStore("demo", CFG, model="tiny:gpt2", seed=0, root=tmp_path / "a", readonly=True)
    resumed = RunStore("demo", CFG, model="tiny:gpt2", seed=0, root=tmp_path / "b", readonly=True)
    assert resumed.done_chunks() == full.done_chunks() == [f"{i:06d}" for i in range(6)]
    np.testing.assert_array_equal(resumed.read("x"), full.read("x"))
    np.testing.assert_array_equal(resumed.read("row"), np.arange(30))
    assert json.loads((resumed.dir / "manifest.json").read_text())["status"] == "complete"


def test_half_written_partial_file_is_ignored(tmp_path):
    s = RunStore("demo", CFG, model="m", root=tmp_path)
    s.write_chunk(0, {"x": np.zeros(2)})
    (s.dir / "results.h5.partial").write_bytes(b"garbage from a crash")
    s2 = RunStore("demo", CFG, model="m", root=tmp_path)
    assert s2.done_chunks() == ["000000"]
    s2.write_chunk(1, {"x": np.ones(2)})
    np.testing.assert_array_equal(s2.read("x"), [0, 0, 1, 1])
    with pytest.raises(ValueError):
        s2.write_chunk(1, {"x": np.ones(2)})


def test_corrupted_and_foreign_files_are_reported(tmp_path):
    s = RunStore("demo", CFG, model="m", root=tmp_path)
    (s.dir / "results.h5").write_bytes(b"not hdf5")
    with pytest.raises(UserError, match="corrupted"):
        RunStore("demo", CFG, model="m", root=tmp_path)
    (s.dir / "results.h5").unlink()
    (s.dir / "manifest.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(UserError, match="not written by interpkit"):
        RunStore("demo", CFG, model="m", root=tmp_path)
    with pytest.raises(UserError, match="different config"):
        _different(tmp_path)


def _different(tmp_path):
    s = RunStore("other", CFG, model="m", root=tmp_path, run_id="fixed")
    RunStore("other", {"chunks": 7}, model="m", root=tmp_path, run_id="fixed")
    return s


def test_manifest_has_provenance_and_no_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("NDIF_API_KEY", "sk-very-secret-value-123")
    s = RunStore("demo", {"api_key": "sk-very-secret-value-123", "note": "uses sk-very-secret-value-123",
                          "layers": [1, 2]}, model="m", seed=3, root=tmp_path)
    text = (s.dir / "manifest.json").read_text()
    assert "sk-very-secret" not in text
    m = json.loads(text)
    assert m["seed"] == 3 and m["config"]["layers"] == [1, 2]
    assert {"python", "torch", "nnsight", "transformers"} <= set(m["versions"])
    assert "git_commit" in m and "timings" in m


def test_assembled_result_lives_in_results_h5(tmp_path):
    import h5py

    s = RunStore("demo", CFG, model="m", root=tmp_path)
    s.write_chunk(0, {"x": np.zeros(2)})
    s.write_result("exact", {"values": np.arange(6.0).reshape(2, 3), "labels": [b"a", b"b"]}, attrs={"by": "head"})
    s.write_result("exact", {"values": np.ones((2, 3))}, attrs={"by": "position"})     # a rerun replaces it
    s.close()
    again = RunStore("demo", CFG, model="m", root=tmp_path)                            # verified on reopen
    assert again.done_chunks() == ["000000"]                                           # chunks only: resume
    np.testing.assert_array_equal(again.read_result("exact")["values"], np.ones((2, 3)))
    assert set(again.read_result("exact")) == {"values"}
    with h5py.File(again.h5_path, "r") as f:
        assert f["result/exact"].attrs["by"] == "position"
    with pytest.raises(UserError, match="no result 'attribution'"):
        again.read_result("attribution")
    again.close()
    with h5py.File(again.h5_path, "a") as f:                                           # changed behind our back
        f["result/exact/values"][0, 0] = 5.0
    with pytest.raises(UserError, match="result exact .* sha256"):
        RunStore("demo", CFG, model="m", root=tmp_path)
