"""What the small-model trainers share: the optimisation fields of their configs, the learning-rate
schedule they define and AdamW with weight decay on matrices only (the checkpoint format stores its
moments in this parameter order)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Optimisation:
    """The optimisation part of a training config (trainer configs inherit it and may change defaults)."""

    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    schedule: str = "cosine"              # "cosine", "linear" or "constant" (after warmup)
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    seed: int = 0
    threads: int | None = 2

    def lr_at(self, step: int) -> float:
        """Learning rate of ``step`` (0-based): linear warmup, then cosine/linear decay to min_lr_ratio x lr
        (or constant); a pure function of the step, so resumed runs follow the same schedule."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return self.lr
        frac = min(1.0, (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps))
        decay = 0.5 * (1 + math.cos(math.pi * frac)) if self.schedule == "cosine" else 1 - frac
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * decay)

    def optimizer(self, model: torch.nn.Module) -> torch.optim.AdamW:
        """AdamW; biases and norm gains (1-d parameters) are not decayed."""
        decay = [p for p in model.parameters() if p.ndim >= 2]
        rest = [p for p in model.parameters() if p.ndim < 2]
        return torch.optim.AdamW([{"params": decay, "weight_decay": self.weight_decay},
                                  {"params": rest, "weight_decay": 0.0}], lr=self.lr, betas=self.betas, eps=1e-8)
