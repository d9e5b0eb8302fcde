"""Facts of causal tracing: unpadded prompts with their subject spans, ROME's six token groups, and the
subject-token masks of a (left-padded) PromptSet. Shared by ``causal_tracing``, ``causal_noise`` and the
figures; imports no other analysis."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from interpkit.errors import UserError

GROUPS = ("first_subject", "middle_subject", "last_subject", "first_subsequent", "further", "last")
GROUP_LABELS = {"first_subject": "First subject token", "middle_subject": "Middle subject tokens",
                "last_subject": "Last subject token", "first_subsequent": "First subsequent token",
                "further": "Further tokens", "last": "Last token"}


@dataclass
class Fact:
    """One prompt without padding: ids [T], subject span [first, last] and a stable id for its noise."""

    index: int
    key: int
    ids: torch.Tensor
    subject_first: int
    subject_last: int


def facts_of(prompts) -> list[Fact]:
    """Unpadded facts of a PromptSet with roles subject_first / subject_last (padded coordinates)."""
    for role in ("subject_first", "subject_last"):
        if role not in prompts.roles:
            raise UserError(f"task {prompts.task!r} has no {role!r} role; causal tracing needs subject spans")
    keys = prompts.meta.get("known_id") or prompts.meta.get("fact_id") or list(range(len(prompts)))
    out = []
    for i in range(len(prompts)):
        mask = prompts.attention_mask[i].bool()
        pad = int((~mask).sum())
        ids = prompts.input_ids[i][mask]
        a, b = int(prompts.roles["subject_first"][i]) - pad, int(prompts.roles["subject_last"][i]) - pad
        if not 0 <= a <= b < len(ids):
            raise UserError(f"fact {i} ({prompts.prompts[i]!r}) has a subject span outside the prompt")
        out.append(Fact(i, int(keys[i]), ids, a, b))
    return out


def answer_fact(fact: Fact, answer: torch.Tensor) -> Fact:
    """The fact as the engines run it: a multi-token answer's tokens but the last follow the prompt, so the
    last K positions' logits score the whole answer (teacher forcing); restorations stay on the prompt."""
    if answer.shape[0] <= 1:
        return fact
    return replace(fact, ids=torch.cat([fact.ids, answer[:-1]]))


def token_groups(n_tokens: int, subject_first: int, subject_last: int) -> dict[str, list[int]]:
    """ROME's six token groups as positions (empty groups are skipped in averages).

    A one-token subject counts as both first and last subject token; the first subsequent token is the
    one after the subject unless that is the last token; further tokens lie between it and the last.
    """
    last = n_tokens - 1
    a, b = subject_first, subject_last
    return {"first_subject": [a], "middle_subject": list(range(a + 1, b)), "last_subject": [b],
            "first_subsequent": [b + 1] if b + 1 < last else [],
            "further": list(range(b + 2, last)), "last": [last]}


def position_groups(n_tokens: int, subject_first: int, subject_last: int) -> list[str]:
    """One group name per position (the subject's last token wins for one-token subjects)."""
    labels = ["before_subject"] * n_tokens
    for g, pos in token_groups(n_tokens, subject_first, subject_last).items():
        for p in pos:
            if labels[p] == "before_subject" or g in ("last_subject", "last"):
                labels[p] = g
    return labels


def subject_mask(prompts) -> torch.Tensor:
    """[N, T] bool: the subject tokens of every (left-padded) prompt."""
    sub = torch.zeros_like(prompts.attention_mask, dtype=torch.bool)
    T = prompts.input_ids.shape[1]
    for f in facts_of(prompts):
        pad = T - len(f.ids)
        sub[f.index, pad + f.subject_first: pad + f.subject_last + 1] = True
    return sub


@dataclass(repr=False)
class SubjectBatch:
    """Up to ``max_rows`` prompts as one forward's inputs, with their subject tokens' mask [n, T]
    (no generated ``__repr__``: it travels to NDIF by value)."""

    inputs: dict
    subject: torch.Tensor


def subject_batches(prompts, max_rows: int) -> tuple[torch.Tensor, list[SubjectBatch]]:
    """(subject mask [N, T], one ``SubjectBatch`` per ``max_rows`` prompts), with position ids that
    count from each prompt's first real token (left padding moves no position)."""
    sub = subject_mask(prompts)
    pos = (prompts.attention_mask.cumsum(-1) - 1).clamp_min(0)
    return sub, [SubjectBatch({"input_ids": prompts.input_ids[i:i + max_rows],
                               "attention_mask": prompts.attention_mask[i:i + max_rows],
                               "position_ids": pos[i:i + max_rows]}, sub[i:i + max_rows])
                 for i in range(0, len(prompts), max_rows)]
