"""Warmup, then linear, cosine or no decay to a floor. One multiplier scales every param group's own peak lr."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from titanmem.config.sections import LRScheduler as SchedulerConfig
from titanmem.registry import LR_DECAYS


def linear_decay(progress: float, floor: float) -> float:
    """The lr multiplier at `progress` (0 to 1) through the decay: a straight line from the peak (1) to `floor`."""
    return floor + (1.0 - floor) * (1.0 - progress)


def cosine_decay(progress: float, floor: float) -> float:
    """Half a cosine from the peak to `floor`."""
    return floor + (1.0 - floor) * (0.5 * (1.0 + math.cos(math.pi * progress)))


def constant_decay(progress: float, floor: float) -> float:
    """No decay: the peak to the end."""
    return 1.0


class WarmupDecay:
    """lr multiplier for the update with 0-based index `step` (the update of training step `step + 1`), decaying over
    `decay_steps` (as the run plan resolved `lr_scheduler.decay_steps`) in the shape `lr_scheduler.decay_type` names
    (`titanmem.registry.LR_DECAYS`).

    Warmup rises linearly so that update `warmup - 1` is the first at the peak; the decay then reaches its floor
    exactly at the last update of the run (or of `decay_steps`)."""

    def __init__(self, config: SchedulerConfig, decay_steps: int):
        self.warmup = config.warmup_steps
        self.decay = decay_steps
        self.decay_shape = LR_DECAYS.load(config.decay_type)
        self.floor = config.min_lr_factor

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            # (step + 1): the very first update already moves, with a small lr, instead of being wasted at lr 0.
            return (step + 1) / self.warmup
        progress = min((step - self.warmup + 1) / self.decay, 1.0)
        return self.decay_shape(progress, self.floor)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, config: SchedulerConfig, decay_steps: int) -> LambdaLR:
    return LambdaLR(optimizer, WarmupDecay(config, decay_steps))
