"""Warmup, then linear, cosine or no decay to a floor. One multiplier scales every param group's own peak lr."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from titanmem.config.sections import LRScheduler as SchedulerConfig


class WarmupDecay:
    """lr multiplier for the update with 0-based index `step` (the update of training step `step + 1`), decaying over
    `decay_steps` (as the run plan resolved `lr_scheduler.decay_steps`).

    Warmup rises linearly so that update `warmup - 1` is the first at the peak; the decay then reaches its floor
    exactly at the last update of the run (or of `decay_steps`)."""

    def __init__(self, config: SchedulerConfig, decay_steps: int):
        self.warmup = config.warmup_steps
        self.decay = decay_steps
        self.kind = config.decay_type
        self.floor = config.min_lr_factor

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            # (step + 1): the very first update already moves, with a small lr, instead of being wasted at lr 0.
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        progress = min((step - self.warmup + 1) / self.decay, 1.0)
        if self.kind == "linear":
            shape = 1.0 - progress
        else:
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.floor + (1.0 - self.floor) * shape


def build_lr_scheduler(optimizer: torch.optim.Optimizer, config: SchedulerConfig, decay_steps: int) -> LambdaLR:
    return LambdaLR(optimizer, WarmupDecay(config, decay_steps))
