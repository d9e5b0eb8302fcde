"""Seed fidelity of the circle experiments (Engels et al. 2024): probe variants, interventions on the
result c, intervening inside the circle, residual RGB deconstruction and the reducibility demo."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from interpkit.analyses.circles.features import CircleConfig, circle_targets, fit_circle, run_circles
from interpkit.errors import UserError

DEMO = Path(__file__).resolve().parents[2] / "artifacts" / "models" / "calendar-demo"
needs_demo = pytest.mark.skipif(not DEMO.exists(), reason="artifacts/models/calendar-demo not built")


@functools.lru_cache(maxsize=None)
def demo():
    from interpkit.models import load_model
    from interpkit.tasks import get_task

    lm = load_model(str(DEMO))
    return lm, get_task("days")(lm.tokenizer)


def test_probe_on_variants_on_a_planted_circle():
    g = torch.Generator().manual_seed(0)
    values = torch.arange(7).repeat_interleave(7)
    plane = torch.linalg.qr(torch.randn(32, 3, generator=g, dtype=torch.float64))[0]
    feats = torch.cat([circle_targets(values, 7), circle_targets(values, 7, ("linear",)) / 3], 1)
    acts = (5 * feats @ plane.T + 0.01 * torch.randn(49, 32, generator=g, dtype=torch.float64))[:, None]
    for probe_on in (("cos",), ("sin", "cos"), ("cos", "sin", "linear")):
        fit = fit_circle(acts, values, 7, k=5, probe_on=probe_on)
        assert fit.W.shape == (1, 5, len(probe_on)) and fit.r2_targets.shape == (1, len(probe_on))
        assert float(fit.r2[0]) > 0.999
        pts = fit.circle_points(0)                                        # the patch reads back its target
        assert torch.allclose(fit.predict(pts, 0), circle_targets(torch.arange(7), 7, probe_on), atol=1e-8)
    assert torch.isnan(fit_circle(acts, values, 7, probe_on=("linear",)).r2_cos).all()
    lm_free_bad = [CircleConfig(probe_on=("tan",)), CircleConfig(probe_on=()), CircleConfig(probe_on=("cos", "cos")),
                   CircleConfig(k=2, probe_on=("cos", "sin", "linear"))]
    for cfg in lm_free_bad:
        with pytest.raises(UserError):
            cfg.validate(2)


@needs_demo
def test_interventions_on_the_result_token():
    """c's circle lives in the final residual of the 2-layer demo model: patching it there moves the answer;
    at the embeddings (c not computed yet) it does not."""
    lm, prompts = demo()
    res = run_circles(lm, prompts, CircleConfig(role="result", layers=[0, 2], methods=("circle", "mean")))
    c = res.methods.index("circle")
    print(f"\nresult c: R2 {res.fit.r2.tolist()}, circle LD {res.logit_diff[c].tolist()}, "
          f"flip {res.flip_rate[c].tolist()}")
    assert float(res.fit.r2_heldout[2]) > 0.9 and float(res.fit.r2[0]) < 0.5
    assert float(res.flip_rate[c, 1]) >= 0.9 and float(res.logit_diff[c, 1]) < -2
    assert float(res.flip_rate[c, 0]) <= 0.3
    with pytest.raises(UserError):
        run_circles(lm, prompts, CircleConfig(role="result", layers=[3]))


@needs_demo
def test_sweep_inside_the_circle():
    from interpkit.analyses.circles.features import circle_sweep

    lm, prompts = demo()
    fit = run_circles(lm, prompts, CircleConfig(intervene=False)).fit
    sw = circle_sweep(lm, prompts, fit, layer=0, frm=0, to=1, radii=[0.0, 1.0, 1.5], n_angles=7)
    print("\n" + sw.table())
    assert sw.share_from.shape == (3, 7) and sw.implied.shape == (3, 7, len(prompts))
    assert sw.share_from[1, 0] == 1.0 and sw.share_to[1, -1] == 1.0           # on the circle: the angle decides
    assert sw.share_from[2, 0] == 1.0 and sw.share_to[2, -1] == 1.0           # outside it too
    assert np.all(sw.implied[0] == sw.implied[0, :1])                        # the centre has no angle
    assert np.all(np.diff(sw.logit_diff[1]) < 0)                             # c_from fades into c_to
    with pytest.raises(UserError):
        circle_sweep(lm, prompts, fit, layer=0, frm=2, to=2)
    cos_only = run_circles(lm, prompts, CircleConfig(intervene=False, probe_on=("cos",))).fit
    with pytest.raises(UserError):
        circle_sweep(lm, prompts, cos_only, layer=0, frm=0, to=1)


def test_deconstruction_on_synthetic_features():
    from interpkit.analyses.circles.studies import deconstruct, features, rgb_image

    g = np.random.default_rng(0)
    a, b = np.repeat(np.arange(7), 7), np.tile(np.arange(1, 8), 7)
    c = (a + b) % 7
    M1, M2 = g.normal(size=(2, 16)), g.normal(size=(7, 16))
    X = features("circle_a", a, b, c, 7) @ M1 + features("onehot_b", a, b, c, 7) @ M2 + 1e-3 * g.normal(size=(49, 16))
    dc = deconstruct(X, a, b, c, 7, steps=("circle_c", "circle_a", "onehot_b"))
    assert dc.r2[1] < 0.2 and dc.r2[2] < 0.9 and dc.r2[3] > 0.999            # only a's circle + b's one-hot fit
    img, ratio = rgb_image(X, a, b)
    assert img.shape == (7, 7, 3) and np.nanmin(img) >= 0 and np.nanmax(img) <= 1 and 0 < ratio.sum() <= 1
    with pytest.raises(UserError):
        features("circle_z", a, b, c, 7)


@needs_demo
def test_deconstruction_of_the_demo_model():
    from interpkit.analyses.circles.studies import deconstruct
    from interpkit.analyses.probing.linear import collect_residuals

    lm, prompts = demo()
    acts = collect_residuals(lm, prompts, prompts.roles["end"])
    a, b, c = (np.array(prompts.meta[k]) for k in ("a", "b", "c"))
    dc = deconstruct(acts[:, 2].numpy(), a, b, c, 7, steps=("circle_a", "circle_b", "circle_c"), layer=2)
    print(f"\nlayer 2 'end': R2 after {dc.steps[1:]}: {dc.r2[1:]}")
    assert dc.r2[2] < 0.1 and dc.r2[3] > 0.9                                  # the final residual is c's circle


@needs_demo
def test_circle_command_with_sweep_and_rgb(tmp_path, capsys):
    from interpkit.analyses.circles.command import circle_command

    lm, prompts = demo()
    cfg = CircleConfig(layers=[0], targets_per_problem=1, methods=("circle",))
    for bad in (dict(sweep=(0, 3, 3)), dict(sweep=(5, 0, 1)), dict(rgb_layers=[9]), dict(rgb_layers=[1], rgb_role="x")):
        with pytest.raises(UserError):                                         # before any forward
            circle_command("days", str(DEMO), cfg=cfg, lm=lm, prompts=prompts, root=str(tmp_path / "bad"), **bad)
    circle_command("days", str(DEMO), cfg=cfg, lm=lm, prompts=prompts, root=str(tmp_path), random_baseline=False,
                   sweep=(0, 0, 1), rgb_layers=[2])
    out = capsys.readouterr().out
    assert "sweep at layer 0" in out and "deconstruction at layer 2" in out
    run = next((tmp_path / "circle").iterdir())
    for f in ("sweep.png", "sweep.csv", "rgb_layer2.png", "deconstruction.csv"):
        assert (run / f).stat().st_size > 0, f
    summary = json.loads((run / "manifest.json").read_text())["summary"]
    assert summary["sweep"] == {"layer": 0, "from": 0, "to": 1} and len(summary["deconstruction"]) == 1


def test_reducibility_command(tmp_path):
    from interpkit.analyses.circles.irreducibility import reducibility_command

    lines = []
    out = reducibility_command(None, n=400, root=str(tmp_path), echo=lines.append)
    verdict = {r["cloud"]: r["irreducible"] for r in out["synthetic"]}
    assert verdict == {"circle": True, "two_lines": False, "gaussian": False, "square": False}
    run = next((tmp_path / "reducibility").iterdir())
    assert (run / "synthetic.png").stat().st_size > 1000 and (run / "indices.json").exists()
    with pytest.raises(UserError):
        reducibility_command(None, eps=2.0, root=str(tmp_path), echo=lines.append)
    if DEMO.exists():
        out = reducibility_command(str(DEMO), task="days", layer=1, n=200, root=str(tmp_path), echo=lines.append)
        assert len(out["layers"][1]) == 4 and all(0 <= r["mixture"] <= 1 for r in out["layers"][1])
