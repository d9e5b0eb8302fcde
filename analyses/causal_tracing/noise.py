"""Noise rules of ROME causal tracing (Meng et al. 2022, ``parse_noise_rule`` in kmeng01/rome).

How the subject's token embeddings are corrupted, parsed from ``--noise`` plus ``--replace``:

* ``<k>sigma`` / ``s<k>`` (default ``3sigma``): add k x the std of the subjects' token embeddings
  (one scalar, pooled over tokens and dimensions) times N(0, I);
* a number x: add x * N(0, I); ``u<x>``: add uniform noise in [-x, x];
* ``m`` / ``m<k>``: a multivariate Gaussian with the mean mu and covariance Sigma of the subjects'
  token embeddings (pooled over the dataset), mu + k * Sigma^(1/2) z. As in ROME the sample includes
  the mean (ROME fits it to wikitext embeddings; here to the subjects', which needs no download);
* ``t<dof>``: multivariate Student-t with dof > 2 degrees of freedom, location mu and the same
  covariance Sigma: mu + sqrt((dof - 2) / u) * Sigma^(1/2) z, u ~ chi2(dof) per token vector (ROME
  draws the same chi2 scaling, but multiplies the mean by it too);
* ``subject``: replace the subject's embeddings by those of another subject of the dataset (same
  number of tokens when one exists, else a longer one cut to length), a different one per sample.

``--replace`` replaces the embeddings by the sample instead of adding it (ROME's ``--replace``); with no
``--noise`` it means ``subject``. Samples are fixed per (seed, fact id), as the additive noise is.

A replacement travels to the trace as one extra channel of the noise bank (1 = replace there), and the
engine's ``corrupt`` (``interpkit.engine.inside``) applies it as ``e * (1 - drop) + value``, so the
replaced embedding is exactly the value (bit for bit) and untouched positions stay exactly ``e``.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from interpkit.analyses.causal_tracing.facts import facts_of, subject_batches
from interpkit.engine.inside import corrupt  # noqa: F401  (applies the bank inside traces)
from interpkit.engine.run import run_traces
from interpkit.errors import UserError

MODEL_RULES = ("mvn", "t", "subject", "uniform")     # rules that need a NoiseModel (not a scalar level)
RULE_HELP = ("3sigma / s3 (k x std of subject embeddings), a number, u<x> (uniform), m or m<k> "
             "(Gaussian with the subjects' covariance), t<dof> (Student-t, dof > 2), subject (another "
             "subject's embeddings)")


@dataclass(frozen=True)
class NoiseRule:
    """A parsed ``--noise``: kind is sigma | fixed | uniform | mvn | t | subject."""

    kind: str
    value: float                  # sigma: k; fixed/uniform: level; mvn: scale k; t: dof; subject: 0
    text: str


def parse_rule(noise) -> NoiseRule:
    """Parse a noise rule (see the module docstring); bad input raises a one-line UserError."""
    if isinstance(noise, bool):
        raise UserError(f"bad --noise {noise!r}; use {RULE_HELP}")
    text = str(noise).strip().lower()
    num = r"(\d+(?:\.\d*)?|\.\d+)"
    if m := re.fullmatch(num + r"\s*sigma|s" + num + "?", text):
        return NoiseRule("sigma", float(m.group(1) or m.group(2) or 1.0), text)
    if m := re.fullmatch("u" + num, text):
        return NoiseRule("uniform", float(m.group(1)), text)
    if m := re.fullmatch("m" + num + "?", text):
        return NoiseRule("mvn", float(m.group(1) or 1.0), text)
    if m := re.fullmatch("t" + num, text):
        dof = float(m.group(1))
        if dof <= 2:
            raise UserError(f"bad --noise {noise!r}: Student-t needs dof > 2 (finite variance to match)")
        return NoiseRule("t", dof, text)
    if text in ("subject", "replace"):
        return NoiseRule("subject", 0.0, "subject")
    try:
        level = float(text)
    except ValueError:
        raise UserError(f"bad --noise {noise!r}; use {RULE_HELP}") from None
    if not math.isfinite(level) or level < 0:
        raise UserError(f"--noise must be >= 0 and finite (got {noise!r}); use 3sigma or a non-negative number")
    return NoiseRule("fixed", level, text)


def fact_generator(seed: int, key: int) -> torch.Generator:
    """The generator of one fact's noise (the formula of ``causal_tracing.fact_noise``)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + key) % (2 ** 63))


@dataclass
class NoiseModel:
    """Everything needed to draw one fact's corruption for any rule; ``float(model)`` is the RMS size
    of the noise per dimension (what the run reports as its noise level)."""

    rule: NoiseRule
    replace: bool = False
    level: float = 0.0                              # sigma / fixed / uniform: the scalar level
    mean: torch.Tensor | None = None                # [d] float64, mvn / t
    factor: torch.Tensor | None = None              # [d, d] float64, Sigma^(1/2) (columns: eigvecs * sqrt(eigval))
    pool: list[torch.Tensor] = field(default_factory=list)   # subject: distinct subjects' embeddings [n_i, d]
    pool_ids: list[tuple[int, ...]] = field(default_factory=list)
    scale: float = 0.0

    def __float__(self) -> float:
        return float(self.scale)

    def sample(self, cfg, fact, d_model: int) -> torch.Tensor:
        """[samples, n_subject_tokens, d] additive noise, or [..., d + 1] with the replace channel."""
        S, n = cfg.samples, fact.subject_last - fact.subject_first + 1
        g = fact_generator(cfg.seed, fact.key)
        kind = self.rule.kind
        if kind == "subject":
            own = tuple(int(i) for i in fact.ids[fact.subject_first:fact.subject_last + 1])
            values = self.other_subjects(own, n, S, g)
        elif kind in ("sigma", "fixed"):
            values = torch.randn((S, n, d_model), generator=g) * self.level
        elif kind == "uniform":
            values = (torch.rand((S, n, d_model), generator=g) * 2 - 1) * self.level
        else:
            z = torch.randn((S, n, d_model), generator=g, dtype=torch.float64)
            spread = z @ self.factor.T
            if kind == "t":
                import numpy as np

                u = np.random.default_rng((cfg.seed * 1_000_003 + fact.key) % (2 ** 63)).chisquare(self.rule.value, (S, n))
                spread = spread * torch.from_numpy(np.sqrt((self.rule.value - 2) / u))[..., None]
            else:
                spread = spread * self.rule.value
            values = (self.mean + spread).float()
        if not (self.replace or kind == "subject"):
            return values
        return torch.cat([values, torch.ones(S, n, 1)], -1)

    def other_subjects(self, own: tuple[int, ...], n: int, samples: int, g: torch.Generator) -> torch.Tensor:
        """[samples, n, d]: embeddings of other subjects (not ``own``), same token count if any exists,
        else the shortest longer ones cut to their first n tokens; distinct while the pool lasts."""
        others = [i for i, ids in enumerate(self.pool_ids) if ids != own]
        same = [i for i in others if len(self.pool_ids[i]) == n]
        if not same:
            longer = sorted({len(self.pool_ids[i]) for i in others if len(self.pool_ids[i]) > n})
            if not longer:
                raise UserError(f"no other subject with at least {n} tokens to replace a subject with; "
                                "use a dataset with more subjects or another --noise rule")
            same = [i for i in others if len(self.pool_ids[i]) == longer[0]]
        order = torch.randperm(len(same), generator=g)
        pick = [same[int(order[s % len(same)])] for s in range(samples)]
        return torch.stack([self.pool[i][:n].float() for i in pick])


# --------------------------------------------------------------------------------------------------
# statistics of the subjects' token embeddings (one batched pass; one request remotely)
# --------------------------------------------------------------------------------------------------
def subject_embeddings(lm, prompts, max_rows: int = 256) -> list[torch.Tensor]:
    """Per prompt, the embedding output at its subject tokens [n_i, d] (the model's dtype)."""
    sub, jobs = subject_batches(prompts, max_rows)
    outs = run_traces(lm.model, _embedding_trace, [(b,) for b in jobs], lm.remote)
    flat = torch.cat(outs)
    counts = sub.sum(1).tolist()
    return list(torch.split(flat, counts))


def _embedding_trace(model, batch):
    with model.trace(batch.inputs, logits_to_keep=1) as tracer:
        e = model.embed.output
        x = e[batch.subject.to(e.device)].detach().cpu().save()
        tracer.stop()                              # only the embeddings are needed
    return x


def build_noise_model(lm, prompts, cfg) -> NoiseModel:
    """The NoiseModel of ``cfg.noise`` / ``cfg.replace`` with statistics over ``prompts``' subjects
    (pass the whole dataset, not only the traced facts)."""
    rule = parse_rule(cfg.noise)
    replace = bool(getattr(cfg, "replace", False))
    if rule.kind == "fixed" and not cfg.uniform:
        return NoiseModel(rule, replace, level=rule.value, scale=rule.value)
    if rule.kind == "fixed":
        return NoiseModel(NoiseRule("uniform", rule.value, rule.text), replace, level=rule.value,
                          scale=rule.value / math.sqrt(3))
    if rule.kind == "uniform":
        return NoiseModel(rule, replace, level=rule.value, scale=rule.value / math.sqrt(3))
    per_prompt = subject_embeddings(lm, prompts)
    X = torch.cat(per_prompt).double()
    if len(X) < 2:
        raise UserError("the noise statistics need at least 2 subject tokens in the dataset")
    if rule.kind == "sigma":
        std = float(X.std(unbiased=True))
        level = rule.value * std
        if cfg.uniform:
            return NoiseModel(NoiseRule("uniform", level, rule.text), replace, level=level, scale=level / math.sqrt(3))
        return NoiseModel(rule, replace, level=level, scale=level)
    if rule.kind == "subject":
        seen: dict[tuple[int, ...], torch.Tensor] = {}
        for f, emb in zip(facts_of(prompts), per_prompt):
            seen.setdefault(tuple(int(i) for i in f.ids[f.subject_first:f.subject_last + 1]), emb)
        return NoiseModel(rule, True, pool=list(seen.values()), pool_ids=list(seen),
                          scale=float(X.std(unbiased=True)))
    return gaussian_model(rule, X, replace)


def gaussian_model(rule: NoiseRule, X: torch.Tensor, replace: bool = False) -> NoiseModel:
    """The mvn / t NoiseModel fitted to rows X [N, d]: their mean and covariance (Sigma^(1/2) from its
    eigendecomposition, so rank-deficient covariances with fewer rows than dimensions work)."""
    X = X.double()
    mean, cov = X.mean(0), torch.cov(X.T)
    evals, evecs = torch.linalg.eigh(cov)
    factor = evecs * evals.clamp_min(0).sqrt()
    k = rule.value if rule.kind == "mvn" else 1.0
    return NoiseModel(rule, replace, mean=mean, factor=factor,
                      scale=k * math.sqrt(float(evals.clamp_min(0).sum()) / len(mean)))
