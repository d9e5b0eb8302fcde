"""Circle probe and interventions: exact on planted circles, equal to a plain-hook reference, and (when the
shipped calendar-demo model is present) finding and using its circle."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from interpkit.analyses.circles.features import CircleConfig, circle_targets, fit_circle, run_circles
from interpkit.errors import UserError
from interpkit.remote.loopback import frozen
from tests.conftest import calendar_lm, server_threads

DEMO = Path(__file__).resolve().parents[2] / "artifacts" / "models" / "calendar-demo"


def _planted(period=7, n_other=7, d=32, L=3, layer=1, noise=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    values = torch.arange(period).repeat_interleave(n_other)
    acts = torch.randn(len(values), L, d, generator=g)
    plane = torch.linalg.qr(torch.randn(d, 2, generator=g))[0]
    acts[:, layer] = 5 * circle_targets(values, period).float() @ plane.T + noise * torch.randn(len(values), d, generator=g)
    return acts, values


def test_circle_probe_recovers_a_planted_circle_only_where_planted():
    acts, values = _planted()
    fit = fit_circle(acts, values, 7, k=5)
    assert fit.r2[1] > 0.99 and fit.r2_heldout[1] > 0.99
    assert fit.r2_heldout[0] < 0.5 and fit.r2_heldout[2] < 0.5        # noise layers do not generalise
    # the circle patch points decode to their own value, and lie in the circle plane through the mean
    pts = fit.circle_points(1)
    assert torch.allclose(fit.predict(pts, 1), circle_targets(torch.arange(7), 7), atol=1e-6)
    assert fit.Q.shape == (3, 5, 2) and torch.allclose(fit.Q[1].T @ fit.Q[1], torch.eye(2, dtype=fit.Q.dtype), atol=1e-8)


def test_circle_probe_months_grid():
    acts, values = _planted(period=12, n_other=12, d=48, L=2, layer=0)
    fit = fit_circle(acts, values, 12, k=5)
    assert fit.r2[0] > 0.99 and fit.r2[1] < 0.3


def _hook_reference(lm, prompts, row: int, layer: int, vector: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """Candidate logits of one prompt with the residual entering block ``layer`` at the role replaced."""
    block = lm.arch.block(layer)
    pos = int(prompts.roles["start"][row])

    def pre(mod, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        h[:, pos] = vector

    hook = block.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            ids, mask = prompts.input_ids[row:row + 1], prompts.attention_mask[row:row + 1]
            out = lm.hf(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0))
    finally:
        hook.remove()
    return out.logits[0, -1, cand]


def test_interventions_equal_plain_hooks():
    from interpkit.analyses.circles.features import answer_candidates, meta_tensor
    from interpkit.analyses.probing.linear import collect_residuals
    from interpkit.tasks import get_task

    lm = calendar_lm()
    prompts = get_task("days")(lm.tokenizer)
    cfg = CircleConfig(layers=[0, 2], targets_per_problem=3, max_rows=450)   # several forwards
    res = run_circles(lm, prompts, cfg)
    assert res.logit_diff.shape == (4, 2) and res.flip_rate.shape == (4, 2) and res.n_runs == 2 * 4 * 49 * 3
    assert res.timings["forwards"] > 1

    # recompute some runs with plain PyTorch hooks and the same replacement vectors
    acts = collect_residuals(lm, prompts, prompts.roles["start"])
    c = meta_tensor(prompts, "c")
    cand = answer_candidates(prompts, c, 7)
    fit = res.fit
    for li, layer in enumerate([0, 2]):
        V = fit.V[layer].float()
        for r in range(0, len(res.runs), 30):                           # 5 of the 147 runs per layer
            i, t, j = res.runs[r].tolist()
            x, xj = acts[i, layer], acts[j, layer]
            vecs = {"circle": fit.circle_points(layer)[t].float(), "layer": xj,
                    "pca": x + ((xj - x) @ V) @ V.T, "mean": fit.mean[layer].float()}
            for k, m in enumerate(res.methods):
                lg = _hook_reference(lm, prompts, i, layer, vecs[m], cand)
                expect = float(lg[c[i]] - lg[c[j]])
                assert abs(float(res.run_logit_diff[k, li, r]) - expect) < 1e-4, (m, layer, r)
    assert torch.allclose(res.logit_diff, res.run_logit_diff.mean(-1))


def test_circle_edits_are_engine_writes():
    """Each intervention method is one engine ``Write`` (interpkit.engine.inside), whose new fields do what
    the methods need: rows of a value table (``take``), sources at other positions (``src_pos``) and a
    replaced subspace component (``basis``); the final residual is the ``final_in`` site."""
    from interpkit.analyses.circles.features import circle_writes
    from interpkit.engine.inside import FINAL_IN, Write, apply_write, fill_write

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, 8, generator=g)
    table = torch.randn(3, 8, generator=g)
    V = torch.linalg.qr(torch.randn(8, 2, generator=g))[0]
    rows, pos, src, spos, take = (torch.tensor(v) for v in ([3, 4], [1, 2], [0, 1], [4, 0], [2, 0]))
    for w, expect in ((Write("resid_pre", 0, rows, pos=pos, value=table, take=take), table[take]),
                      (Write("resid_pre", 0, rows, pos=pos, src=src, src_pos=spos), x[src, spos]),
                      (Write("resid_pre", 0, rows, pos=pos, src=src, src_pos=spos, basis=V),
                       x[rows, pos] + ((x[src, spos] - x[rows, pos]) @ V) @ V.T),
                      (Write("resid_pre", 0, rows, pos=pos, value=table[0]), table[0].expand(2, -1))):
        y = x.clone()
        apply_write(y, w)
        assert torch.equal(y[rows, pos], expect)
        keep = torch.ones(6, 5, dtype=torch.bool)
        keep[rows, pos] = False
        assert torch.equal(y[keep], x[keep])
    rec = fill_write(Write("resid_pre", 0, rows, pos=pos, src=src, record=0, src_pos=spos, basis=V), [x], 0)
    assert torch.equal(rec.value, x[src, spos]) and rec.basis is V and rec.src is None

    lm = calendar_lm()
    L = lm.arch.n_layers
    fit = fit_circle(torch.randn(14, L + 1, lm.arch.d_model, generator=g), torch.arange(14) % 7, 7)
    part = [(layer, m, 0, 3, 5) for layer in (L, 0) for m in ("mean", "pca", "layer", "circle")]
    writes = circle_writes(part, 14, torch.arange(14), fit, L)
    assert [(w.site, w.layer) for w in writes] == [("resid_pre", 0)] * 4 + [(FINAL_IN, L)] * 4
    circle, layer, pca_, mean = writes[4:]
    assert torch.equal(circle.value[circle.take], fit.circle_points(L)[[3]].float())
    assert torch.equal(layer.src, torch.tensor([5])) and torch.equal(layer.src_pos, torch.tensor([5]))
    assert torch.equal(pca_.basis, fit.V[L].float()) and torch.equal(mean.value, fit.mean[L].float())
    assert torch.equal(mean.rows, torch.tensor([14])) and torch.equal(circle.rows, torch.tensor([14 + 3]))
    assert torch.equal(mean.pos, torch.tensor([0]))                            # problem 0's role position


def test_result_tables_and_plots(tmp_path):
    from interpkit.tasks import get_task

    lm = calendar_lm()
    prompts = get_task("months")(lm.tokenizer)
    res = run_circles(lm, prompts, CircleConfig(layers=[1], targets_per_problem=2, methods=("circle", "mean")))
    assert res.n_runs == 1 * 2 * 144 * 2
    df = res.to_dataframe()
    assert set(df["method"]) == {"circle", "mean", "none"}
    assert len(res.probe_dataframe()) == lm.arch.n_layers + 1
    for name, fn in (("r2", res.plot_r2), ("scatter", res.plot_scatter), ("iv", res.plot_interventions)):
        fn(tmp_path / f"{name}.png")
        assert (tmp_path / f"{name}.png").stat().st_size > 1000


def test_bad_options_are_user_errors():
    from interpkit.tasks import get_task

    lm = calendar_lm()
    prompts = get_task("days")(lm.tokenizer)
    with pytest.raises(UserError):
        run_circles(lm, prompts, CircleConfig(methods=("circle", "nope")))
    with pytest.raises(UserError):
        run_circles(lm, prompts, CircleConfig(role="end"))                # end: probe only
    with pytest.raises(UserError):
        run_circles(lm, prompts.subset(list(range(5))), CircleConfig())   # no partner problems
    assert run_circles(lm, prompts, CircleConfig(role="end", intervene=False)).logit_diff is None


@pytest.mark.skipif(not DEMO.exists(), reason="artifacts/models/calendar-demo not built")
@pytest.mark.parametrize("task", ["days", "months"])
def test_trained_demo_model_has_a_causal_circle(task):
    from interpkit.analyses.probing.linear import random_like
    from interpkit.models import load_model
    from interpkit.tasks import get_task

    lm = load_model(str(DEMO))
    prompts = get_task(task)(lm.tokenizer)
    res = run_circles(lm, prompts, CircleConfig(methods=("circle", "mean")))
    assert res.accuracy >= 0.9
    assert float(res.fit.r2_heldout.max()) >= 0.9 and float(res.fit.r2.max()) >= 0.9
    circle = res.methods.index("circle")
    assert float(res.flip_rate[circle].max()) >= 0.5                  # the circle patch moves the answer
    assert float(res.logit_diff[circle].min()) < 0 < res.noop_logit_diff
    rnd = run_circles(random_like(lm), prompts, CircleConfig(intervene=False))
    assert float(rnd.fit.r2_heldout.max()) < 0.5


def _remote_equals_local(remote_lm, lm, freeze: bool):
    from interpkit.tasks import get_task

    prompts = get_task("days")(lm.tokenizer)
    cfg = CircleConfig(layers=[0, 1], targets_per_problem=2, max_rows=150)   # 4 forwards: one session
    with frozen(lm.hf, freeze):                         # as NDIF (and the loopback) runs them: same rounding
        local = run_circles(lm, prompts, cfg)
    remote = run_circles(remote_lm, prompts, cfg)
    assert torch.equal(local.fit.r2, remote.fit.r2) and torch.equal(local.coords, remote.coords)
    assert torch.equal(local.run_logit_diff, remote.run_logit_diff)
    assert torch.equal(local.flip_rate, remote.flip_rate) and local.accuracy == remote.accuracy
    return remote


def test_serialised_session_equals_local():
    """nnsight's own serialise/deserialise round trip (remote="local") of the whole session."""
    lm = calendar_lm()
    _remote_equals_local(dataclasses.replace(lm, remote="local"), lm, freeze=False)


def test_loopback_ndif_equals_local():
    loopback = pytest.importorskip("interpkit.remote.loopback")
    lm = calendar_lm()
    torch.set_num_threads(server_threads())
    with loopback.LoopbackNDIF(lm.model) as server:
        _remote_equals_local(dataclasses.replace(lm, remote=True), lm, freeze=True)
    assert server.n_requests == 2               # one request for the activations, one for the interventions


def test_circle_command_writes_run(tmp_path, capsys):
    from interpkit.analyses.circles.command import circle_command

    lm = calendar_lm()
    cfg = CircleConfig(layers=[0], targets_per_problem=1, methods=("circle", "layer"))
    res = circle_command("days", "calendar-random", cfg=cfg, lm=lm, root=str(tmp_path))
    out = capsys.readouterr().out
    assert "R2" in out and "circle LD" in out and "results:" in out
    run = next((tmp_path / "circle").iterdir())
    for f in ("manifest.json", "results.h5", "r2.png", "scatter.png", "interventions.png", "interventions.csv"):
        assert (run / f).exists(), f
    import json
    summary = json.loads((run / "manifest.json").read_text())["summary"]
    assert summary["best_r2"] == pytest.approx(float(res.fit.r2.max())) and "random_best_r2" in summary
