"""Property tests: any option values for patch, causal-trace and probe either run (exit 0) or fail with
one line and exit 2, never a traceback (hypothesis, derandomized and small so the file stays under a minute)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parents[2]
FACTS_MODEL = str(ROOT / "artifacts" / "models" / "synthetic-facts-gpt2")
SETTINGS = settings(max_examples=8, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@st.composite
def options(draw, valid: dict[str, list], invalid: dict[str, list]) -> dict:
    """Every option from its valid values; in about half the examples one option gets a bad value."""
    chosen = {name: draw(st.sampled_from(values)) for name, values in valid.items()}
    if draw(st.booleans()):
        name = draw(st.sampled_from(sorted(invalid)))
        chosen[name] = draw(st.sampled_from(invalid[name]))
    return chosen


def _options(values: dict) -> list[str]:
    """CLI arguments for the values that are not None (``max_rows`` -> ``--max-rows``)."""
    args = []
    for name, value in values.items():
        if value is True:
            args.append(f"--{name.replace('_', '-')}")
        elif value is not None and value is not False:
            args += [f"--{name.replace('_', '-')}", str(value)]
    return args


def check(code: int, out: str, err: str) -> None:
    """The property: exit 0, or exit 2 with exactly one line on stderr; never a traceback."""
    assert "Traceback" not in out + err, err[-3000:]
    assert code in (0, 2), (code, err[-3000:])
    if code == 2:
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("INTERPKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path


PATCH_VALID = dict(task=["gp", "ioi", "gt"], n=[1, 2], site=["resid", "attn", "mlp", "head", "resid_post", "unembed_in"],
                   method=["exact", "attribution", "both"], direction=[None, "denoise", "noise"],
                   by=[None, None, "position", "head"], region=[None, None, "prefix", "suffix", "window"],
                   window=[None, 1, 2], mode=[None, "substitution", "deletion"], metric=[None, "logit_diff", "prob_diff"],
                   layers=[None, "0", "0,2"], max_rows=[None, 8, 64], engine=[None, "prefix", "full"],
                   normalize=[None, "pair", "mean"], min_gap=[None, 0.0, 0.5], seed=[None, 0, 3])
PATCH_INVALID = dict(task=["nope"], n=[0, -3], site=["bogus"], method=["fast"], direction=["sideways"], by=["x"],
                     region=["all"], window=[0, -1], mode=["x"], metric=["x", "margin"],
                     layers=["5", "-1", "a", ",", "1,1"], max_rows=[0, -1], engine=["x"], normalize=["z"],
                     min_gap=[-1, 2, float("nan")], seed=[-1, 2 ** 40])


@settings(SETTINGS, max_examples=6)
@given(values=options(PATCH_VALID, PATCH_INVALID))
def test_patch_runs_or_fails_in_one_line(workdir, values):
    check(*run_cli(["patch", "--model", "tiny:gpt2"] + _options(values)))


TRACE_VALID = dict(facts=[1], samples=[1, 2], window=[None, 1, 2], kind=["hidden", "mlp", "attn"],
                   noise=[None, "3sigma", "0.5", "0", "s2"], engine=[None, "prefix", "batched"],
                   max_rows=[None, 8, 40], seed=[None, 0, 3], severed=[False, True])
TRACE_INVALID = dict(facts=[0, -1], samples=[0, -1], window=[0], kind=["none"], noise=["-1", "nan", "inf", "loud"],
                     engine=["x"], max_rows=[0, 3], seed=[-1])


@settings(SETTINGS, max_examples=3)               # a traced fact costs seconds: few examples, one fact
@given(values=options(TRACE_VALID, TRACE_INVALID))
def test_causal_trace_runs_or_fails_in_one_line(workdir, values):
    check(*run_cli(["causal-trace", "--model", FACTS_MODEL, "--task", "synthetic_facts"] + _options(values)))


PROBE_VALID = dict(task=["days", "months"], n=[2, 5, 12], targets=["a", "a,b", "c,start"],
                   positions=["last", "all", "start"], seed=[0, 3])
PROBE_INVALID = dict(task=["ioi"], n=[0, -5, 1], targets=[",", " ", "zzz"], positions=["nope", ""], seed=[-1])


@SETTINGS
@given(values=options(PROBE_VALID, PROBE_INVALID))
def test_probe_runs_or_fails_in_one_line(workdir, values):
    check(*run_cli(["probe", "--model", "tiny:gpt2"] + _options(values)))


def test_the_checks_can_fail():
    """The property itself rejects a traceback, exit 1, and a second stderr line."""
    for code, err in ((1, "error: x"), (2, "Traceback (most recent call last):"), (2, "warning\nerror: x")):
        with pytest.raises(AssertionError):
            check(code, "", err)
    check(2, "", "error: one line\n")
    assert os.path.isdir(FACTS_MODEL)
