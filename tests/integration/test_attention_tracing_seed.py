"""Seed fidelity of attention-causal tracing (Franco & Crovella 2025): the paper's weights convention
(centred W_Q/W_K), its selection rule against an independent reference, the studies (sparsity, control
signals, threshold sweep, reference circuits), token labels and Omega computed through a remote session."""
from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import torch

from interpkit.analyses.attention_tracing.decompose import collect, decompose, load_weights
from interpkit.analyses.attention_tracing.omega import Omega
from interpkit.analyses.attention_tracing.signals import edge_signal
from tests.conftest import tiny
from tests.references.acc_selection import Reference, normalised_inputs

CALENDAR = "artifacts/models/calendar-demo"


@functools.lru_cache(maxsize=None)
def calendar():
    from interpkit.models import load_model

    return load_model(CALENDAR)


def _model_and_prompts(name: str):
    from interpkit.tasks import get_task

    if name == "tiny:gpt2":
        lm = tiny("gpt2")
        return lm, get_task("ioi")(lm.tokenizer, n=2, seed=0)
    lm = calendar()
    return lm, get_task("days")(lm.tokenizer, n=2)


def _edges(dec, n_layers: int, n_heads: int, every: int):
    """Every ``every``-th above-uniform edge (layer, head, dest, src) of a decomposed prompt."""
    out = []
    for l in range(n_layers):
        for h in range(n_heads):
            for d in range(1, dec.n):
                for s in range(d + 1):
                    if dec.A[l, h, d, s] >= 1.0 / (d + 1):
                        out.append((l, h, d, s))
    return out[::every]


@pytest.mark.parametrize("name", ["tiny:gpt2", CALENDAR])
def test_centred_selection_equals_paper_reference(name):
    """Selected components == a from-scratch dense implementation of the paper's rule on TransformerLens-style
    centred weights; the uncentred option equals the reference on uncentred weights; centring matters."""
    lm, prompts = _model_and_prompts(name)
    acts, w = collect(lm, prompts.batch()), load_weights(lm.arch)
    omegas = {c: Omega(lm.arch, center=c) for c in (True, False)}
    refs = {c: Reference(lm.hf, center=c) for c in (True, False)}
    same = {True: 0, False: 0}
    cross = total = 0
    for row in range(2):
        decs = {c: decompose(omegas[c], w, acts, row) for c in (True, False)}
        xs = normalised_inputs(lm.hf, prompts.input_ids[row, decs[True].offset:])
        for l, h, d, s in _edges(decs[True], lm.arch.n_layers, lm.arch.n_heads, every=5):
            for side, rside in (("q", "d"), ("k", "s")):
                total += 1
                ours = {}
                for c in (True, False):
                    sel = edge_signal(omegas[c], decs[c], l, h, d, s, side, 1.0, 5).selected
                    ours[c] = sorted(sel.tolist()) if len(sel) else None
                    same[c] += ours[c] == Reference.select(refs[c].contributions(xs[l], l, h, d, s, rside))
                cross += ours[True] != ours[False]
    print(f"\n{name}: {total} edge sides; centred == reference {same[True]}, uncentred == uncentred reference "
          f"{same[False]}; centred vs uncentred selections differ on {cross} ({100 * cross / total:.1f}%)")
    assert total >= 100
    assert same[True] == total and same[False] == total
    if name == "tiny:gpt2":                     # random weights: the SVDs differ a lot (trained: rarely)
        assert cross >= 0.2 * total


def test_centring_keeps_scores_and_skips_rmsnorm():
    """Centring leaves every score unchanged on LayerNorm inputs but changes the SVD; RMSNorm: no centring."""
    lm = tiny("neox")
    c, u = Omega(lm.arch, center=True), Omega(lm.arch, center=False)
    assert c.centred and not u.centred
    fc, fu = c.factors(1), u.factors(1)
    assert fc.W_Q.mean(1).abs().max() < 1e-12 and fu.W_Q.mean(1).abs().max() > 1e-4
    x = torch.randn(5, lm.arch.d_model, dtype=torch.float64)
    x = x - x.mean(-1, keepdim=True)                       # LayerNorm-normalised inputs are mean-free
    assert torch.allclose(x @ fc.W_Q, x @ fu.W_Q, atol=1e-12)
    assert not torch.allclose(c.core("q", 0)[1], u.core("q", 0)[1], atol=1e-6)
    llama = tiny("llama")
    a, b = Omega(llama.arch, center=True), Omega(llama.arch, center=False)
    assert not a.centred and torch.equal(a.factors(0).W_Q, b.factors(0).W_Q)


def test_reference_circuits_and_bar_plot(tmp_path):
    from interpkit.analyses.attention_tracing import graphs as gr
    from interpkit.analyses.attention_tracing.reference_circuits import TASK_REFERENCES, reference_components
    from interpkit.analyses.attention_tracing.studies import plot_compare

    gt = reference_components("gt-gpt2-hanna2023")
    assert len(gt) == 12 and (8, "MLP") in gt and (9, 1) in gt               # 8 heads + MLPs 8-11
    assert len(reference_components("gt-gpt2-hanna2023", include_mlp=False)) == 8
    gp = reference_components("gp-gpt2-mathwin2023")
    assert len(gp) == 16 and len(reference_components("ioi-gpt2-wang2022")) == 26
    assert set(TASK_REFERENCES) == {"ioi", "gt", "gp"}
    ours = {(5, 1), (9, 1), (8, "MLP"), (2, 2)}
    s = gr.compare(ours, gt)
    assert (s["precision"], s["recall"]) == (pytest.approx(3 / 4), pytest.approx(3 / 12))
    (tmp_path / "ref.txt").write_text("9.9 10.MLP\n")
    assert reference_components(str(tmp_path / "ref.txt"), include_mlp=True) == {(9, 9), (10, "MLP")}
    plot_compare({"gt": s, "ioi": gr.compare({(9, 9)}, reference_components("ioi-gpt2-wang2022"))},
                 tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 5000


def test_average_linkage_and_control_heads():
    from interpkit.analyses.attention_tracing.studies import average_linkage, control_heads

    import pandas as pd

    g = np.random.default_rng(0)
    a, b = np.eye(6)[0], np.eye(6)[3]
    X = np.stack([a + 0.05 * g.normal(size=6) for _ in range(7)] + [b + 0.05 * g.normal(size=6) for _ in range(4)])
    labels = average_linkage(X, 0.5)
    assert labels.tolist() == [0] * 7 + [1] * 4                              # largest cluster first
    assert len(set(average_linkage(X, 1.5).tolist())) == 1                   # cut above the merge height
    f = pd.DataFrame([dict(layer=0, head=0, side="k", src=0)] * 7 + [dict(layer=1, head=0, side="k", src=0)] * 4)
    X2 = np.concatenate([X[:7], g.normal(size=(4, 6))])                     # head 1.0: unrelated signals
    heads, sig = control_heads(f, X2, (0,), similarity=0.5)
    assert heads.set_index(["layer", "head"]).controlled.to_dict() == {(0, 0): True, (1, 0): False}
    assert set(sig) == {(0, 0)}


def test_studies_on_the_calendar_model(tmp_path):
    """attn-trace (tokens as labels) -> intervene -> prune -> sparsity, control, sweep, compare, end to end."""
    from interpkit.analyses.attention_tracing.command import attn_trace_command, circuit_command

    out = []
    s = attn_trace_command("days", CALENDAR, n=8, batch_size=8, labels="tokens", root=str(tmp_path),
                           cache_dir=str(tmp_path / "cache"), echo=out.append)
    run = s["run_dir"]
    import networkx as nx

    from interpkit.analyses.attention_tracing import graphs as gr

    G = gr.read_graphml(next((tmp_path / "attn_trace").glob("*/graphs/prompt_*.graphml")))
    roles = {a["dest_role"] for _, a in G.nodes(data=True)}
    assert "end" not in roles and "is" in roles                              # token text, not task roles
    assert isinstance(G, nx.MultiDiGraph)
    sp = circuit_command("sparsity", run, echo=out.append)
    assert sp["q"]["rank"] == 16 and 1 <= sp["q"]["mean"] <= 16
    ctrl = circuit_command("control", run, max_prompts=4, echo=out.append)
    assert ctrl["firings"] > 0 and 0 <= ctrl["largest_cluster"]["recall"] <= 1
    circuit_command("intervene", run, max_prompts_per_edge=2, echo=out.append)
    circuit_command("prune", run, min_prompts=2, min_effect=0.0, echo=out.append)
    sw = circuit_command("sweep", run, min_prompts=2, thresholds=[0.0, 0.5, 100.0], max_prompts=4,
                         reference=str(_ref_file(tmp_path)), echo=out.append)
    rows = sw["rows"]
    assert rows[0]["heads"] >= rows[-1]["heads"] and rows[-1]["edges"] <= rows[0]["edges"]
    assert abs(sw["model_logit_diff"]) > abs(sw["ablated_logit_diff"])
    cmp = circuit_command("compare", run, reference=str(_ref_file(tmp_path)), echo=out.append)
    assert 0 <= cmp["f1"] <= 1 and (tmp_path / "attn_trace").exists()
    for f in sp["files"] + ctrl["files"] + cmp["files"]:
        assert __import__("pathlib").Path(f).stat().st_size > 0


def _ref_file(tmp_path):
    p = tmp_path / "calendar_ref.txt"
    p.write_text("1.0 1.1 1.2 1.3\n")
    return p


def test_faithfulness_of_all_heads_is_the_model():
    from interpkit.analyses.attention_tracing.faithfulness import ablated_logit_diff, head_means
    from interpkit.metrics import logit_diff
    from interpkit.tasks import get_task

    lm = calendar()
    prompts = get_task("days")(lm.tokenizer, n=8)
    means = head_means(lm, prompts)
    everything = {(l, h) for l in range(lm.arch.n_layers) for h in range(lm.arch.n_heads)}
    with torch.no_grad():
        logits = lm.hf(**prompts.batch()).logits[:, -1].float()
    ld = float(logit_diff(logits, prompts.answer_ids, prompts.wrong_ids).mean())
    assert abs(ablated_logit_diff(lm, prompts, means, everything) - ld) < 1e-4
    assert abs(ablated_logit_diff(lm, prompts, means, set()) - ld) > 1.0     # the heads matter


def test_omega_through_a_remote_session_equals_local():
    """Omega's factors and cores computed in ONE loopback-NDIF session (weights never read locally) equal the
    local ones, and tracing with them gives identical selections."""
    loopback = pytest.importorskip("interpkit.remote.loopback", reason="interpkit.remote.loopback not available")
    from interpkit.analyses.attention_tracing.remote_omega import omega_from_remote
    from interpkit.arch import Arch
    from interpkit.remote import ensure_shipped

    ensure_shipped()
    for family in ("gpt2", "llama"):
        lm = tiny(family)
        with torch.device("meta"):                                 # the client's model has no weights
            meta_hf = type(lm.hf)(lm.hf.config)
        rlm = dataclasses.replace(lm, remote=True, arch=Arch.from_hf(meta_hf, lm.arch.family))
        local = Omega(lm.arch, center=True)
        with loopback.LoopbackNDIF(lm.model) as server:
            remote = omega_from_remote(rlm, center=True, frame_dtype=torch.float64)
            assert server.n_requests == 1                          # all layers in one session
            wire32 = omega_from_remote(rlm, center=True)            # default: d x d_head frames as float32
        a32, a64 = wire32.factors(1).W_Q, local.factors(1).W_Q
        assert (a32 - a64).abs().max() < 1e-5 * a64.abs().max()
        for layer in range(lm.arch.n_layers):
            a, b = local.factors(layer), remote.factors(layer)
            for name in ("W_Q", "W_K", "b_Q", "b_K", "RA", "RKa", "RQa"):     # local folding runs in float32
                x, y = getattr(a, name), getattr(b, name)
                assert (x - y).abs().max() < 1e-6 * (1 + x.abs().max()), (family, name)
            assert a.scale == b.scale
        for side in ("q", "k"):
            for delta in (0, 3):
                sa, sb = local.core(side, delta)[1], remote.core(side, delta)[1]
                assert (sa - sb).abs().max() < 1e-6 * sa.max()
        from interpkit.tasks import get_task

        prompts = get_task("ioi")(lm.tokenizer, n=1, seed=0)
        acts, w = collect(lm, prompts.batch()), load_weights(lm.arch)
        da, db = decompose(local, w, acts, 0), decompose(remote, w, acts, 0)
        for l, h, d, s in _edges(da, lm.arch.n_layers, lm.arch.n_heads, every=7)[:30]:
            for side in ("q", "k"):
                assert edge_signal(local, da, l, h, d, s, side, 1.0, 5).selected.tolist() == \
                    edge_signal(remote, db, l, h, d, s, side, 1.0, 5).selected.tolist()
