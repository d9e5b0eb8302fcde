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


SEQ_LOGPROB = "seq_logprob"


def seq_logprob(logits: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of ``seq`` [B, K] (-1 padded), teacher forced: ``logits`` [B, K + 1, V] are the
    last K + 1 positions of prompt + seq, and position j predicts seq[:, j]."""
    logp = logits[:, :-1].float().log_softmax(-1)
    picked = logp.gather(-1, seq.clamp_min(0)[..., None])[..., 0]
    return (picked * (seq >= 0)).sum(-1)


def sequence_prob(logits: torch.Tensor, answer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(probability per row [B], answer ids [K]) of the answer ``answer`` [K], teacher forced: ``logits``
    [B, K, V] are the last K positions of prompt + answer[:-1], and the probability is the product over the
    answer's tokens (K = 1: the next-token probability). ``answer[0] < 0`` takes the first row's top-1."""
    probs = logits.float().softmax(-1)
    a = probs[0, -1].argmax().view(1) if int(answer[0]) < 0 else answer.to(probs.device)
    picked = probs.gather(-1, a.view(1, -1, 1).expand(probs.shape[0], -1, 1))[..., 0]
    return picked.prod(-1), a


def kept_logits(name: str, answer_ids: torch.Tensor) -> int:
    """How many last positions' logits the metric ``name`` reads (``logits_to_keep`` of the trace)."""
    return answer_ids.shape[1] + 1 if name == SEQ_LOGPROB else 1


def score(name: str, logits: torch.Tensor, answer_ids: torch.Tensor, wrong_ids: torch.Tensor,
          candidates: torch.Tensor | None = None) -> torch.Tensor:
    """The metric called ``name`` (logit_diff | prob_diff | margin | seq_logprob) per row, from the logits of
    the last ``kept_logits(name, answer_ids)`` positions ([B, K, V]; [B, V] for the last position alone).
    ``seq_logprob`` reads ``answer_ids`` as the teacher-forced answer tokens that end the input."""
    if name == SEQ_LOGPROB:
        return seq_logprob(logits, answer_ids)
    logits = logits[:, -1] if logits.dim() == 3 else logits
    if name == "logit_diff":
        return logit_diff(logits, answer_ids, wrong_ids)
    if name == "prob_diff":
        return prob_diff(logits, answer_ids, wrong_ids)
    return margin(logits, answer_ids, candidates)


def normalize(value: torch.Tensor, base: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """0 at the unpatched base run, 1 at the source run; NaN where the two runs do not differ."""
    denom = source - base
    return torch.where(denom.abs() > 1e-8, (value - base) / denom, torch.full_like(value, float("nan")))
