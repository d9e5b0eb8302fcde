"""What the small-model trainers share: the optimisation fields of their configs, the learning-rate
schedule they define, AdamW with weight decay on matrices only (the checkpoint format stores its
moments in this parameter order) and the optimiser step."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from interpkit.errors import UserError


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

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)            # a list after a JSON round trip (recipe.json, checkpoints)
        if self.schedule not in ("cosine", "linear", "constant"):
            raise UserError(f"unknown schedule {self.schedule!r}; use cosine, linear or constant")
        self.validate()

    def validate(self) -> None:
        """A trainer config's own checks (raise UserError), run on construction after the shared ones."""

    @classmethod
    def from_dict(cls, d: dict) -> Optimisation:
        """The config saved in ``d`` (recipe.json, a checkpoint); keys that are not fields are ignored."""
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

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

    def update(self, opt: torch.optim.Optimizer, model: torch.nn.Module, loss: torch.Tensor, step: int) -> None:
        """One update of training step ``step`` (0-based): its learning rate, backward, gradient clipping
        to ``grad_clip`` (0: none), then the optimiser step."""
        for group in opt.param_groups:
            group["lr"] = self.lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip)
        opt.step()
