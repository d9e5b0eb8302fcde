"""Multi-token answers scored by their summed log-probability under teacher forcing.

The answer's tokens are appended to each (left-padded) prompt, right-padded to the longest answer with the
attention mask off; causal attention keeps the padding from touching real tokens. One forward (one NDIF
request) gives log p(a_1 | prompt) + log p(a_2 | prompt, a_1) + ... per row.
"""
from __future__ import annotations

import torch

from interpkit.analyses.tools.common import run_trace
from interpkit.metrics import seq_logprob
from interpkit.tasks.base import append_tokens


def trace_logprobs(model, inputs: dict, ans: torch.Tensor, remote=False) -> torch.Tensor:
    """Summed log-probability of ``ans`` [B, K] (-1 padded), the tokens that end ``inputs``."""
    with model.trace(inputs, remote=remote, logits_to_keep=ans.shape[1] + 1):
        total = seq_logprob(model.output.logits, ans).detach().cpu().save()
    return total


def answer_logprobs(lm, prompts, which: str = "answer") -> torch.Tensor:
    """[B] summed teacher-forced log-probability of each row's answer (``which="wrong"``: wrong answer).

    Uses ``meta["answer_seq"]`` / ``meta["wrong_seq"]`` (custom datasets) and falls back to the single
    token in ``answer_ids`` / ``wrong_ids`` column 0 (built-in tasks)."""
    return run_trace(lm, trace_logprobs, *append_tokens(prompts.batch(), prompts.sequences(which)))
