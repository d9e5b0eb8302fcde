"""Multi-token answers scored by their summed log-probability under teacher forcing.

The answer's tokens are appended to each (left-padded) prompt, right-padded to the longest answer with the
attention mask off; causal attention keeps the padding from touching real tokens. One forward (one NDIF
request) gives log p(a_1 | prompt) + log p(a_2 | prompt, a_1) + ... per row.
"""
from __future__ import annotations

import torch

from tasks.base import append_tokens


def trace_logprobs(model, inputs: dict, ans: torch.Tensor, start: int, remote=False) -> torch.Tensor:
    """Summed log-probability of ``ans`` [B, L] (-1 padded) read at positions start-1 .. start+L-2."""
    with model.trace(inputs, remote=remote):
        L = ans.shape[1]
        logp = model.output.logits[:, start - 1:start - 1 + L].float().log_softmax(-1)
        picked = logp.gather(-1, ans.clamp_min(0)[..., None])[..., 0]
        total = (picked * (ans >= 0)).sum(-1).detach().cpu().save()
    return total


def answer_logprobs(lm, prompts, which: str = "answer") -> torch.Tensor:
    """[B] summed teacher-forced log-probability of each row's answer (``which="wrong"``: wrong answer).

    Uses ``meta["answer_seq"]`` / ``meta["wrong_seq"]`` (custom datasets) and falls back to the single
    token in ``answer_ids`` / ``wrong_ids`` column 0 (built-in tasks)."""
    from interpkit.remote import ensure_shipped

    inputs, ans = append_tokens(prompts.batch(), prompts.sequences(which))
    if lm.remote:
        ensure_shipped()
    with torch.no_grad():
        return trace_logprobs(lm.model, inputs, ans, prompts.input_ids.shape[1], remote=lm.remote)
