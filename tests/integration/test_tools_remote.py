"""Everyday tools (issue 16) through the loopback NDIF server (one request per command, equal to local),
steering (coefficient 0 = unsteered, token for token; unsteered = plain HF greedy generation) and the CLI."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from interpkit.analyses.tools.attention import detect_heads, role_attention
from interpkit.analyses.tools.cache import cache
from interpkit.analyses.tools.dla import dla
from interpkit.analyses.tools.logit_lens import logit_lens
from interpkit.analyses.tools.steering import steer
from interpkit.errors import UserError
from interpkit.remote.loopback import frozen
from interpkit.tasks import get_task
from tests.conftest import tiny

POS, NEG = ["Mary is happy and glad", "John loves it"], ["Mary is sad and angry", "John hates it"]
GEN = ["When Mary and John went to the store,", "Then, Alice"]


def both(lm, fn):
    """(local, remote through the loopback, requests the remote run made)."""
    from interpkit.remote.loopback import LoopbackNDIF

    with frozen(lm.hf):                    # NDIF (and the loopback) serve frozen weights: bit-comparable
        local = fn(lm)
    with LoopbackNDIF(lm.model) as server:
        before = server.n_requests
        remote = fn(replace(lm, remote=True))
        n = server.n_requests - before
    return local, remote, n


def test_cache_lens_dla_remote_equal_local():
    lm = tiny("llama")
    ps = get_task("ioi")(lm.tokenizer, n=3, seed=0)
    local, remote, n = both(lm, lambda m: cache(m, ps, sites=["resid_pre", "q", "pattern", "mlp_out"], layers=[0, 2]))
    assert n == 1 and set(local.keys()) == set(remote.keys())
    assert all(torch.equal(local.acts[k], remote.acts[k]) for k in local.keys())
    local, remote, n = both(lm, lambda m: logit_lens(m, ps, k=3))
    assert n == 1
    for f in ("top_ids", "top_probs", "answer_prob", "answer_rank", "logit_diff"):
        assert torch.equal(getattr(local, f), getattr(remote, f)), f
    local, remote, n = both(lm, lambda m: dla(m, ps, by_source=True))
    assert n == 1 and remote.max_error() <= 1e-4
    for f in ("embed", "heads", "mlp", "attn_bias", "const", "logit_diff", "by_source"):
        assert torch.equal(getattr(local, f), getattr(remote, f)), f


def test_attention_remote_equal_local():
    lm = tiny("gpt2")
    ps = get_task("ioi")(lm.tokenizer, n=3, seed=0)
    local, remote, n = both(lm, lambda m: role_attention(m, ps, "end", "IO"))
    assert n == 1 and torch.equal(local.per_prompt, remote.per_prompt)
    local, remote, n = both(lm, lambda m: detect_heads(m, n_tokens=6, batch=2))
    assert n == 1 and torch.equal(local.scores, remote.scores)
    # the whole attention command (patterns, two role pairs, a profile, detectors) is one request
    import interpkit.analyses.tools.command as C

    def command(m, tmp):
        load, C.load = C.load, lambda *a, **k: m
        try:
            return C.attention_command("tiny:gpt2", task="ioi", n=3, roles="end:IO,S2:S1", dest="end", detect=True,
                                       n_tokens=5, layers=[0, 2], out=tmp, echo=lambda *a: None)
        finally:
            C.load = load

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        local, remote, n = both(lm, lambda m: command(m, tmp))
    assert n == 1 and local["summary"] == remote["summary"] and len(remote["figures"]) == 2 + 2 + 1 + 3


@pytest.mark.parametrize("family", ["gpt2", "neox", "llama", "gemma2", "mistral"])
def test_steering_coefficient_zero_is_unsteered(family):
    lm = tiny(family)
    res = steer(lm, POS, NEG, GEN, layer=1, coefficients=[0.0, 50.0], max_new_tokens=3,
                pos_word=" Mary", neg_word=" John")
    assert torch.equal(res.steered_ids[0], res.unsteered_ids)                  # token for token
    assert res.kl[0] == 0.0 and res.kl[1] > 0.0
    assert not torch.equal(res.steered_ids[1], res.unsteered_ids)            # a large push changes the text
    # unsteered = plain HF greedy generation of the same inputs
    enc = lm.tokenizer(GEN, return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = lm.hf.generate(**enc, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                             pad_token_id=lm.tokenizer.pad_token_id)
    assert torch.equal(ref, res.unsteered_ids)


def test_steering_vector_and_remote_single_request():
    lm = tiny("llama")
    run = lambda m: steer(m, POS, NEG, GEN, layer=1, coefficients=[0.0, 20.0], max_new_tokens=2)  # noqa: E731
    local, remote, n = both(lm, run)
    assert n == 1
    assert torch.equal(local.unsteered_ids, remote.unsteered_ids)
    assert all(torch.equal(a, b) for a, b in zip(local.steered_ids, remote.steered_ids))
    assert local.kl == remote.kl and abs(local.vector_norm - remote.vector_norm) < 1e-6
    # the vector: mean last-token layer-1 output of POS minus that of NEG, from plain hooks
    outs = []
    hook = lm.arch.block(1).register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o))
    for texts in (POS, NEG):
        enc = lm.tokenizer(texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            lm.hf(**enc, position_ids=(enc["attention_mask"].cumsum(-1) - 1).clamp_min(0))
    hook.remove()
    vec = outs[0][:, -1].mean(0) - outs[1][:, -1].mean(0)
    assert abs(float(vec.norm()) - local.vector_norm) < 1e-5
    with pytest.raises(UserError, match="positive and a negative"):
        steer(lm, [], NEG, GEN, layer=1)
    with pytest.raises(UserError, match="out of range"):
        steer(lm, POS, NEG, GEN, layer=9)


def test_cli_commands_store_runs(tmp_path):
    from typer.testing import CliRunner

    from interpkit.cli import app

    runner = CliRunner()
    base = ["--model", "tiny:gpt2", "--out", str(tmp_path)]
    for args in (["cache", "--task", "ioi", "--n", "2", "--sites", "resid,pattern", "--layers", "0"],
                 ["dla", "--task", "ioi", "--n", "2", "--dtype", "float32"],
                 ["steer", "--layer", "1", "--positive", "I love it", "--negative", "I hate it", "--prompt", "The",
                  "--coefficients", "0,5", "--max-new-tokens", "2"]):
        result = runner.invoke(app, args + base)
        assert result.exit_code == 0, (args, result.output)
        assert f"results: {tmp_path}" in result.output or "cache:" in result.output
    for analysis in ("cache", "dla", "steering"):
        runs = list((tmp_path / analysis).iterdir())
        assert runs and (runs[0] / "manifest.json").exists(), analysis
    result = runner.invoke(app, ["dla", "--model", "tiny:gpt2", "--out", str(tmp_path), "--dtype", "float64",
                                 "--task", "ioi"])
    assert result.exit_code != 0 and "unknown --dtype" in str(result.exception)
