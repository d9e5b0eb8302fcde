"""Metrics as pure tensor functions. They run inside traces (locally and on NDIF): torch only."""
from __future__ import annotations

import torch


def _masked_mean(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean of logits[b, ids[b, j]] over the j where ids >= 0 (-1 pads)."""
    valid = ids >= 0
    picked = logits.gather(-1, ids.clamp_min(0))
    return (picked * valid).sum(-1) / valid.sum(-1).clamp_min(1)


def logit_diff(logits: torch.Tensor, answer_ids: torch.Tensor, wrong_ids: torch.Tensor) -> torch.Tensor:
    """Mean logit of the correct answers minus mean logit of the wrong ones, per row: [B, V] -> [B].

    With one answer each this is the usual IO - S (or correct - wrong pronoun) difference; Greater-Than
    passes every year above YY as answers and every year up to YY as wrong ones.
    """
    return _masked_mean(logits, answer_ids) - _masked_mean(logits, wrong_ids)


def prob_diff(logits: torch.Tensor, answer_ids: torch.Tensor, wrong_ids: torch.Tensor) -> torch.Tensor:
    """Total probability of the correct answers minus that of the wrong ones, per row."""
    p = logits.float().softmax(-1)
    pick = lambda ids: (p.gather(-1, ids.clamp_min(0)) * (ids >= 0)).sum(-1)  # noqa: E731
    return pick(answer_ids) - pick(wrong_ids)


def margin(logits: torch.Tensor, answer_ids: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Logit of the answer minus the best other candidate (the deletion-mode metric of state tracking)."""
    ans = answer_ids[:, :1]
    cand = logits[:, candidates]
    others = cand.masked_fill(candidates[None] == ans, float("-inf"))
    return logits.gather(-1, ans)[:, 0] - others.max(-1).values


def score(name: str, logits: torch.Tensor, answer_ids: torch.Tensor, wrong_ids: torch.Tensor,
          candidates: torch.Tensor | None = None) -> torch.Tensor:
    """The metric called ``name`` (logit_diff | prob_diff | margin) of last-position logits, per row."""
    if name == "logit_diff":
        return logit_diff(logits, answer_ids, wrong_ids)
    if name == "prob_diff":
        return prob_diff(logits, answer_ids, wrong_ids)
    return margin(logits, answer_ids, candidates)


def normalize(value: torch.Tensor, base: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """0 at the unpatched base run, 1 at the source run; NaN where the two runs do not differ."""
    denom = source - base
    return torch.where(denom.abs() > 1e-8, (value - base) / denom, torch.full_like(value, float("nan")))
