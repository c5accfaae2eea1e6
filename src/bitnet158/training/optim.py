"""Optimizers and schedules: AdamW or SGD, and the learning rate and weight decay of every step.

`two_stage` is the BitNet b1.58 recipe ("The Era of 1-bit LLMs: Training Tips, Code and FAQ" and the
BitNet b1.58 2B4T report): a high peak learning rate with a cosine decay in stage 1, then an abrupt cool-down
to a lower peak (`lr_stage2`, by default 2/3 of `lr`, as in the paper's table) decaying again in stage 2.
Weight decay follows a cosine from `weight_decay` to 0 in stage 1 and is 0 in stage 2: ternary weights have
few values to move between, and late decay only pulls latent weights towards the rounding boundary.
The other schedules keep the weight decay constant. Every schedule starts with a linear warm-up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

STAGE1_END_RATIO = 0.8  # two_stage: stage 1 decays from lr to this fraction of it before the drop to lr_stage2


@dataclass(frozen=True)
class Schedule:
    kind: str  # two_stage, cosine, linear or constant
    lr: float
    total: int
    warmup: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    lr_stage2: float | None = None
    stage_split: float = 0.5

    @property
    def split_step(self) -> int:
        return max(self.warmup, round(self.total * self.stage_split))

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step `step` (0-based)."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if self.kind == "constant":
            return self.lr
        if self.kind == "two_stage":
            split = self.split_step
            if step < split:
                return _cosine(self.lr, self.lr * STAGE1_END_RATIO, (step - self.warmup) / max(1, split - self.warmup))
            peak2 = self.lr_stage2 if self.lr_stage2 is not None else self.lr * 2 / 3
            return _cosine(peak2, peak2 * self.min_lr_ratio, (step - split) / max(1, self.total - split))
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        end = self.lr * self.min_lr_ratio
        if self.kind == "linear":
            return self.lr + (end - self.lr) * progress
        return _cosine(self.lr, end, progress)

    def weight_decay_at(self, step: int) -> float:
        if self.kind != "two_stage":
            return self.weight_decay
        split = self.split_step
        if step >= split:
            return 0.0
        return _cosine(self.weight_decay, 0.0, step / max(1, split))


def _cosine(start: float, end: float, progress: float) -> float:
    progress = min(1.0, max(0.0, progress))
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(
    model: nn.Module,
    kind: str,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
    momentum: float = 0.9,
    fused: bool = False,
) -> torch.optim.Optimizer:
    """Matrices (linear weights and embeddings) get weight decay; norm weights and biases do not.

    The decayed group is first, so that the trainer can set its decay every step (group["decays"])."""
    params = [p for p in model.parameters() if p.requires_grad]  # a tied embedding appears once
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay, "decays": True},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "decays": False},
    ]
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=fused)


def set_step_hyperparameters(optimizer: torch.optim.Optimizer, schedule: Schedule, step: int) -> tuple[float, float]:
    lr, wd = schedule.lr_at(step), schedule.weight_decay_at(step)
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group.get("decays"):
            group["weight_decay"] = wd
    return lr, wd
