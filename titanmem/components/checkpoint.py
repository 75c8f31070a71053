"""Distributed checkpoints (DCP) in `step-N` folders that are either complete or ignored.

A save writes into `step-N.partial`, and only after every rank has finished is it renamed to `step-N`; a rename is
atomic, so a crash at any moment leaves either the old set of checkpoints or the old set plus one complete new one.
Resume picks the newest `step-N` that holds DCP's `.metadata` file.

What is saved: model and optimizer (by parameter name, so a later run may shard them differently), the lr scheduler,
the training counters, and per rank the data loader's position and the RNG states (under rank-specific keys, because
DCP keeps one copy of a key that every rank writes).
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import re
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from titanmem.config.errors import ConfigError
from titanmem.config.sections import Checkpoint as CheckpointConfig

logger = logging.getLogger(__name__)

# Single-process runs save without a process group on purpose; DCP warns about that on every call.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

_STEP_FOLDER = re.compile(r"^step-(\d+)$")
_OPTIMIZER_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


@dataclass
class TrainState:
    """Counters that must survive a restart."""

    step: int = 0
    tokens_seen: int = 0
    nonfinite_skips: int = 0


def complete_checkpoint_steps(folder: str | Path) -> list[int]:
    """Steps of the complete checkpoints in `folder`, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    steps = []
    for entry in folder.iterdir():
        match = _STEP_FOLDER.match(entry.name)
        if match and (entry / ".metadata").is_file():
            steps.append(int(match.group(1)))
    return sorted(steps)


def checkpoint_folder(config: CheckpointConfig, dump_folder: str) -> Path:
    return Path(dump_folder) / config.folder


def check_load_step(config: CheckpointConfig, dump_folder: str) -> None:
    if config.enable and config.load_step != -1:
        steps = complete_checkpoint_steps(checkpoint_folder(config, dump_folder))
        if config.load_step not in steps:
            raise ConfigError(
                "checkpoint.load_step",
                f"no complete checkpoint step-{config.load_step} in {checkpoint_folder(config, dump_folder)}; "
                f"complete steps: {steps or 'none'}",
            )


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class CheckpointManager:
    def __init__(
        self,
        config: CheckpointConfig,
        dump_folder: str,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
        dataloader,
        train_state: TrainState,
        total_steps: int,
        rank: int = 0,
        dp_rank: int = 0,
    ):
        self.config = config
        self.folder = checkpoint_folder(config, dump_folder)
        self.model = model
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.dataloader = dataloader
        self.train_state = train_state
        self.total_steps = total_steps
        self.rank = rank
        self.dp_rank = dp_rank
        self.last_saved_step = -1

    # Layout of the state dict. Non-tensor values are pickled to bytes; DCP stores bytes as opaque blobs.
    def _state_dict(self) -> dict[str, Any]:
        return {
            "model": get_model_state_dict(self.model),
            "optimizer": get_optimizer_state_dict(self.model, self.optimizer, options=_OPTIMIZER_OPTIONS),
            "lr_scheduler": pickle.dumps(self.lr_scheduler.state_dict()),
            "train_state": pickle.dumps(asdict(self.train_state)),
            "dataloader": {f"dp_rank_{self.dp_rank}": pickle.dumps(self.dataloader.state_dict())},
            "rng": {f"rank_{self.rank}": pickle.dumps(_rng_state())},
        }

    def save(self, step: int) -> Path:
        final = self.folder / f"step-{step}"
        partial = self.folder / f"step-{step}.partial"
        if self.rank == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
        _barrier()
        dcp.save(self._state_dict(), checkpoint_id=str(partial))
        _barrier()
        if self.rank == 0:
            if final.exists():
                self._remove(final)
            os.replace(partial, final)
            self._fsync_folder()
            self._purge_old()
        _barrier()
        self.last_saved_step = step
        logger.info("saved checkpoint %s", final)
        return final

    def maybe_save(self, step: int) -> None:
        if not self.config.enable or step == self.last_saved_step:
            return
        if step % self.config.interval == 0 or step == self.total_steps:
            self.save(step)

    def load(self) -> int | None:
        """Restore the newest complete checkpoint (or `load_step`); returns its step, or None for a fresh start."""
        if not self.config.enable:
            return None
        steps = complete_checkpoint_steps(self.folder)
        if self.config.load_step != -1:
            steps = [s for s in steps if s == self.config.load_step]
        if not steps:
            return None
        step = steps[-1]
        path = self.folder / f"step-{step}"
        state = self._state_dict()
        saved_keys = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata.keys()
        for section in ("dataloader", "rng"):
            key = next(iter(state[section]))
            if f"{section}.{key}" not in saved_keys:
                logger.warning("%s has no %s state for %s; it starts fresh on this rank", path, section, key)
                del state[section]
        dcp.load(state, checkpoint_id=str(path))
        set_model_state_dict(self.model, state["model"])
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=_OPTIMIZER_OPTIONS)
        self.lr_scheduler.load_state_dict(pickle.loads(state["lr_scheduler"]))
        for key, value in pickle.loads(state["train_state"]).items():
            setattr(self.train_state, key, value)
        if "dataloader" in state:
            self.dataloader.load_state_dict(pickle.loads(next(iter(state["dataloader"].values()))))
        if "rng" in state:
            _set_rng_state(pickle.loads(next(iter(state["rng"].values()))))
        self.last_saved_step = step
        logger.info("resumed from %s", path)
        return step

    def _purge_old(self) -> None:
        if self.config.keep_latest_k <= 0:
            return
        for step in complete_checkpoint_steps(self.folder)[: -self.config.keep_latest_k]:
            self._remove(self.folder / f"step-{step}")

    @staticmethod
    def _remove(path: Path) -> None:
        # Rename first, so a crash mid-delete never leaves a half-deleted folder that still looks complete.
        doomed = path.with_name(path.name + ".deleting")
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    def _fsync_folder(self) -> None:
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
