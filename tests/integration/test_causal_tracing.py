"""Causal tracing: identities on every tiny family, equality with a plain-hook ROME implementation,
severed runs, token groups, noise, the stored/resumable CLI run and the loopback-remote path."""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import pytest
import torch

from interpkit.analyses.causal_tracing import command as CC
from interpkit.analyses.causal_tracing import trace as CT
from interpkit.errors import UserError
from tests.references.causal_tracing_ref import ReferenceTracer
from tests.conftest import FAMILIES, sharp, tiny

SHIPPED = Path(__file__).resolve().parents[2] / "artifacts" / "models" / "synthetic-facts-gpt2"


# larger weights than the attention tests' (indirect effects far from zero), frozen as NDIF serves them
sharp_frozen = functools.partial(sharp, init=0.3, seed=1, frozen=True)


@functools.lru_cache(maxsize=None)
def facts(family: str, n: int = 2):
    from interpkit.tasks.known_facts import build

    return build(tiny(family).tokenizer, n=n, seed=3)


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param



def test_token_groups():
    g = CT.token_groups(10, 2, 4)
    assert g == {"first_subject": [2], "middle_subject": [3], "last_subject": [4], "first_subsequent": [5],
                 "further": [6, 7, 8], "last": [9]}
    one = CT.token_groups(5, 1, 1)                      # one-token subject: both first and last subject
    assert one["first_subject"] == one["last_subject"] == [1] and one["middle_subject"] == []
    tight = CT.token_groups(5, 0, 3)                    # subject right before the last token
    assert tight["first_subsequent"] == [] and tight["further"] == [] and tight["last"] == [4]
    assert CT.position_groups(6, 1, 2) == ["before_subject", "first_subject", "last_subject",
                                           "first_subsequent", "further", "last"]


def test_groups_on_known_facts():
    lm = tiny("gpt2")
    ps = facts("gpt2", 6)
    for f, subject in zip(CT.facts_of(ps), ps.meta["subject"]):
        text = lm.tokenizer.decode(f.ids[f.subject_first:f.subject_last + 1])
        assert text.strip() == subject.strip()
        assert f.ids[-1] == ps.input_ids[f.index, -1]


@pytest.mark.parametrize("engine", ["batched", "prefix"])
def test_restore_everything_gives_clean_exactly(family, engine):
    """Bit-exact in the batched engine; the prefix engine computes the last layer's MLP at the read
    position alone (``MlpTail``), a matmul of another shape, so float32 rounding (~1e-8) remains."""
    lm = sharp_frozen(family)
    L = lm.arch.n_layers

    def restorations(f):
        T = len(f.ids)
        per_layer = [(tuple((l, "hidden", t, "clean") for t in range(T)),) for l in range(L)]
        every = (tuple((l, "hidden", t, "clean") for l in range(L) for t in range(T)),)
        return per_layer + [every]

    cfg = CT.TraceConfig(noise=1.0, engine=engine)
    for tr in CT.trace_facts(lm, CT.facts_of(facts(family)), cfg, 1.0, restorations=restorations):
        assert abs(tr.high - tr.low) > 1e-3                         # the noise does something ...
        assert (tr.scores - tr.high).abs().max().item() <= (0.0 if engine == "batched" else 1e-6)   # ... and restoring all undoes it


@pytest.mark.parametrize("engine", ["batched", "prefix"])
def test_zero_noise_gives_zero_ie(family, engine):
    """Exactly zero when restored rows share the forward with the corrupted ones (batched); the prefix
    engine recomputes suffixes in other shapes, so float32 rounding (~1e-7) remains."""
    lm = sharp_frozen(family)
    cfg = CT.TraceConfig(noise=0.0, severed=True, window=2, engine=engine)
    tr = CT.run_causal_tracing(lm, facts(family, 1), cfg).facts[0]
    assert tr.high == tr.low
    assert tr.ie.abs().max().item() <= (0.0 if engine == "batched" else 1e-6)


GROUPINGS = {"model": None, "exact": (0, 0), "fewest": (1e12, 0)}   # the planner's forward costs


@pytest.mark.parametrize("engine, grouping", [("batched", "model"), ("prefix", "model"), ("prefix", "fewest"),
                                              ("prefix", "exact")])
def test_equals_plain_hook_reference(family, engine, grouping, monkeypatch):
    """All kinds incl. severed, split over several forwards (max_rows), against ROME's one-forward-per-
    restoration procedure with plain forward hooks and the same noise; the prefix engine with its
    default grouping, with one forward per distinct start and with as few forwards as max_rows allows."""
    from interpkit.engine.plan import ForwardCost

    if GROUPINGS[grouping] is not None:
        monkeypatch.setattr(ForwardCost, "for_model", classmethod(lambda cls, arch: cls(*GROUPINGS[grouping])))
    lm = sharp_frozen(family)
    ps = facts(family, 1)
    cfg = CT.TraceConfig(noise="3sigma", severed=True, window=2, samples=3, max_rows=100, engine=engine)
    res = CT.run_causal_tracing(lm, ps, cfg)
    f, tr = CT.facts_of(ps)[0], res.facts[0]
    ref = ReferenceTracer(lm.hf, f.ids, (f.subject_first, f.subject_last),
                          CT.fact_noise(cfg, f, lm.arch.d_model, res.noise_level))
    table = ref.table(cfg.all_kinds(), cfg.window)
    high, low = ref.high_low()
    assert ref.answer == tr.answer_id
    assert abs(high - tr.high) < 1e-5 and abs(low - tr.low) < 1e-5
    assert (table - tr.scores).abs().max().item() < 1e-5
    assert tr.ie.abs().max().item() > 1e-2                           # the comparison is not vacuous


def test_severed_runs():
    lm = sharp_frozen("llama")
    cfg = CT.TraceConfig(noise=1.0, kinds=["hidden"], severed=True, samples=4)
    tr = CT.run_causal_tracing(lm, facts("llama", 1), cfg).facts[0]
    hidden, sev_mlp, sev_attn = tr.scores
    # nothing is left to hold after the last layer: severing there is a no-op
    assert torch.equal(hidden[:, -1], sev_mlp[:, -1]) and torch.equal(hidden[:, -1], sev_attn[:, -1])
    # earlier, holding the token's later MLP / attention outputs changes the outcome
    assert (hidden[:, :-1] - sev_mlp[:, :-1]).abs().max() > 1e-3
    assert (hidden[:, :-1] - sev_attn[:, :-1]).abs().max() > 1e-3
    # the same restoration written by hand as explicit writes
    L, t, l = lm.arch.n_layers, tr.subject_last, 0
    writes = ((l, "hidden", t, "clean"),) + tuple((j, "mlp", t, "corrupted") for j in range(L))
    manual = lambda f: [(writes,)]  # noqa: E731
    by_hand = CT.trace_facts(lm, CT.facts_of(facts("llama", 1)), cfg, 1.0, restorations=manual)[0]
    assert by_hand.scores.item() == sev_mlp[t, l].item()


def test_noise_is_fixed_per_fact_and_level_is_subject_std():
    lm = sharp_frozen("gpt2")
    ps = facts("gpt2", 3)
    one = CT.run_causal_tracing(lm, ps, CT.TraceConfig(kinds=["hidden"], samples=2, facts_per_chunk=1))
    # the same fact alone (other padding, other chunk) sees the same noise when the level is the same
    sub = CT.run_causal_tracing(lm, ps.subset([2]), CT.TraceConfig(kinds=["hidden"], samples=2),
                                subject_std=one.noise_level / 3)
    assert torch.equal(one.facts[2].scores, sub.facts[0].scores) and one.facts[2].low == sub.facts[0].low
    # 3 sigma = 3 x std of the subject tokens' embeddings, pooled over tokens and dimensions
    emb = lm.hf.get_input_embeddings()
    vecs = torch.cat([emb(f.ids[f.subject_first:f.subject_last + 1]) for f in CT.facts_of(ps)])
    assert abs(one.noise_level - 3 * vecs.std().item()) < 1e-6
    # the dataset pass's top-1 on left-padded prompts is each unpadded prompt's own top-1
    std, top1 = CT.dataset_pass(lm, ps)
    assert top1.tolist() == [t.answer_id for t in one.facts] and abs(3 * std - one.noise_level) < 1e-12
    f0 = CT.facts_of(ps)[0]
    u = CT.fact_noise(CT.TraceConfig(uniform=True), f0, 8, 0.5)
    assert u.abs().max() <= 0.5 and u.shape == (10, f0.subject_last - f0.subject_first + 1, 8)


def test_aggregation_and_dataframes():
    lm = sharp_frozen("neox")
    res = CT.run_causal_tracing(lm, facts("neox", 2), CT.TraceConfig(noise=1.0, window=2, samples=2))
    agg = res.aggregate()
    K, L = len(res.kinds), lm.arch.n_layers
    assert agg["aie"].shape == (K, 6, L)
    tr = res.facts[0]
    last = CT.GROUPS.index("last")
    expect = torch.stack([f.scores[:, -1] - f.low for f in res.facts]).mean(0)
    assert torch.allclose(agg["aie"][:, last], expect)
    df = res.to_dataframe()
    assert len(df) == K * 6 * L and {"kind", "group", "layer", "aie", "lo", "hi", "n"} <= set(df.columns)
    assert len(tr.to_dataframe()) == K * len(tr.tokens) * L


def test_config_yaml(tmp_path):
    p = tmp_path / "trace.yaml"
    p.write_text("noise: 0.05\nsamples: 4\nkinds: [hidden, mlp]\nuniform: true\n")
    cfg = CC.load_config(str(p), samples=6)
    assert cfg.noise == 0.05 and cfg.samples == 6 and cfg.kinds == ["hidden", "mlp"] and cfg.uniform
    p.write_text("nosie: 3\n")
    with pytest.raises(UserError, match="unknown key"):
        CC.load_config(str(p))
    with pytest.raises(UserError, match="noise"):
        CC.load_config(None, noise="loud")


@pytest.mark.skipif(not SHIPPED.exists(), reason="shipped synthetic-facts model missing")
def test_command_stores_resumes_and_plots(tmp_path):
    lines: list[str] = []
    kw = dict(model=str(SHIPPED), facts=2, task="synthetic_facts", kind="hidden", samples=2, root=str(tmp_path),
              echo=lines.append)
    first = CC.causal_trace_command(**kw, config=None)
    run = next((tmp_path / "causal_tracing").iterdir())
    assert (run / "results.h5").exists() and (run / "causal_trace_heatmap.png").exists()
    assert (run / "causal_trace_lines.png").exists() and (run / "aie.csv").exists()
    assert any(line.startswith("chunk 0") for line in lines)
    lines.clear()
    again = CC.causal_trace_command(**kw, config=None)              # resumes: nothing recomputed
    assert not any(line.startswith("chunk") for line in lines)
    assert torch.equal(first.facts[1].scores, again.facts[1].scores)
    assert first.facts[1].tokens == again.facts[1].tokens


@pytest.mark.parametrize("engine", ["prefix", "batched"])
def test_loopback_remote_is_identical(engine):
    from interpkit.remote import loopback

    lm = sharp_frozen("gemma2")
    ps = facts("gemma2", 2)
    cfg = CT.TraceConfig(noise="3sigma", window=2, samples=3, severed=True, facts_per_chunk=2, max_rows=200,
                         engine=engine)
    local = CT.run_causal_tracing(lm, ps, cfg)
    with loopback.LoopbackNDIF(lm.model) as server:
        remote_lm = dataclasses.replace(lm, remote=True)
        before = server.n_requests
        remote = CT.run_causal_tracing(remote_lm, ps, cfg)
        n_requests = server.n_requests - before
    assert n_requests == 2                      # one for the dataset pass (3 sigma), one for the chunk of facts
    assert remote.noise_level == local.noise_level
    for a, b in zip(local.facts, remote.facts):
        assert torch.equal(a.scores, b.scores) and a.low == b.low and a.high == b.high


def test_prefix_plan_skips_what_cannot_change():
    """The prefix engine's plan: restorations before the subject, or at the last layer away from the last
    token, are not computed; clipped windows that coincide are computed once; what is computed starts at
    the restored token and (hidden) after the restored layer."""
    from interpkit.analyses.causal_tracing.prefix import FactShape, first_layer, plan_fact
    from interpkit.engine.plan import ForwardCost

    T, L, a, S = 9, 6, 2, 10
    rest = CT.grid(list(CT.BASE_KINDS), T, L)
    shape = FactShape(T, a, L, window=10, samples=S, max_rows=1024, cost=ForwardCost(0, 0))
    plan = plan_fact(rest, shape)
    src = dict(zip(rest, plan.source))
    assert all(src[(k, t, l)] == ("low",) for k in CT.BASE_KINDS for t in range(a) for l in range(L))
    assert all(src[("hidden", t, L - 1)] == ("low",) for t in range(a, T - 1))
    assert src[("hidden", T - 1, L - 1)] == ("high",)
    assert src[("mlp", 4, 1)] == src[("mlp", 4, 2)]                    # both windows clip to all 6 layers
    assert src[("mlp", 4, 0)] == src[("mlp", 4, 1)]                    # layers 0-4 vs 0-5, but 5 is a no-op
    assert src[("mlp", T - 1, 0)] != src[("mlp", T - 1, 1)] != src[("attn", T - 1, 1)]   # ... not at the last token
    for chunk in plan.chunks:                                # no fixed costs: one chunk per (token, layer) start
        for u in chunk.items:
            w = plan.unique[u]
            assert chunk.p0 == min(x[2] for x in w) and chunk.l0 == first_layer(w)
    assert first_layer(plan.unique[src[("hidden", 3, 2)][1]]) == 3
    work = sum(len(c.items) * (T - c.p0) * (L - c.l0) for c in plan.chunks) / (len(rest) * T * L)
    assert work < 0.2, work
    coarse = plan_fact(rest, dataclasses.replace(shape, cost=ForwardCost(1e12, 0)))      # fixed costs dominate: one forward
    assert [(c.p0, c.l0) for c in coarse.chunks] == [(a, 0)] and coarse.source == plan.source


@pytest.mark.parametrize("engine", ["prefix", "batched"])
def test_remote_local_is_the_serialisation_round_trip(engine):
    """``remote="local"`` runs through nnsight's serialise/deserialise round trip in this process, never
    through NDIF (no server is running here), and gives the local numbers."""
    lm = sharp_frozen("llama")
    ps = facts("llama", 1)
    cfg = CT.TraceConfig(noise="3sigma", window=2, samples=2, engine=engine)
    local = CT.run_causal_tracing(lm, ps, cfg)
    rt = CT.run_causal_tracing(dataclasses.replace(lm, remote="local"), ps, cfg)
    assert rt.noise_level == local.noise_level
    for a, b in zip(local.facts, rt.facts):
        assert (a.scores - b.scores).abs().max().item() < 1e-6 and a.low == pytest.approx(b.low, abs=1e-6)


@pytest.mark.parametrize("engine", ["prefix", "batched"])
def test_remote_local_round_trip_runs_the_engine_and_equals_local(engine, monkeypatch):
    """Causal tracing with ``remote="local"`` goes through the engine's one session per chunk of facts:
    each is serialised and deserialised (with our modules hidden, so the engine's records and trace
    code must travel by value) and run here, never sent to a server, and the numbers equal the local
    run's exactly."""
    from nnsight.intervention.backends import local as simulated
    from nnsight.intervention.backends import remote as ndif
    from nnsight.schema.request import RequestModel

    lm = sharp_frozen("neox")
    ps = facts("neox", 2)
    cfg = CT.TraceConfig(noise="3sigma", window=2, samples=2, severed=True, facts_per_chunk=2, engine=engine)
    local = CT.run_causal_tracing(lm, ps, cfg)

    payloads = []
    real_serialize = RequestModel.serialize

    def serialize(*args, **kwargs):
        blob = real_serialize(*args, **kwargs)
        payloads.append(len(blob))
        return blob

    def no_server(*args, **kwargs):
        raise AssertionError("remote='local' reached the NDIF backend")

    monkeypatch.setattr(RequestModel, "serialize", staticmethod(serialize))
    monkeypatch.setattr(ndif.RemoteBackend, "__call__", no_server)
    calls = []
    real_call = simulated.LocalSimulationBackend.__call__
    monkeypatch.setattr(simulated.LocalSimulationBackend, "__call__",
                        lambda self, tracer: calls.append(1) or real_call(self, tracer))
    rt = CT.run_causal_tracing(dataclasses.replace(lm, remote="local"), ps, cfg)
    assert len(calls) == len(payloads) == 2          # the dataset pass (3 sigma), then the chunk of facts
    assert rt.noise_level == local.noise_level
    for a, b in zip(local.facts, rt.facts):
        assert torch.equal(a.scores, b.scores) and (a.low, a.high, a.answer_id) == (b.low, b.high, b.answer_id)
    assert local.facts[0].ie.abs().max().item() > 1e-2                  # the comparison is not vacuous
