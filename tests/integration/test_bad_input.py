"""Every bad input is one line on stderr and exit code 2: never a traceback, never a changed result.

A table-driven battery over every command. Each case runs the CLI in-process (``cli.main`` with
``sys.argv`` patched) in a workspace that holds a finished patch run, and checks the exit code, that
stderr is exactly one line matching the expected message (so a case cannot pass for the wrong reason),
that no "Traceback" appears, and that every file that existed before is byte-identical afterwards.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from tests.conftest import assert_one_line_error, run_cli

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "artifacts" / "models"
PATCH = ["patch", "--task", "gp", "--model", "tiny:gpt2", "--n", "2", "--layers", "0"]
PROBE = ["probe", "--model", "tiny:gpt2", "--task", "days", "--targets", "a"]
CTRACE = ["causal-trace", "--model", "tiny:gpt2", "--facts", "1", "--samples", "2", "--kind", "hidden"]


def hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (the lock file, which only names its holder, aside)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "run.lock"}


@dataclass
class Case:
    id: str
    args: list[str]
    message: str                                    # a regex the one stderr line must match
    setup: Callable[[Path], None] | None = None     # changes a private copy of the workspace first


def _write(name: str, text: str) -> Callable[[Path], None]:
    return lambda ws: (ws / name).write_text(text)


def _run_dir(ws: Path) -> Path:
    return next((ws / "artifacts" / "patching").iterdir())


def _flip_chunk_bytes(ws: Path) -> None:
    """Garbage inside a stored chunk's data (the reported 3.4e38 / NaN cells)."""
    path = _run_dir(ws) / "results.h5"
    import h5py

    with h5py.File(path, "r") as f:
        name = sorted(f["chunks"].keys())[0]
        values = f["chunks"][name]["values"][()]
    raw = bytearray(path.read_bytes())
    at = raw.find(values.tobytes())
    assert at > 0
    raw[at:at + 8] = np.array([3.4e38, np.nan], dtype=np.float32).tobytes()
    path.write_bytes(bytes(raw))


def _corrupt_results_h5(ws: Path) -> None:
    """The run's results.h5 (chunks and assembled results) is no longer HDF5."""
    (_run_dir(ws) / "results.h5").write_bytes(b"\x89HDF\r\n garbage")


def _manifest_not_object(ws: Path) -> None:
    (_run_dir(ws) / "manifest.json").write_text("[1, 2, 3]")


CASES = [
    # models that do not exist: one line instead of HFValidationError tracebacks
    Case("patch-missing-model", ["patch", "--task", "ioi", "--model", "/nonexistent"], r"/nonexistent.*no such folder"),
    Case("causal-trace-missing-model", ["causal-trace", "--model", "/nonexistent"], r"no such folder"),
    Case("attn-trace-missing-model", ["attn-trace", "--task", "ioi", "--model", "/nonexistent"], r"no such folder"),
    Case("serve-missing-model", ["serve", "--model", "/nonexistent"], r"no such folder"),
    Case("eval-missing-model", ["eval", "--model", "/nonexistent", "--train-len", "8"], r"no such folder"),
    Case("probe-missing-model", ["probe", "--model", "./no/such/model", "--task", "days", "--targets", "a"],
         r"no such folder"),
    Case("patch-bad-hub-id", ["patch", "--task", "ioi", "--model", "not a valid id!"], r"neither an existing model"),
    Case("patch-broken-model-folder", ["patch", "--task", "ioi", "--model", "broken"], r"cannot load 'broken'",
         lambda ws: (ws / "broken").mkdir() or (ws / "broken" / "config.json").write_text("{}")),
    Case("patch-folder-without-config", ["patch", "--task", "ioi", "--model", "empty"], r"has no config.json",
         lambda ws: (ws / "empty").mkdir()),
    # counts
    Case("patch-n-0", PATCH + ["--n", "0"], r"--n must be >= 1 \(got 0\)"),
    Case("patch-n-negative", PATCH + ["--n", "-3"], r"--n must be >= 1 \(got -3\)"),
    Case("patch-max-rows-0", PATCH + ["--max-rows", "0"], r"--max-rows must be >= 1"),
    Case("patch-layer-out-of-range", PATCH[:-2] + ["--layers", "9"], r"layer 9 is out of range"),
    Case("patch-layers-negative", PATCH[:-2] + ["--layers", "-1"], r"--layers has -1"),
    Case("probe-n-0", PROBE + ["--n", "0"], r"--n must be >= 2 \(got 0\)"),
    Case("probe-n-negative", PROBE + ["--n", "-5"], r"--n must be >= 2 \(got -5\)"),
    Case("probe-targets-empty", PROBE[:-1] + [","], r"--targets names no meta field"),
    Case("vprobe-n-0", ["vprobe", "--model", "tiny:gpt2", "--task", "days", "--target", "a", "--n", "0"],
         r"--n must be >= 2"),
    Case("data-n-0", ["data", "--out", "d", "--n", "0"], r"--n 0; S_n needs 2 <= n"),
    Case("data-stories-negative", ["data", "--out", "d", "--stories", "-1"], r"--stories must be >= 1"),
    Case("data-length-0", ["data", "--out", "d", "--length", "0"], r"--length must be >= 1"),
    Case("data-train-ratio", ["data", "--out", "d", "--train-ratio", "1.5"], r"--train-ratio must be in \(0, 1\]"),
    Case("train-n-1", ["train", "--n", "1", "--output-dir", "m"], r"--n must be >= 2"),
    Case("train-lr-negative", ["train", "--lr", "-1", "--output-dir", "m"], r"--lr must be > 0"),
    Case("train-steps-0", ["train", "--steps", "0", "--output-dir", "m"], r"--steps must be >= 1"),
    Case("train-window-0", ["train", "--arch", "mistral", "--window", "0", "--output-dir", "m"], r"--window must be >= 1"),
    Case("train-window-needs-mistral", ["train", "--window", "2", "--output-dir", "m"], r"needs arch mistral"),
    Case("train-arch-unknown", ["train", "--arch", "bogus", "--output-dir", "m"], r"unknown arch 'bogus'"),
    Case("train-supervision-unknown", ["train", "--supervision", "bogus", "--output-dir", "m"],
         r"unknown supervision 'bogus'.*scratchpad"),
    Case("train-heads-divide", ["train", "--d-model", "10", "--heads", "4", "--output-dir", "m"], r"not divisible"),
    Case("train-recipe-missing", ["train", "--recipe", "/nonexistent.json"], r"--recipe .* does not exist"),
    Case("train-recipe-malformed", ["train", "--recipe", "bad.json"], r"not valid JSON", _write("bad.json", "{oops")),
    Case("train-recipe-no-config", ["train", "--recipe", "list.json"], r'must hold an object with a "config"',
         _write("list.json", "[1, 2]")),
    Case("train-recipe-wrong-type", ["train", "--recipe", "typed.json"], r"steps must be an integer",
         _write("typed.json", json.dumps({"config": {"steps": "many"}}))),
    Case("eval-factor-0", ["eval", "--model", str(MODELS / "s3-demo"), "--factor", "0"], r"--factor must be >= 1"),
    Case("eval-stories-0", ["eval", "--model", str(MODELS / "s3-demo"), "--stories", "0"], r"--stories must be >= 1"),
    Case("eval-not-state-tracking", ["eval", "--model", str(MODELS / "calendar-demo")],
         r"not a permutation state-tracking model"),
    # causal tracing options and its YAML config
    Case("patch-engine-unknown", PATCH + ["--engine", "fast"], r"--engine"),
    Case("causal-trace-facts-per-chunk-0", CTRACE + ["--facts-per-chunk", "0"], r"facts.per.chunk"),
    Case("vprobe-steps-0", ["vprobe", "--model", "tiny:gpt2", "--task", "days", "--target", "a", "--steps", "0"],
         r"--steps must be >= 1"),
    Case("circle-methods-unknown", ["circle", "--task", "days", "--model", "tiny:gpt2", "--methods", "circle,bad"],
         r"unknown intervention method\(s\) \['bad'\]"),
    Case("circle-targets-0", ["circle", "--task", "days", "--model", "tiny:gpt2", "--targets-per-problem", "0"],
         r"--targets-per-problem must be >= 1"),
    Case("circle-max-rows-0", ["circle", "--task", "days", "--model", "tiny:gpt2", "--max-rows", "0"],
         r"--max-rows must be >= 1"),
    Case("probe-folds-0", PROBE + ["--folds", "0"], r"--folds must be >= 1"),
    Case("probe-folds-too-many", ["probe", "--model", "tiny:gpt2", "--task", "gp", "--targets", "gender",
                                  "--split-by", "name", "--folds", "50"], r"50 folds need at least 50 distinct groups"),
    Case("probe-split-by-unknown", ["probe", "--model", "tiny:gpt2", "--task", "gp", "--targets", "gender",
                                    "--split-by", "nom"], r"--split-by 'nom' is not a field"),
    Case("causal-trace-noise-negative", CTRACE + ["--noise", "-1"], r"--noise must be >= 0"),
    Case("causal-trace-noise-word", CTRACE + ["--noise", "loud"], r"--noise 'loud'"),
    Case("causal-trace-facts-0", CTRACE[:3] + ["--facts", "0"], r"--facts must be >= 1"),
    Case("causal-trace-yaml-samples", CTRACE[:3] + ["--config", "s.yaml"], r"samples must be an integer",
         _write("s.yaml", "samples: abc\n")),
    Case("causal-trace-yaml-kinds", CTRACE[:3] + ["--config", "k.yaml"], r"kinds must be a list of names",
         _write("k.yaml", "kinds: 5\n")),
    Case("causal-trace-yaml-not-mapping", CTRACE[:3] + ["--config", "l.yaml"], r"must be a mapping",
         _write("l.yaml", "- 1\n- 2\n")),
    Case("causal-trace-yaml-missing", CTRACE[:3] + ["--config", "nope.yaml"], r"does not exist"),
    Case("causal-trace-synthetic-on-tiny", ["causal-trace", "--model", "tiny:llama", "--task", "synthetic_facts",
                                            "--facts", "2"], r"synthetic_facts needs a word-level tokenizer"),
    # paths and run ids
    Case("demo-out-unwritable", ["demo", "--out", "/proc/x"], r"--out '/proc/x' is not writable"),
    Case("data-out-is-file", ["data", "--out", "afile/sub"], r"is a file, not a folder", _write("afile", "x")),
    Case("patch-run-id-escapes", PATCH + ["--run-id", "../../x"], r"--run-id '../../x' must be a plain folder name"),
    Case("causal-trace-run-id-escapes", CTRACE + ["--run-id", "a/b"], r"--run-id 'a/b' must be a plain"),
    Case("attn-trace-run-id-escapes", ["attn-trace", "--task", "ioi", "--model", "tiny:gpt2", "--run-id", ".."],
         r"--run-id '..' must be a plain"),
    # serve
    Case("serve-seconds-negative", ["serve", "--seconds", "-1"], r"--seconds must be >= 0"),
    Case("serve-empty-key", ["serve", "--api-key", ""], r"--api-key is empty"),
    # flag conflicts
    Case("patch-head-with-region", PATCH + ["--site", "head", "--region", "prefix"], r"--region prefix .* heads"),
    Case("patch-attribution-engine", PATCH + ["--method", "attribution", "--engine", "full"],
         r"--engine full chooses how exact patching runs"),
    Case("patch-window-without-region", PATCH + ["--window", "3"], r"--window 3 only applies to --region window"),
    Case("patch-normalize-unknown", PATCH + ["--normalize", "batch"], r"--normalize 'batch' is not one of pair, mean"),
    Case("patch-min-gap-range", PATCH + ["--min-gap", "2"], r"--min-gap must be in \[0, 1\]"),
    Case("patch-unknown-option", PATCH + ["--bogus"], r"No such option"),
    # circuit
    Case("circuit-prune-min-prompts", ["circuit", "prune", "--run", "artifacts", "--min-prompts", "-1"],
         r"--min-prompts must be >= 1"),
    Case("circuit-unify-min-frequency", ["circuit", "unify", "--run", "artifacts", "--min-frequency", "2"],
         r"--min-frequency must be in \[0, 1\]"),
    Case("circuit-unknown-action", ["circuit", "grow", "--run", "artifacts"], r"action 'grow' is not one of"),
    Case("circuit-not-a-run", ["circuit", "unify", "--run", "artifacts"], r"not an attn-trace run directory"),
    Case("attn-trace-no-prompt-qualifies", ["attn-trace", "--task", "ioi", "--model", "tiny:gpt2", "--prompts", "2"],
         r"none of the 2 prompts qualified"),
    # stored results: corrupted, foreign, unreadable
    Case("patch-garbage-in-chunk", PATCH, r"chunk exact-000000 \(dataset 'values'\) fails its sha256", _flip_chunk_bytes),
    Case("patch-corrupted-results-h5", PATCH, r"results\.h5 is corrupted \(not readable HDF5\)", _corrupt_results_h5),
    Case("patch-manifest-not-object", PATCH, r"not written by interpkit", _manifest_not_object),
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A folder holding one finished patch run (``PATCH``), the existing results every case must keep."""
    ws = tmp_path_factory.mktemp("workspace")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ws)
        code, out, err = run_cli(PATCH)
    assert code == 0, err
    return ws


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("INTERPKIT_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_exit_2(case, workspace, tmp_path, monkeypatch):
    ws = workspace
    if case.setup is not None:                              # a private copy the case may change
        ws = tmp_path / "ws"
        shutil.copytree(workspace, ws)
        case.setup(ws)
    monkeypatch.chdir(ws)
    before = hashes(ws)
    code, out, err = run_cli(case.args)
    assert_one_line_error(code, out, err, case.message)
    assert hashes(ws) == {**before, **{k: v for k, v in hashes(ws).items() if k not in before}}
    for name in before:                                     # nothing that existed was changed or removed
        assert hashes(ws).get(name) == before[name], name


def test_debug_flag_shows_the_traceback(workspace, monkeypatch):
    from interpkit.errors import UserError

    monkeypatch.chdir(workspace)
    with pytest.raises(UserError, match="--n must be >= 1"):
        run_cli(PATCH + ["--n", "0", "--debug"])


def test_an_unexpected_error_is_one_line_with_exit_1(workspace, monkeypatch):
    import interpkit.analyses.patching.command as P

    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(P, "patch_command", broken)
    monkeypatch.chdir(workspace)
    code, out, err = run_cli(PATCH)
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "unexpected ZeroDivisionError" in err and "--debug" in err


# -- remote failures ----------------------------------------------------------------------------------------
def test_wrong_ndif_api_key_is_one_line(workspace, monkeypatch):
    from interpkit.models import load_model
    from interpkit.remote import configure
    from interpkit.remote.loopback import LoopbackNDIF

    monkeypatch.chdir(workspace)
    before = hashes(workspace)
    with LoopbackNDIF(load_model("tiny:gpt2").model, api_key="the-right-key", timeout=60):
        configure(api_key="a-wrong-key")
        code, out, err = run_cli(PATCH + ["--engine", "full", "--remote"])
    assert_one_line_error(code, out, err, r"NDIF refused the API key .*NDIF_API_KEY")
    assert "a-wrong-key" not in out + err and "the-right-key" not in out + err
    assert {k: v for k, v in hashes(workspace).items() if k in before} == before


def test_unreachable_ndif_host_is_one_line(workspace, monkeypatch):
    from nnsight import CONFIG

    monkeypatch.chdir(workspace)
    monkeypatch.setattr(CONFIG.API, "HOST", "http://127.0.0.1:9")          # nothing listens there
    code, out, err = run_cli(PATCH + ["--remote"])
    assert_one_line_error(code, out, err, r"cannot read the NDIF server's versions from http://127.0.0.1:9")


def test_remote_model_not_running_is_one_line(workspace, monkeypatch):
    """The pre-check: NDIF answers /status and the model is not among its running deployments."""
    from interpkit.models import load_model
    from interpkit.remote.loopback import LoopbackNDIF
    from interpkit.remote.status import seen_running

    monkeypatch.chdir(workspace)
    with LoopbackNDIF(load_model("tiny:gpt2").model, timeout=60) as server:
        code, out, err = run_cli(["patch", "--task", "gp", "--model", "tiny:llama", "--n", "2", "--remote"])
        assert server.n_requests == 0                        # refused before any request
    assert_one_line_error(code, out, err, r"tiny:llama is not running on NDIF .*running: tiny:gpt2")
    assert "tiny:gpt2" in seen_running()                     # what was seen running is recorded ...
    code, out, err = run_cli(["models"])
    assert code == 0 and "seen running" in out               # ... and listed


def test_remote_run_on_a_local_model_directory_served_by_loopback(tmp_path, monkeypatch):
    """`interpkit serve --model <dir>` + `--remote --model <dir>` (was a traceback): runs through the server."""
    from interpkit.models import load_model
    from interpkit.remote.loopback import LoopbackNDIF

    monkeypatch.chdir(tmp_path)
    model_dir = str(MODELS / "s3-demo")
    with LoopbackNDIF(load_model(model_dir).model, timeout=120) as server:
        code, out, err = run_cli(["patch", "--task", "permutations", "--model", model_dir, "--n", "2",
                                  "--layers", "0", "--engine", "full", "--remote"])
        requests = server.n_requests
    assert "Traceback" not in out + err
    assert code == 0 and requests >= 1 and "remote" in out, err[-2000:]
    manifest = json.loads(next(Path("artifacts/patching").glob("*/manifest.json")).read_text())
    assert manifest["remote"]["id"] == "loopback"


def test_head_out_site_as_the_readme_shows_it():
    """``interpkit.sites.site(model, "head_out", layer)`` without n_heads (was a ZeroDivisionError)."""
    from interpkit.models import load_model
    from interpkit.sites import site

    lm = load_model("tiny:llama")
    model = lm.model
    with model.trace("the cat sat on the mat"):
        heads = site(model, "head_out", 1).save()
    assert heads.shape[2:] == (lm.arch.n_heads, lm.arch.d_head)


def test_the_installed_command_prints_no_traceback(tmp_path):
    """End to end through the console script (a real process): one line, exit 2."""
    proc = subprocess.run([str(Path(sys.executable).parent / "interpkit"), "patch", "--task", "ioi", "--model",
                           "/nonexistent"], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert_one_line_error(proc.returncode, proc.stdout, proc.stderr, r"no such folder")
