"""analyses/causal_tracing/noise.py: ROME's noise rules (sigma, uniform, m, t<dof>, subject replacement, --replace)
checked statistically on synthetic embeddings and exactly on a tiny model, plus the CLI options."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from interpkit.analyses.causal_tracing import trace as CT
from interpkit.analyses.causal_tracing.noise import NoiseModel, build_noise_model, corrupt, gaussian_model, parse_rule
from interpkit.errors import UserError
from tests.conftest import tiny


def test_parse_rules():
    cases = {"3sigma": ("sigma", 3.0), "s2": ("sigma", 2.0), "s": ("sigma", 1.0), "0.5sigma": ("sigma", 0.5),
             "0.1": ("fixed", 0.1), 0.2: ("fixed", 0.2), "u0.05": ("uniform", 0.05), "m": ("mvn", 1.0),
             "m2.5": ("mvn", 2.5), "t3": ("t", 3.0), "t10": ("t", 10.0), "subject": ("subject", 0.0)}
    for text, (kind, value) in cases.items():
        r = parse_rule(text)
        assert (r.kind, r.value) == (kind, value), text
        assert CT.parse_noise(text) == (kind, value)
    for bad in ("t2", "t1.5", "x", "m-1", "", "sigma3", "u"):
        with pytest.raises(UserError):
            parse_rule(bad)


class _Fact:
    """The fields NoiseModel.sample reads."""

    def __init__(self, ids, first, last, key=7):
        self.ids, self.subject_first, self.subject_last, self.key = torch.as_tensor(ids), first, last, key


def _synthetic(d=5, n=4000, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g, dtype=torch.float64)
    X = torch.randn(n, d, generator=g, dtype=torch.float64) @ A.T + torch.arange(d, dtype=torch.float64)
    return X


def _draw(model: NoiseModel, samples: int, d: int) -> torch.Tensor:
    cfg = CT.TraceConfig(samples=samples, seed=3)
    return model.sample(cfg, _Fact([1, 2, 3], 1, 1), d)[:, 0].double()         # [samples, d]


def test_mvn_rule_matches_the_subjects_mean_and_covariance():
    X = _synthetic()
    target = torch.cov(X.T)
    x = _draw(gaussian_model(parse_rule("m"), X), 40000, X.shape[1])
    rel = (torch.cov(x.T) - target).norm() / target.norm()
    assert rel < 0.05, rel
    assert (x.mean(0) - X.mean(0)).abs().max() < 0.1 * target.diagonal().sqrt().min()
    x2 = _draw(gaussian_model(parse_rule("m2"), X), 40000, X.shape[1])        # m<k>: k x the spread
    rel2 = (torch.cov(x2.T) - 4 * target).norm() / (4 * target).norm()
    assert rel2 < 0.05, rel2
    assert (torch.cov(x2.T) - target).norm() / target.norm() > 1.0            # so the scale really acts


def test_t_rule_has_heavier_tails_and_the_same_covariance():
    X = _synthetic(seed=1)
    target = torch.cov(X.T)
    white = torch.linalg.cholesky(torch.linalg.inv(target))                    # whitening: cov -> I

    def excess_kurtosis(x):
        z = (x - X.mean(0)) @ white
        return ((z ** 4).mean(0) / (z ** 2).mean(0) ** 2 - 3).mean()

    t = _draw(gaussian_model(parse_rule("t5"), X), 60000, X.shape[1])
    gauss = _draw(gaussian_model(parse_rule("m"), X), 60000, X.shape[1])
    assert (torch.cov(t.T) - target).norm() / target.norm() < 0.15             # variance matched (dof - 2) / u
    assert excess_kurtosis(gauss).abs() < 0.3
    assert excess_kurtosis(t) > 2.0                                             # theory: 6 / (dof - 4) = 6
    q = lambda x: ((x - X.mean(0)) @ white).abs().quantile(0.9999)             # noqa: E731
    assert q(t) > 1.2 * q(gauss)


def test_sigma_rules_and_replace_reuse_the_additive_draws():
    lm = tiny("gpt2")
    from interpkit.tasks.known_facts import build

    ps = build(lm.tokenizer, n=12, seed=3)
    f = CT.facts_of(ps)[0]
    d = lm.arch.d_model
    add_cfg = CT.TraceConfig(noise="3sigma", samples=4)
    level = CT.noise_level(lm, ps, add_cfg)
    additive = CT.fact_noise(add_cfg, f, d, level)
    rep_cfg = CT.TraceConfig(noise="3sigma", samples=4, replace=True)
    rep = CT.fact_noise(rep_cfg, f, d, CT.noise_level(lm, ps, rep_cfg))
    assert rep.shape == additive.shape[:-1] + (d + 1,) and torch.all(rep[..., -1] == 1)
    assert torch.allclose(rep[..., :d], additive, rtol=1e-5, atol=0)            # same draws, same level
    u = CT.fact_noise(CT.TraceConfig(noise="u0.5", samples=50), f, d,
                      build_noise_model(lm, ps, CT.TraceConfig(noise="u0.5")))
    assert u.abs().max() <= 0.5 and u.abs().max() > 0.45 and u.shape[-1] == d


def test_corrupt_is_exact():
    e = torch.randn(3, 5, 4)
    add = torch.randn(3, 5, 4)
    assert torch.equal(corrupt(e, add), e + add)
    bank = torch.zeros(3, 5, 5)
    bank[1:, 2, :4] = torch.randn(2, 4)
    bank[1:, 2, 4] = 1
    out = corrupt(e, bank)
    assert torch.equal(out[1:, 2], bank[1:, 2, :4]) and torch.equal(out[0], e[0])
    keep = torch.ones(3, 5, dtype=torch.bool)
    keep[1:, 2] = False
    assert torch.equal(out[keep], e[keep])


@pytest.mark.parametrize("engine", ["batched", "prefix"])
def test_replace_puts_exactly_another_subjects_embedding_in(engine):
    """The corrupted rows see another subject's token embeddings bit for bit: their answer probability
    equals a plain forward of the prompt with the subject's tokens swapped for that subject's."""
    from interpkit.tasks.known_facts import build

    lm = tiny("gpt2")
    ps = build(lm.tokenizer, n=40, seed=5)
    cfg = CT.TraceConfig(noise="subject", samples=3, kinds=["hidden"], engine=engine)
    model = build_noise_model(lm, ps, cfg)
    table = lm.hf.get_input_embeddings().weight.detach()
    f = next(f for f in CT.facts_of(ps) if f.subject_last > f.subject_first)   # a multi-token subject
    own = tuple(f.ids[f.subject_first:f.subject_last + 1].tolist())
    n = len(own)
    draw = CT.fact_noise(cfg, f, lm.arch.d_model, model)
    swapped = []
    for s in range(cfg.samples):
        hits = [ids for ids in model.pool_ids
                if len(ids) >= n and torch.equal(table[list(ids[:n])], draw[s, :, :-1])]
        assert hits and all(ids != own for ids in hits), "not another subject's embedding"
        swapped.append(hits[0][:n])
    assert len(set(swapped)) > 1                                                # samples use different subjects
    res = CT.run_causal_tracing(lm, ps.subset([f.index]), cfg, noise=model)
    with torch.no_grad():
        ids = f.ids[None].repeat(cfg.samples, 1)
        ids[:, f.subject_first:f.subject_last + 1] = torch.tensor(swapped)
        probs = lm.hf(input_ids=ids).logits[:, -1].softmax(-1)[:, res.facts[0].answer_id]
    assert abs(res.facts[0].low - float(probs.double().mean())) < 1e-6


def _known_file(tmp_path, lm, n_try=120):
    """A known_1000-format file of prompts whose attribute is the tiny model's own top-1 (so it 'knows' them)."""
    from interpkit.tasks.known_facts import load_known

    records = []
    for r in load_known()[:n_try]:
        ids = lm.tokenizer(r["prompt"], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            top = int(lm.hf(input_ids=ids).logits[0, -1].argmax())
        word = lm.tokenizer.decode([top]).strip()
        if word and lm.tokenizer.encode(" " + word, add_special_tokens=False)[:1] == [top]:
            records.append({**r, "attribute": word})
    records += load_known()[n_try:n_try + 20]                                  # some it does not know
    path = tmp_path / "facts.json"
    path.write_text(json.dumps(records))
    return path, len(records) - 20


def test_cli_fact_file_noise_rules_and_bad_input(tmp_path, monkeypatch, capsys):
    from interpkit import cli

    lm = tiny("gpt2")
    path, n_known = _known_file(tmp_path, lm)
    assert n_known >= 2

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["interpkit", "causal-trace", *args])
        with pytest.raises(SystemExit) as e:
            cli.main()
        return e.value.code, capsys.readouterr()

    common = ["--model", "tiny:gpt2", "--fact-file", str(path), "--facts", "2", "--kind", "hidden",
              "--samples", "2", "--root", str(tmp_path / "runs")]
    code, out = run(*common, "--noise", "m")
    assert code == 0, out.err
    assert f"traced 2 known facts (of {n_known + 20})" in out.out
    code, out = run(*common, "--replace")
    assert code == 0, out.err
    manifest = json.loads(next((tmp_path / "runs" / "causal_tracing").glob("*/manifest.json")).read_text())
    assert manifest
    code, out = run(*common, "--noise", "t1")
    assert code == 2 and out.err.startswith("error: bad --noise") and len(out.err.strip().splitlines()) == 1
    code, out = run(*common[:3], str(tmp_path / "missing.json"), *common[4:])
    assert code == 2 and "cannot read facts file" in out.err
