"""The PromptSet every task produces and every analysis consumes.

A PromptSet is built *for one tokenizer*: prompts are tokenized once, left-padded, and every named
position (role) is stored in padded coordinates, so analyses index tensors directly.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from interpkit.errors import UserError


@dataclass
class PromptSet:
    """Tokenized prompts, optional same-shape corrupted counterparts, answers and named positions.

    answer_ids / wrong_ids are [N, k] with -1 padding, so tasks with several correct answers
    (Greater-Than: every year above YY) share one metric with single-answer tasks.
    roles maps a role name ("IO", "S2", "end", "subject_last", ...) to an [N] tensor of positions.
    """

    task: str
    prompts: list[str]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    answer_ids: torch.Tensor
    wrong_ids: torch.Tensor | None = None
    corrupted_prompts: list[str] | None = None
    corrupted_ids: torch.Tensor | None = None
    corrupted_mask: torch.Tensor | None = None
    roles: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, list] = field(default_factory=dict)
    n_filtered: int = 0

    def __len__(self) -> int:
        return len(self.prompts)

    def __post_init__(self) -> None:
        if len(self.prompts) == 0:
            raise UserError(f"task {self.task!r} produced no usable prompts for this tokenizer "
                            f"({self.n_filtered} filtered); use another model or relax the task options")

    def subset(self, idx: list[int] | torch.Tensor) -> "PromptSet":
        """Rows idx, with padding columns that every kept row pads trimmed away."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        masks = [self.attention_mask[idx]] + ([self.corrupted_mask[idx]] if self.corrupted_mask is not None else [])
        keep_from = int(min(int((m.sum(0) == 0).sum()) for m in masks))
        pick = lambda t: None if t is None else t[idx][:, keep_from:]  # noqa: E731
        return PromptSet(
            task=self.task,
            prompts=[self.prompts[i] for i in idx.tolist()],
            input_ids=pick(self.input_ids),
            attention_mask=pick(self.attention_mask),
            answer_ids=self.answer_ids[idx],
            wrong_ids=None if self.wrong_ids is None else self.wrong_ids[idx],
            corrupted_prompts=None if self.corrupted_prompts is None else [self.corrupted_prompts[i] for i in idx.tolist()],
            corrupted_ids=pick(self.corrupted_ids),
            corrupted_mask=pick(self.corrupted_mask),
            roles={k: v[idx] - keep_from for k, v in self.roles.items()},
            meta={k: [v[i] for i in idx.tolist()] for k, v in self.meta.items()},
            n_filtered=self.n_filtered,
        )

    def batch(self, corrupted: bool = False) -> dict[str, torch.Tensor]:
        """Model inputs for the clean (or corrupted) prompts. nnsight derives position ids from the mask,
        so left padding does not shift absolute positions; plain HF references must pass them."""
        if corrupted and self.corrupted_ids is None:
            raise UserError(f"task {self.task!r} has no corrupted prompts; pick a task with pairs")
        ids, mask = (self.corrupted_ids, self.corrupted_mask) if corrupted else (self.input_ids, self.attention_mask)
        return {"input_ids": ids, "attention_mask": mask}

    def role(self, name: str) -> torch.Tensor:
        """The [N] positions of role ``name``, or a one-line error naming the roles there are."""
        if name not in self.roles:
            raise UserError(f"task {self.task!r} has no role {name!r} ({', '.join(sorted(self.roles))})")
        return self.roles[name]

    def meta_field(self, name: str) -> list:
        """The per-row values of meta field ``name``, or a one-line error naming the fields there are."""
        if name not in self.meta:
            raise UserError(f"task {self.task!r} has no meta field {name!r} "
                            f"(has: {', '.join(sorted(self.meta)) or 'none'})")
        return self.meta[name]

    @property
    def multi_token(self) -> bool:
        """Whether some answer (or wrong answer) of your own data is several tokens long."""
        return any(len(seq) > 1 for key in ("answer_seq", "wrong_seq") for seq in self.meta.get(key) or [])

    def sequences(self, which: str = "answer") -> list[list[int]]:
        """Each row's whole answer (``which="wrong"``: wrong answer) as token ids: ``meta["answer_seq"]`` /
        ``meta["wrong_seq"]`` for your own data, else the first token of ``answer_ids`` / ``wrong_ids``."""
        seqs = self.meta.get("answer_seq" if which == "answer" else "wrong_seq")
        if seqs and all(seqs):
            return [list(s) for s in seqs]
        ids = self.answer_ids if which == "answer" else self.wrong_ids
        if ids is None:
            raise UserError(f"these prompts have no {which} answers to score")
        return [[int(r[0])] for r in ids]


def append_tokens(batch: dict[str, torch.Tensor], seqs: list[list[int]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Model inputs ``batch`` + each row's ``seqs`` (teacher forcing), right-padded with the attention mask
    off (causal attention keeps the padding away from real tokens), and the [B, K] tokens (-1 padded).
    Rows padded on both sides get explicit position ids counted from their first token (nnsight only
    corrects rows padded on the left)."""
    if any(len(s) == 0 for s in seqs):
        raise UserError("an answer has no tokens; every row needs a non-empty answer")
    ans = torch.full((len(seqs), max(len(s) for s in seqs)), -1, dtype=torch.long)
    for i, s in enumerate(seqs):
        ans[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    mask = torch.cat([batch["attention_mask"], (ans >= 0).long()], 1)
    return {"input_ids": torch.cat([batch["input_ids"], ans.clamp_min(0)], 1), "attention_mask": mask,
            "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}, ans
