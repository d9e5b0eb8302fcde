"""A remote patching run beside a local one (tiny GPT-2 through the loopback server): the model-building
part of ``tests/unit/test_store_integrity.py``."""
from __future__ import annotations

import json
import os


def test_remote_patch_run_does_not_reuse_a_local_one(tmp_path):
    """The reported bug: a --remote run in a folder holding the same local run sent 0 requests."""
    from interpkit.analyses.patching.command import patch_command

    from interpkit.models import load_model
    from interpkit.remote.loopback import LoopbackNDIF

    kw = dict(task="gp", model="tiny:gpt2", n=2, layers=[0], engine="full", root=str(tmp_path), echo=lambda line: None)
    local = patch_command(**kw)
    with LoopbackNDIF(load_model("tiny:gpt2").model, timeout=120) as server:
        remote = patch_command(**kw, remote=True)
        assert server.n_requests >= 1
    assert remote["run_dir"] != local["run_dir"]
    manifest = json.loads(open(os.path.join(remote["run_dir"], "manifest.json")).read())
    assert manifest["remote"]["id"] == "loopback" and manifest["remote"]["host"].startswith("http://127.0.0.1:")
