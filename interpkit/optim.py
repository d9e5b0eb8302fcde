"""What the small-model trainers share: the learning-rate schedule and AdamW with weight decay on
matrices only (the checkpoint format stores its moments in this parameter order)."""
from __future__ import annotations

import math

import torch


def lr_at(step: int, *, lr: float, warmup_steps: int, steps: int, min_lr_ratio: float,
          schedule: str = "cosine") -> float:
    """Learning rate of ``step`` (0-based): linear warmup, then cosine/linear decay to min_lr_ratio x lr
    (or constant); a pure function of the step, so resumed runs follow the same schedule."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    frac = min(1.0, (step - warmup_steps) / max(1, steps - warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * frac)) if schedule == "cosine" else 1 - frac
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * decay)


def adamw(model: torch.nn.Module, *, lr: float, betas: tuple[float, float], weight_decay: float) -> torch.optim.AdamW:
    """AdamW; biases and norm gains (1-d parameters) are not decayed."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=lr, betas=betas, eps=1e-8)
