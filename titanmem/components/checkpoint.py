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


def newest_checkpoint(config: CheckpointConfig, dump_folder: str) -> Path | None:
    """The newest complete `step-N` folder of a run, or None."""
    steps = complete_checkpoint_steps(checkpoint_folder(config, dump_folder))
    return checkpoint_folder(config, dump_folder) / f"step-{steps[-1]}" if steps else None


def load_model_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Only the model's weights from a checkpoint folder (for generation and eval; no optimizer or data state)."""
    if not (Path(path) / ".metadata").is_file():
        raise ConfigError("generate.checkpoint", f"{path} is not a complete checkpoint (no .metadata file)")
    state = {"model": get_model_state_dict(model)}
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])


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
        value_optimizer=None,
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
        self.value_optimizer = value_optimizer
        self.total_steps = total_steps
        self.rank = rank
        self.dp_rank = dp_rank
        self.last_saved_step = -1

    # Layout of the state dict. Non-tensor values are pickled to bytes; DCP stores bytes as opaque blobs.
    def _state_dict(self) -> dict[str, Any]:
        state = {
            "model": get_model_state_dict(self.model),
            "optimizer": get_optimizer_state_dict(self.model, self.optimizer, options=_OPTIMIZER_OPTIONS),
            # Only the position in the schedule: its shape is rebuilt from the config, so a relaunch with more steps
            # or another lr takes effect instead of being overwritten by the saved schedule.
            "lr_scheduler": pickle.dumps({"last_epoch": self.lr_scheduler.last_epoch}),
            "train_state": pickle.dumps(asdict(self.train_state)),
            "dataloader": {
                f"dp_rank_{self.dp_rank}": pickle.dumps(
                    {"num_workers": self.dataloader.num_workers, "state": self.dataloader.state_dict()}
                )
            },
            "rng": {f"rank_{self.rank}": pickle.dumps(_rng_state())},
        }
        if self.value_optimizer is not None:
            # Tensors, loaded in place by DCP like the model's.
            state["value_optimizer"] = self.value_optimizer.state_dict()
        return state

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
        for section in ("dataloader", "rng", "value_optimizer"):
            key = next(iter(state.get(section, {})), None)
            prefix = f"{section}.{key}"
            if key is not None and not any(k == prefix or k.startswith(prefix + ".") for k in saved_keys):
                logger.warning("%s has no %s state for %s; it starts fresh", path, section, key)
                del state[section]
        dcp.load(state, checkpoint_id=str(path))
        if "dataloader" in state:
            loader = pickle.loads(next(iter(state["dataloader"].values())))
            if loader["num_workers"] != self.dataloader.num_workers:
                raise ConfigError(
                    "data.num_workers",
                    f"{path} was saved with {loader['num_workers']} loader workers, whose stream positions cannot be "
                    f"mapped onto {self.dataloader.num_workers}; resume with --data.num_workers {loader['num_workers']}",
                )
            self.dataloader.load_state_dict(loader["state"])
        set_model_state_dict(self.model, state["model"])
        self._load_optimizer_keeping_config(state["optimizer"], path)
        self._resume_schedule(pickle.loads(state["lr_scheduler"])["last_epoch"])
        if "value_optimizer" in state:
            self.value_optimizer.load_state_dict(state["value_optimizer"])
        for key, value in pickle.loads(state["train_state"]).items():
            setattr(self.train_state, key, value)
        if "rng" in state:
            _set_rng_state(pickle.loads(next(iter(state["rng"].values()))))
        if self.config.load_step != -1 and self.rank == 0:
            self._set_aside_newer_than(step)
        self.last_saved_step = step
        logger.info("resumed from %s", path)
        return step

    def _load_optimizer_keeping_config(self, saved: dict[str, Any], path: Path) -> None:
        """Restore the optimizer's moments and step counts; its hyperparameters stay those of the current config."""
        configured = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        set_optimizer_state_dict(self.model, self.optimizer, saved, options=_OPTIMIZER_OPTIONS)
        for group, wanted in zip(self.optimizer.param_groups, configured):
            changed = {k: (group.get(k), v) for k, v in wanted.items() if k != "lr" and group.get(k) != v}
            if changed and self.rank == 0:
                logger.info("group %s: config overrides %s", wanted.get("name"),
                            ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items()))
            group.update(wanted)

    def _resume_schedule(self, last_epoch: int) -> None:
        """Put the scheduler (built from the config) at the saved position, and its lrs into the optimizer."""
        self.lr_scheduler.last_epoch = last_epoch - 1
        self.lr_scheduler.step()

    def _set_aside_newer_than(self, step: int) -> None:
        """Resuming from an older `load_step` starts a new timeline: the newer checkpoints are renamed out of the
        way (kept, not deleted), so that a plain relaunch later continues this timeline and not the abandoned one."""
        for newer in [s for s in complete_checkpoint_steps(self.folder) if s > step]:
            source = self.folder / f"step-{newer}"
            target = self.folder / f"step-{newer}.abandoned-at-{step}"
            os.replace(source, target)
            logger.warning("set aside %s as %s: this run resumes from step-%d", source.name, target.name, step)

    def _purge_old(self) -> None:
        """Drop checkpoints beyond keep_latest_k, and debris of earlier crashes (partial saves, interrupted deletes)."""
        for debris in self.folder.iterdir():
            if debris.name.endswith((".partial", ".deleting")):
                shutil.rmtree(debris, ignore_errors=True)
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
