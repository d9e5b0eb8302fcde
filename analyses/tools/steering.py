"""Steering by contrastive activation addition: the mean difference of the residual stream (the output of
layer ``layer`` at each prompt's last token) between a positive and a negative prompt set, added times a
coefficient at every position of every generation step (nnsight ``model.generate`` with an intervention
on every step). Unsteered generation and every coefficient of a sweep run in one ``model.session``, so
remotely the whole command is one NDIF request and the vector never leaves the server.

Greedy decoding with ``min_new_tokens = max_new_tokens`` (every row yields the same number of tokens, so
the per-step intervention runs a known number of times). The sweep metric, per coefficient, at the last
position of the evaluation prompts under steering: log p(pos_word) - log p(neg_word) when both are given
(their first tokens), and always the KL divergence of the steered from the unsteered next-token
distribution.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from interpkit.analyses.tools.common import encode, run_trace
from interpkit.analyses.tools.reads import first
from interpkit.errors import UserError


@dataclass(repr=False)
class SteerJob:
    """Plain values that travel into the session."""

    layer: int
    coefficients: list[float]
    max_new_tokens: int
    pos_id: int = -1
    neg_id: int = -1


def _steer(model, layer: int, vec: torch.Tensor, coef: float) -> None:
    h = first(model.layers[layer].output)
    h[:] = h + coef * vec.to(h.dtype)


def run_steering(model, pos: dict, neg: dict, inputs: dict, job: SteerJob, remote=False):
    """The session: vector, unsteered generation, then per coefficient a steered generation and a steered
    forward for the metric. Runs unchanged locally and on NDIF (torch only)."""
    gen_kw = dict(max_new_tokens=job.max_new_tokens, min_new_tokens=job.max_new_tokens, do_sample=False)
    with model.session(remote=remote):
        with model.trace(pos):
            mean_pos = first(model.layers[job.layer].output)[:, -1].float().mean(0)
        with model.trace(neg):
            mean_neg = first(model.layers[job.layer].output)[:, -1].float().mean(0)
        vec = (mean_pos - mean_neg).detach()
        vector = vec.cpu().save()
        with model.generate(inputs, **gen_kw) as tracer:
            plain = tracer.result.cpu().save()
        with model.trace(inputs):
            base_logp = model.output.logits[:, -1].float().log_softmax(-1)
        gens, metrics = list().save(), list().save()
        for coef in job.coefficients:
            with model.generate(inputs, **gen_kw) as tracer:
                for step in tracer.iter[:job.max_new_tokens]:
                    _steer(model, job.layer, vec, coef)
                gens.append(tracer.result.cpu())
            with model.trace(inputs):
                _steer(model, job.layer, vec, coef)
                logp = model.output.logits[:, -1].float().log_softmax(-1)
                kl = (logp.exp() * (logp - base_logp)).sum(-1)
                word = (logp[:, job.pos_id] - logp[:, job.neg_id]) if job.pos_id >= 0 else torch.zeros_like(kl)
                metrics.append(torch.stack([word, kl]).detach().cpu())
    return vector, plain, gens, metrics


@dataclass
class SteerResult:
    """Texts and metrics of a steering sweep."""

    layer: int
    coefficients: list[float]
    prompts: list[str]
    unsteered: list[str]                       # per prompt
    steered: list[list[str]]                   # [coefficient][prompt]
    unsteered_ids: torch.Tensor
    steered_ids: list[torch.Tensor]
    word_logp_diff: list[float]                # per coefficient, mean over prompts (0 without words)
    kl: list[float]                            # per coefficient, mean over prompts
    vector_norm: float
    extra: dict = field(default_factory=dict)


def _first_token(lm, word: str | None) -> int:
    if not word:
        return -1
    ids = lm.tokenizer(word, add_special_tokens=False)["input_ids"]
    if not ids:
        raise UserError(f"{word!r} tokenizes to nothing; pass a word such as ' happy'")
    return int(ids[0])


def steer(lm, positive: list[str], negative: list[str], prompts: list[str], layer: int,
          coefficients: list[float] = (0.0, 4.0, 8.0), max_new_tokens: int = 12,
          pos_word: str | None = None, neg_word: str | None = None) -> SteerResult:
    """Contrastive activation addition at ``layer``: generate from ``prompts`` unsteered and at every
    coefficient (one session; one NDIF request remotely)."""
    if not positive or not negative:
        raise UserError("steering needs a positive and a negative prompt set (at least one prompt each)")
    if not prompts:
        raise UserError("steering needs at least one prompt to generate from (--prompt)")
    if max_new_tokens < 1:
        raise UserError("--max-new-tokens must be >= 1")
    if bool(pos_word) != bool(neg_word):
        raise UserError("pass both --pos-word and --neg-word (or neither)")
    layer = lm.arch.check_layer(layer)
    job = SteerJob(layer=layer, coefficients=[float(c) for c in coefficients], max_new_tokens=max_new_tokens,
                   pos_id=_first_token(lm, pos_word), neg_id=_first_token(lm, neg_word))
    pos, neg, inputs = encode(lm, positive), encode(lm, negative), encode(lm, prompts)
    vector, plain, gens, metrics = run_trace(lm, run_steering, pos, neg, inputs, job)
    T = inputs["input_ids"].shape[1]
    dec = lambda ids: [lm.tokenizer.decode(r[T:], skip_special_tokens=True) for r in ids]  # noqa: E731
    metrics = [torch.as_tensor(m) for m in metrics]
    return SteerResult(layer=layer, coefficients=job.coefficients, prompts=list(prompts), unsteered=dec(plain),
                       steered=[dec(g) for g in gens], unsteered_ids=plain, steered_ids=list(gens),
                       word_logp_diff=[float(m[0].mean()) for m in metrics], kl=[float(m[1].mean()) for m in metrics],
                       vector_norm=float(torch.as_tensor(vector).norm()))
