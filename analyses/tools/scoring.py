"""Multi-token answers scored by their summed log-probability under teacher forcing.

The answer's tokens are appended to each (left-padded) prompt, right-padded to the longest answer with the
attention mask off; causal attention keeps the padding from touching real tokens. One forward (one NDIF
request) gives log p(a_1 | prompt) + log p(a_2 | prompt, a_1) + ... per row.
"""
from __future__ import annotations

import torch

from interpkit.errors import UserError


def teacher_forced_inputs(prompts, seqs: list[list[int]]) -> tuple[dict, torch.Tensor]:
    """Model inputs prompt + answer tokens, and the [B, L] answer ids (-1 padded)."""
    if any(len(s) == 0 for s in seqs):
        raise UserError("an answer has no tokens; every row needs a non-empty answer")
    B, T = prompts.input_ids.shape
    L = max(len(s) for s in seqs)
    ans = torch.full((B, L), -1, dtype=torch.long)
    for i, s in enumerate(seqs):
        ans[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    ids = torch.cat([prompts.input_ids, ans.clamp_min(0)], 1)
    mask = torch.cat([prompts.attention_mask, (ans >= 0).long()], 1)
    return {"input_ids": ids, "attention_mask": mask}, ans


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

    key = "answer_seq" if which == "answer" else "wrong_seq"
    seqs = prompts.meta.get(key)
    if not seqs or not all(seqs):
        ids = prompts.answer_ids if which == "answer" else prompts.wrong_ids
        if ids is None:
            raise UserError(f"these prompts have no {which} answers to score")
        seqs = [[int(r[0])] for r in ids]
    inputs, ans = teacher_forced_inputs(prompts, seqs)
    if lm.remote:
        ensure_shipped()
    with torch.no_grad():
        return trace_logprobs(lm.model, inputs, ans, prompts.input_ids.shape[1], remote=lm.remote)
