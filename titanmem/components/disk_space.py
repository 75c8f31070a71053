"""Will the run's checkpoints fit on its disk? Checked at start, before the first step.

One checkpoint holds the model and the optimizers' state; the rest (data loader, RNG, schedule, counters, DCP's
index and the manifest) is small. Its size follows from the global shapes, whatever the plan: each shard of a
sharded tensor is written once, and replicas are written once. `keep_latest_k` complete checkpoints stay, and a save
in flight adds one more before the oldest is removed.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist

from titanmem.config.errors import ConfigError

logger = logging.getLogger(__name__)

GB = 1e9


def checkpoint_bytes(model: torch.nn.Module, optimizers) -> int:
    """About one checkpoint's bytes: every parameter, AdamW's two moments of the parameters it trains (they exist only
    after the first step, so they are counted from the parameters), and the value optimizer's state."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += sum(2 * p.numel() * p.element_size() for group in optimizers.dense.param_groups for p in group["params"])
    if optimizers.values is not None:
        total += _tensor_bytes(optimizers.values.state_dict())
    return total


def _tensor_bytes(state) -> int:
    if isinstance(state, dict):
        return sum(_tensor_bytes(value) for value in state.values())
    return state.numel() * state.element_size() if isinstance(state, torch.Tensor) else 0


def free_bytes(folder: Path) -> int:
    """Bytes this user may still write where `folder` is (or would be created): the filesystem's free space available
    to unprivileged users, which on filesystems that report a quota through statvfs is the quota's."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    stats = os.statvfs(existing)
    return stats.f_bavail * stats.f_frsize


def check_checkpoint_space(folder: Path, one_checkpoint: int, keep_latest_k: int, complete: int) -> None:
    """Refuse, in one line, a folder that cannot hold one more checkpoint; warn when it cannot hold what
    `keep_latest_k` keeps (`complete` checkpoints are there already, and their space is taken). Every rank decides
    on the least free space any rank sees, so that all stop or all go on."""
    free = free_bytes(folder)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        views: list = [None] * dist.get_world_size()
        dist.all_gather_object(views, free)
        free = min(views)
    if free < one_checkpoint:
        raise ConfigError("checkpoint.folder", f"{folder} has {free / GB:.2f} GB free, but one checkpoint of this run "
                          f"takes about {one_checkpoint / GB:.2f} GB: free space there, or point job.dump_folder at a "
                          "larger filesystem")
    # With keep_latest_k = 0 every checkpoint stays: the first one short of space ends the run, as any full disk does.
    kept = keep_latest_k if keep_latest_k > 0 else complete + 1
    wanted = max(kept + 1 - complete, 1) * one_checkpoint
    if free < wanted:
        logger.warning("%s has %.2f GB free; each checkpoint takes about %.2f GB, and keep_latest_k = %d with a save in "
                       "flight needs %.2f GB more: a later save will find the disk full (a partial checkpoint is "
                       "never resumed from). Free space, or lower checkpoint.keep_latest_k", folder, free / GB,
                       one_checkpoint / GB, keep_latest_k, wanted / GB)
