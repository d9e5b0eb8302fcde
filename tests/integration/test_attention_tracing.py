"""Attention-causal tracing (analyses/attention_tracing): Omega, signals, tracing, interventions, graphs."""
from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from interpkit.analyses.attention_tracing import graphs as gr
from interpkit.analyses.attention_tracing.decompose import collect, contributions, decompose, load_weights, logit_direction
from interpkit.analyses.attention_tracing.interventions import Edit, apply_edits, decompose_prompts, signal_removal
from interpkit.analyses.attention_tracing.omega import Omega
from interpkit.analyses.attention_tracing.reference import trace_prompt_reference
from interpkit.analyses.attention_tracing.signals import edge_signal, minimal_set, relative_scores
from interpkit.analyses.attention_tracing.trace import AttnTraceConfig, trace_prompt, trace_prompts
from tests.conftest import sharp, tiny



@functools.lru_cache(maxsize=None)
def ioi(family: str, n: int = 8):
    from interpkit.tasks import get_task

    return get_task("ioi")(tiny(family).tokenizer, n=n, seed=0)


def _edges(G) -> dict:
    return {(u, v, k): w for u, v, k, w in G.edges(keys=True, data="weight")}


def _same_graphs(a, b, tol=1e-9) -> None:
    assert len(a) == len(b)
    for g, h in zip(a, b):
        assert (g is None) == (h is None)
        if g is None:
            continue
        ea, eb = _edges(g), _edges(h)
        assert set(ea) == set(eb)
        assert max([abs(ea[k] - eb[k]) for k in ea] + [0.0]) <= tol


# -- Omega and signals ----------------------------------------------------------------------------
def _model_scores(lm, inputs):
    """The model's own pre-softmax (pre-softcap) scores from its rotated q/k, and its patterns."""
    a = lm.arch
    with torch.no_grad(), lm.model.trace(inputs):
        qs, ks, pats = list().save(), list().save(), list().save()
        for layer in range(a.n_layers):
            args = lm.model.layers[layer].attn.source.attention_interface_1.inputs[0]
            qs.append(args[1].detach().clone())
            ks.append(args[2].detach().clone())
            pats.append(lm.model.layers[layer].attn.output[1].detach().clone())
    kv = torch.tensor([a.kv_head(h) for h in range(a.n_heads)])
    scores = [torch.einsum("bhqe,bhke->bhqk", q.double(), k[:, kv].double()) * a.qk(l).scale
              for l, (q, k) in enumerate(zip(qs, ks))]
    return scores, list(pats)


def _relative(x: torch.Tensor) -> torch.Tensor:
    """x[s] minus the mean of the other entries, for every s."""
    n = x.shape[-1]
    return x - (x.sum(-1, keepdim=True) - x) / (n - 1)


def test_omega_reproduces_relative_scores(lm):
    """Sum of Omega components (+ bias term) = the model's own relative pre-softmax scores, both sides."""
    inputs = ioi(lm.arch.family.name, 2).batch()
    omega, w = Omega(lm.arch), load_weights(lm.arch)
    acts = collect(lm, inputs)
    scores, pats = _model_scores(lm, inputs)
    worst = {"q": 0.0, "k": 0.0, "pattern": 0.0}
    for row in range(2):
        dec = decompose(omega, w, acts, row)
        o = dec.offset
        for layer in range(lm.arch.n_layers):
            cap = omega.factors(layer).softcap
            for head in range(lm.arch.n_heads):
                for d in range(1, dec.n):
                    own = scores[layer][row, head, o + d, o:o + d + 1]
                    capped = cap * torch.tanh(own / cap) if cap else own
                    logp = pats[layer][row, head, o + d, o:o + d + 1].double().log()
                    worst["pattern"] = max(worst["pattern"], float((_relative(capped) - _relative(logp)).abs().max()))
                    for side in ("q", "k"):
                        comps, bias = relative_scores(omega, dec, layer, head, d, side)
                        err = (comps.sum(-1) + bias - _relative(own)).abs().max()
                        worst[side] = max(worst[side], float(err))
    print(lm.arch.family.name, {k: f"{v:.1e}" for k, v in worst.items()})
    assert max(worst.values()) < 1e-4


def test_factored_svd_is_the_svd_of_omega(lm):
    omega = Omega(lm.arch)
    for side in ("q", "k"):
        for delta in (0, 3):
            U, S, V = omega.svd(1, 3, side, delta)
            dense = omega.matrix(1, 3, side, delta)
            assert U.shape[1] == lm.arch.d_head
            assert ((U * S) @ V.T - dense).abs().max() < 1e-10 * dense.abs().max()
            assert (U.T @ U - torch.eye(U.shape[1], dtype=U.dtype)).abs().max() < 1e-10
            assert torch.allclose(S, torch.linalg.svdvals(dense)[: lm.arch.d_head], atol=1e-10)
    if lm.arch.rotary:
        assert not torch.allclose(omega.matrix(1, 3, "q", 0), omega.matrix(1, 3, "q", 3))


@pytest.mark.parametrize("share", [0.5, 0.8, 1.0])
def test_selected_components_reach_the_share(share):
    lm = sharp("neox")
    omega, w = Omega(lm.arch), load_weights(lm.arch)
    dec = decompose(omega, w, collect(lm, ioi("neox", 1).batch()), 0)
    checked = 0
    for layer, head, d, s in [(1, 0, dec.n - 1, 2), (2, 3, dec.n - 1, 5), (2, 1, 8, 8), (1, 2, 6, 0)]:
        for side in ("q", "k"):
            sig = edge_signal(omega, dec, layer, head, d, s, side, share)
            if sig.total <= 0:
                assert len(sig.selected) == 0
                continue
            chosen = sig.comps[sig.selected]
            assert chosen.sum() >= share * sig.total - 1e-12
            assert chosen[:-1].sum() < share * sig.total          # minimal: one fewer does not reach it
            assert torch.all(chosen[:-1] >= chosen[-1])           # the largest ones
            con = contributions(dec, layer, sig.positions, sig.B, sig.C, dec.sigma[layer, sig.positions])
            assert abs(con.total() - sig.selected_total) < 1e-6 * (1 + abs(sig.total))  # exact up to float32 acts
            checked += 1
    assert checked >= 4
    assert minimal_set(torch.tensor([-1.0, -2.0]), 1.0).numel() == 0


def test_seed_decomposition_is_the_logit_difference():
    lm = tiny("llama")
    prompts = ioi("llama", 2)
    omega, w = Omega(lm.arch), load_weights(lm.arch)
    acts = collect(lm, prompts.batch())
    for row in range(2):
        dec = decompose(omega, w, acts, row)
        direction, const = logit_direction(w, prompts.answer_ids[row], prompts.wrong_ids[row])
        end = dec.n - 1
        con = contributions(dec, lm.arch.n_layers, torch.tensor([end]), direction[:, None],
                            torch.ones(1, 1, dtype=torch.float64), dec.sigma_final[[end]])
        logits = acts["logits"][row]
        ld = logits[prompts.answer_ids[row, 0]] - logits[prompts.wrong_ids[row, 0]]
        assert abs(con.total() + const - float(ld)) < 1e-4


# -- tracing --------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "gemma2"])
def test_vectorised_trace_equals_loop_reference(family):
    lm = sharp(family)
    prompts = ioi(family, 4)
    omega, w = Omega(lm.arch), load_weights(lm.arch)
    acts = collect(lm, prompts.batch())
    cfg = AttnTraceConfig(require_correct=False, max_edges=6)
    compared = 0
    for row in range(4):
        dec = decompose(omega, w, acts, row)
        direction, _ = logit_direction(w, prompts.answer_ids[row], prompts.wrong_ids[row])
        labels = [f"p{i}" for i in range(dec.n)]
        G, _, _ = trace_prompt(omega, dec, direction, labels, cfg)
        R, _ = trace_prompt_reference(omega, dec, direction, labels, cfg, dense_svd=family == "gpt2")
        _same_graphs([G], [R], tol=1e-8)
        compared += G is not None and G.number_of_edges() > 1
    assert compared >= 1


def test_trace_graph_structure():
    lm = sharp("neox")
    res = trace_prompts(lm, ioi("neox"), AttnTraceConfig(require_correct=False, batch_size=8), omega=Omega(lm.arch))
    assert res.traced and len(res.records) > 0
    G = res.graphs[res.traced[0]]
    root = gr.root_of(G)
    assert G.nodes[root]["kind"] == "root" and G.nodes[root]["dest_role"] == "end"
    assert all(k in ("q", "k", "logit") for *_, k in G.edges(keys=True))
    for n, a in G.nodes(data=True):
        assert a["kind"] in gr.NODE_IDS and isinstance(a["layer"], int)
        if a["kind"] == "head" and G.in_degree(n):     # a traced head is above uniform attention
            assert G.nodes[n]["src_pos"] <= G.nodes[n]["dest_pos"]
    for u, v, k, data in G.edges(keys=True, data=True):
        assert data["side"] == k
        if k != "logit":
            assert G.nodes[u]["layer"] < G.nodes[v]["layer"]


# -- interventions --------------------------------------------------------------------------------
def test_mask_edit_equals_editing_the_head_input():
    """The score-change edit equals writing delta W_Q / delta W_K into the model's own query / key."""
    from interpkit.metrics import logit_diff

    for family, sides in (("gpt2", "qk"), ("llama", "q")):
        lm = sharp(family)
        prompts = ioi(family, 2).subset([0])
        omega = Omega(lm.arch)
        decs = decompose_prompts(lm, omega, prompts, [0])
        dec, (layer, head, s) = decs[0], (1, 2, 3)
        d = dec.n - 1
        g = torch.Generator().manual_seed(1)
        for side in sides:
            delta = 0.5 * torch.randn(lm.arch.d_model, generator=g, dtype=torch.float64)
            df = apply_edits(lm, omega, prompts, [Edit(0, layer, head, d, s, side, delta, {})], decs=decs)
            f = omega.factors(layer)
            add = (delta @ (f.W_Q if side == "q" else f.W_K)[head]).float()
            pos = d if side == "q" else s
            with torch.no_grad(), lm.model.trace(prompts.batch()):
                attn = lm.model.layers[layer].attn
                if family == "gpt2":
                    args = attn.source.attention_interface_1.inputs[0]
                    (args[1] if side == "q" else args[2])[0, head, pos] += add
                else:
                    out = attn.source.self_q_proj_0.output
                    out[0, pos, head * 16:(head + 1) * 16] += add
                a = attn.output[1][0, head, d, s].save()
                ld = logit_diff(lm.model.output.logits[:, -1].float(), prompts.answer_ids, prompts.wrong_ids).save()
            assert abs(df.attn_edited[0] - float(a)) < 1e-5
            assert abs(df.logit_diff_edited[0] - float(ld)) < 1e-4


@pytest.mark.parametrize("family", ["neox", "llama", "gemma2"])
def test_signal_removal_lowers_attention_random_does_not(family):
    lm = sharp(family, 0.1)
    prompts = ioi(family)
    omega = Omega(lm.arch)
    res = trace_prompts(lm, prompts, AttnTraceConfig(require_correct=False, batch_size=8), omega=omega)
    df = signal_removal(lm, omega, prompts, res.records, max_edges=40)
    rem, rnd = df[df["mode"] == "remove"], df[df["mode"] == "random"]
    print(f"\n{family}: {len(rem)} edge sides; remove signal: mean dA {rem.d_attn.mean():+.4f} "
          f"(lowered in {100 * (rem.d_attn < 0).mean():.0f}%), mean |dLD| {rem.d_logit_diff.abs().mean():.4f}; "
          f"random equal-size: mean dA {rnd.d_attn.mean():+.4f}, mean |dA| {rnd.d_attn.abs().mean():.4f}, "
          f"mean |dLD| {rnd.d_logit_diff.abs().mean():.4f}; "
          f"subspace sizes {rem.n_signal.mean():.1f}/{rem['rank'].iloc[0]}")
    assert len(rem) >= 4
    assert rem.d_attn.mean() < 0 and (rem.d_attn < 0).mean() >= 0.9
    assert rnd.d_attn.abs().mean() < 0.3 * rem.d_attn.abs().mean()


# -- graphs ---------------------------------------------------------------------------------------
def _toy_graphs():
    graphs = []
    for pid, w in enumerate((1.0, 3.0)):
        G = gr.nx.MultiDiGraph(prompt=pid)
        root = gr.node("root", 3, -1, "end", "", 9)
        a = gr.node("head", 2, 1, "end", "IO", 9, 2)
        b = gr.node("head", 1, 0, "IO", "S1", 2, 1)
        m = gr.node("mlp", 0, -1, "IO", "", 2)
        gr.add_edge(G, a, root, "logit", w)
        gr.add_edge(G, b, a, "k", 0.5 * w)
        gr.add_edge(G, m, a, "k", 0.1)
        if pid == 1:
            gr.add_edge(G, gr.node("embed", -1, -1, "end", "", 9), a, "q", 0.2)
        graphs.append(G)
    return graphs


def test_graph_unify_prune_export_round_trip(tmp_path):
    import pandas as pd

    U = gr.unify(_toy_graphs(), [10, 11])
    e = U.edges["L1H0|IO|S1", "L2H1|end|IO", "k"]
    assert e["weight"] == pytest.approx(1.0) and e["n_prompts"] == 2
    assert gr.edge_prompts(U, "L1H0|IO|S1", "L2H1|end|IO", "k") == [10, 11]
    assert U.edges["EMB|end", "L2H1|end|IO", "q"]["weight"] == pytest.approx(0.1)
    assert U.nodes["EMB|end"]["frequency"] == 0.5
    for write, read, ext in ((gr.write_graphml, gr.read_graphml, "graphml"),
                             (gr.write_cytoscape, gr.read_cytoscape, "cyjs")):
        back = read(write(U, tmp_path / f"u.{ext}"))
        assert set(back.nodes) == set(U.nodes) and _edges(back) == pytest.approx(_edges(U))
        assert dict(back.nodes(data=True)) == dict(U.nodes(data=True))
        assert list(back.edges(keys=True, data=True)) == list(U.edges(keys=True, data=True))
    effects = pd.DataFrame([dict(up="L1H0|IO|S1", down="L2H1|end|IO", side="k", mode="remove", d_logit_diff=-0.5,
                                 d_attn=-0.2),
                            dict(up="MLP0|IO", down="L2H1|end|IO", side="k", mode="remove", d_logit_diff=-0.01,
                                 d_attn=0.0),
                            dict(up="EMB|end", down="L2H1|end|IO", side="q", mode="remove", d_logit_diff=-0.9,
                                 d_attn=-0.1)])
    C = gr.prune_circuit(U, effects, min_prompts=2, min_effect=0.2)
    assert set(C.nodes) == {"LOGITS|end", "L2H1|end|IO", "L1H0|IO|S1"}   # MLP: weak; EMB: 1 prompt
    assert C.edges["L1H0|IO|S1", "L2H1|end|IO", "k"]["abs_avg_logit_diff"] == pytest.approx(0.5)
    assert gr.circuit_components(C) == {(2, 1), (1, 0)}
    assert gr.plot_circuit(C, tmp_path / "c.png").stat().st_size > 1000
    assert len(gr.prune_by_frequency(U, 0.6)) == len(U) - 1


def test_precision_recall_f1_hand_example():
    from interpkit.analyses.attention_tracing.reference_circuits import IOI_GPT2_WANG2022, reference_heads

    ref = reference_heads("ioi-gpt2-wang2022")
    assert len(ref) == 26 and sum(len(v) for v in IOI_GPT2_WANG2022.values()) == 26
    ours = {(9, 9), (10, 0), (5, 5), (1, 1)}                 # 3 in the circuit, 1 not
    s = gr.compare(ours, ref)
    assert s["precision"] == pytest.approx(3 / 4) and s["recall"] == pytest.approx(3 / 26)
    assert s["f1"] == pytest.approx(2 * 0.75 * (3 / 26) / (0.75 + 3 / 26))
    assert gr.compare(set(), ref)["f1"] == 0.0


# -- cache, remote, commands ----------------------------------------------------------------------
def test_omega_disk_cache(tmp_path):
    lm = tiny("neox")
    a = Omega(lm.arch, "tiny:neox", None, cache_dir=tmp_path)
    cores = [a.core("q", d) for d in (0, 1, 5)]
    a.save()
    b = Omega(lm.arch, "tiny:neox", None, cache_dir=tmp_path)
    assert {("q", 0), ("q", 1), ("q", 5)} <= set(b._cores)
    for d, c in zip((0, 1, 5), cores):
        for x, y in zip(b.core("q", d), c):
            assert (x - y).abs().max() < 1e-5
    other = sharp("neox")                                     # same id, other weights: not reused
    with pytest.warns(UserWarning, match="other weights"):
        o = Omega(other.arch, "tiny:neox", None, cache_dir=tmp_path)
    assert not o._cores


def _traced_locally():
    """(model, prompts, Omega, config, local result) of the remote-equality tests."""
    lm = sharp("neox")
    prompts, omega = ioi("neox", 4), Omega(lm.arch)
    cfg = AttnTraceConfig(require_correct=False, batch_size=4)
    return lm, prompts, omega, cfg, trace_prompts(lm, prompts, cfg, omega=omega)


def test_remote_local_roundtrip_identical_graphs():
    """nnsight's serialize/deserialize path (remote='local') gives identical graphs and interventions."""
    lm, prompts, omega, cfg, local = _traced_locally()
    remote = trace_prompts(dataclasses.replace(lm, remote="local"), prompts, cfg, omega=omega)
    _same_graphs(local.graphs, remote.graphs, tol=0.0)


def test_remote_loopback_identical_graphs():
    """Through the loopback NDIF server (real RemoteBackend, NDIF import whitelist): identical graphs."""
    loopback = pytest.importorskip("interpkit.remote.loopback", reason="interpkit.remote.loopback not available")
    from interpkit.remote import ensure_shipped

    ensure_shipped()                                          # as load_model does: NDIF lacks our modules
    lm, prompts, omega, cfg, local = _traced_locally()
    edits_local = signal_removal(lm, omega, prompts, local.records, max_edges=5)
    with loopback.LoopbackNDIF(lm.model) as server:
        rlm = dataclasses.replace(lm, remote=True)
        remote = trace_prompts(rlm, prompts, cfg, omega=omega)
        edits_remote = signal_removal(rlm, omega, prompts, local.records, max_edges=5)
        assert server.n_requests >= 3                         # 1 trace per batch + decompositions + edits
    _same_graphs(local.graphs, remote.graphs, tol=0.0)
    assert (edits_local.d_attn - edits_remote.d_attn).abs().max() < 1e-6


def test_edge_interventions_are_engine_forwards_one_remote_request():
    """Edge interventions are sweep-engine forwards (a ``ScoreAdd`` per edited layer, the patterns as
    readout records): several forwards equal the local run through nnsight's serialisation exactly, and
    through the loopback NDIF server in one request."""
    loopback = pytest.importorskip("interpkit.remote.loopback", reason="interpkit.remote.loopback not available")
    from interpkit.analyses.attention_tracing.interventions import edit_forward, signal_edits
    from interpkit.engine.inside import ATTN_PATTERN, ATTN_SCORES
    from interpkit.remote import ensure_shipped

    ensure_shipped()
    lm, prompts, omega, _, local = _traced_locally()
    recs = [r for r in local.records if r["n_selected"] > 0][:6]
    decs = decompose_prompts(lm, omega, prompts, [r["prompt"] for r in recs])
    edits = []
    for r in recs:
        edits += signal_edits(omega, decs[r["prompt"]], r["prompt"], r["layer"], r["head"], r["dest"], r["src"],
                              r["side"], 1.0)
    plan = edit_forward(lm, omega, prompts, [(edits[0].prompt, edits[:1])], decs)
    assert [w.site for w in plan.forward.writes] == [ATTN_SCORES]
    assert plan.forward.readout.records == [(ATTN_PATTERN, edits[0].layer)] and plan.row_edit == [None, edits[0]]
    want = apply_edits(lm, omega, prompts, edits, max_rows=4, decs=decs)
    assert len(want) == len(edits) > 4                                    # several forwards
    got = apply_edits(dataclasses.replace(lm, remote="local"), omega, prompts, edits, max_rows=4, decs=decs)
    assert want.equals(got)
    with loopback.LoopbackNDIF(lm.model) as server:
        got = apply_edits(dataclasses.replace(lm, remote=True), omega, prompts, edits, max_rows=4, decs=decs)
        assert server.n_requests == 1
    for col in ("attn_edited", "logit_diff_edited", "d_attn"):
        assert (want[col] - got[col]).abs().max() < 1e-6


def test_commands_end_to_end(tmp_path):
    from interpkit.analyses.attention_tracing.command import attn_trace_command, circuit_command
    from interpkit.errors import UserError

    out = []
    s = attn_trace_command("ioi", "tiny:llama", n=6, batch_size=3, require_correct=False, root=str(tmp_path),
                           cache_dir=str(tmp_path / "cache"), echo=out.append)
    run = s["run_dir"]
    assert s["traced"] >= 1 and any(f.endswith("unified.graphml") for f in s["files"])
    again = attn_trace_command("ioi", "tiny:llama", n=6, batch_size=3, require_correct=False, root=str(tmp_path),
                               cache_dir=str(tmp_path / "cache"), echo=out.append)   # resumes from the store
    assert again["traced"] == s["traced"]
    assert circuit_command("unify", run, echo=out.append)["edges"] > 0
    assert circuit_command("intervene", run, max_prompts_per_edge=2, echo=out.append)["rows"] > 0
    pruned = circuit_command("prune", run, min_prompts=1, min_effect=0.0, echo=out.append)
    assert pruned["nodes"] >= 2
    scores = circuit_command("compare", run, echo=out.append)
    assert 0 <= scores["f1"] <= 1
    with pytest.raises(UserError, match="not an attn-trace run"):
        circuit_command("unify", str(tmp_path), echo=out.append)
