"""State tracking end to end on the shipped S3 demo model: pairs, probes, patching, remote equality."""
from __future__ import annotations

import functools
import json

import torch

from interpkit.analyses.demos.state_tracking import SHIPPED
from interpkit.analyses.patching.sweep import PatchConfig, run_patching
from interpkit.analyses.probing.linear import ProbeConfig, collect_residuals, probe_layers
from interpkit.analyses.state_tracking.signature import prefix_boundary, signature
from interpkit.tasks.permutations import encode_actions, parity_pairs, run_states, sample_stories, symmetric_group


@functools.lru_cache(maxsize=None)
def demo_model():
    from interpkit.models import load_model

    return load_model(str(SHIPPED))


def recipe() -> dict:
    return json.loads((SHIPPED / "recipe.json").read_text())


def test_parity_pairs_change_only_the_first_action():
    from tests.conftest import tiny

    tok = tiny("gpt2").tokenizer
    g = symmetric_group(3)
    for kind in ("same", "diff"):
        ps = parity_pairs(tok, 40, 8, 3, seed=1, parity=kind)
        a = torch.tensor([[g.strings.index(w) for w in p.split()] for p in ps.prompts])
        b = torch.tensor([[g.strings.index(w) for w in p.split()] for p in ps.corrupted_prompts])
        assert (a[:, 1:] == b[:, 1:]).all() and (a[:, 0] != b[:, 0]).all()
        same = g.parity[a[:, 0]] == g.parity[b[:, 0]]
        assert same.all() if kind == "same" else (~same).all()
        assert (run_states(a, 3)[:, -1] != run_states(b, 3)[:, -1]).all()   # the answer always changes
        assert not (ps.answer_ids == ps.wrong_ids).any()


def test_signature_reads_the_evidence():
    paa = signature(torch.tensor([.2, .3, .5, .97, 1.]), torch.tensor([.5, .99, 1., 1., 1.]), [0, 3], [0, 7])
    assert paa.verdict == "PAA" and paa.parity_first_layer == 1 and paa.state_first_layer == 3
    aa = signature(torch.tensor([.2, .3, .5, .97, 1.]), torch.tensor([.5, .55, .6, .97, 1.]), [0, 3], [0, 3])
    assert aa.verdict == "AA" and aa.state_first_layer == aa.parity_first_layer == 3
    assert signature(torch.full((5,), .3), torch.full((5,), .6), [], []).verdict == "inconclusive"
    seq = signature(torch.tensor([.27, 1.]), torch.tensor([.54, 1.]), [15], [15])
    assert seq.verdict == "sequential" and seq.strength == "strong"
    assert prefix_boundary(torch.tensor([[0., .6, 1.], [0., .2, .4]]), [0, 1, 2]) == [1, None]


def test_demo_model_tracks_state_at_training_length():
    from interpkit.analyses.state_tracking.training import evaluate

    lm, T = demo_model(), recipe()["config"]["train_len"]
    ev = evaluate(lm.hf, lm.tokenizer, n=3, length=T, n_stories=500, seed=31337)
    assert ev["min_state_acc"] >= 0.99, ev["state_acc"]


def test_state_probe_decodes_late_not_at_embeddings():
    lm, T = demo_model(), recipe()["config"]["train_len"]
    st = sample_stories(300, T, 3, seed=5)
    ids = encode_actions(st.actions, lm.tokenizer, 3)
    res = probe_layers(lm, {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                       {"state": st.states}, positions="all", cfg=ProbeConfig(seed=0))
    acc = res.test_acc[0]
    assert acc[-1] >= 0.95 and acc[0] < 0.6, acc


def test_patching_and_probing_identical_through_loopback_ndif():
    from interpkit.remote.loopback import LoopbackNDIF

    lm, T = demo_model(), recipe()["config"]["train_len"]
    pairs = parity_pairs(lm.tokenizer, 8, T, 3, seed=2, parity="diff")
    cfg = PatchConfig(site="resid_post", region="prefix", direction="noise", layers=[0, lm.arch.n_layers - 1])
    st = sample_stories(60, T, 3, seed=6)
    ids = encode_actions(st.actions, lm.tokenizer, 3)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    local_patch = run_patching(lm, pairs, cfg)
    local_probe = probe_layers(lm, inputs, {"state": st.states}, cfg=ProbeConfig(seed=0, max_iter=50))
    local_acts = collect_residuals(lm, inputs, "last")
    try:
        with LoopbackNDIF(lm.model) as server:
            lm.remote = True
            remote_patch = run_patching(lm, pairs, cfg)
            n_patch_requests = server.n_requests
            remote_probe = probe_layers(lm, inputs, {"state": st.states}, cfg=ProbeConfig(seed=0, max_iter=50))
            remote_acts = collect_residuals(lm, inputs, "last")
    finally:
        lm.remote = False
    assert n_patch_requests == 1
    torch.testing.assert_close(remote_patch.values, local_patch.values, atol=1e-5, rtol=0)
    # probes see activations that differ by float noise (NDIF-style frozen weights pick other kernels)
    torch.testing.assert_close(remote_acts, local_acts, atol=1e-5, rtol=0)
    torch.testing.assert_close(remote_probe.test_acc, local_probe.test_acc, atol=0.01, rtol=0)
