"""analyses/causal_tracing/noise.py: ROME's noise rules (sigma, uniform, m, t<dof>) parsed and checked
statistically on synthetic embeddings, and corruption exact (the tiny-model and CLI checks are
tests/integration/test_causal_noise.py)."""
from __future__ import annotations

import pytest
import torch

from interpkit.analyses.causal_tracing import trace as CT
from interpkit.analyses.causal_tracing.noise import NoiseModel, corrupt, gaussian_model, parse_rule
from interpkit.errors import UserError


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
