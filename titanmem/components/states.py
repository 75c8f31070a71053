"""The Stateful pieces of a training run that are not optimizers: the model, the lr schedule's position, the data
loader's position, the RNG states and the counters. Each turns itself into tensors and plain-data records for the
checkpoint (`titanmem.components.checkpoint`) and back.

The data loader and the RNGs are per process: their entries are keyed by data-parallel rank and by rank, because DCP
keeps a single copy of a plain tensor that every rank saves under one name.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from titanmem.components.records import decode_record, encode_record
from titanmem.config.errors import ConfigError


class ModelState:
    """The model's parameters by name, whatever the plan shards them as (DCP reshards on load)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def state_dict(self) -> dict:
        return get_model_state_dict(self.model)

    def load_state_dict(self, state: dict) -> None:
        set_model_state_dict(self.model, state)


class SchedulerState:
    """Only the position in the schedule: its shape is rebuilt from the config, so a relaunch with more steps or
    another lr takes effect instead of being overwritten by the saved schedule."""

    def __init__(self, scheduler: torch.optim.lr_scheduler.LRScheduler):
        self.scheduler = scheduler

    def state_dict(self) -> dict:
        return {"last_epoch": torch.tensor(self.scheduler.last_epoch, dtype=torch.int64)}

    def load_state_dict(self, state: dict) -> None:
        # Put the scheduler at the saved position, and its lrs into the optimizer.
        self.scheduler.last_epoch = int(state["last_epoch"]) - 1
        self.scheduler.step()


@dataclass
class TrainState:
    """Counters that must survive a restart."""

    step: int = 0
    tokens_seen: int = 0
    nonfinite_skips: int = 0

    def state_dict(self) -> dict:
        return {f.name: torch.tensor(getattr(self, f.name), dtype=torch.int64) for f in fields(self)}

    def load_state_dict(self, state: dict) -> None:
        for f in fields(self):
            setattr(self, f.name, int(state[f.name]))


class DataLoaderState:
    """This data-parallel rank's position in its shard of the stream."""

    def __init__(self, loader, dp_rank: int):
        self.loader = loader
        self.key = f"dp_rank_{dp_rank}"

    def state_dict(self) -> dict:
        return {self.key: encode_record({"num_workers": self.loader.num_workers, "state": self.loader.state_dict()})}

    def load_state_dict(self, state: dict) -> None:
        if self.key not in state:
            return
        saved = decode_record(state[self.key])
        if saved["num_workers"] != self.loader.num_workers:
            raise ConfigError(
                "data.num_workers",
                f"the checkpoint was saved with {saved['num_workers']} loader workers, whose stream positions cannot "
                f"be mapped onto {self.loader.num_workers}; resume with --data.num_workers {saved['num_workers']}",
            )
        self.loader.load_state_dict(saved["state"])


class RNGState:
    """Python's, NumPy's and torch's generators of this rank."""

    def __init__(self, rank: int):
        self.key = f"rank_{rank}"

    def state_dict(self) -> dict:
        kind, keys, position, has_gauss, cached = np.random.get_state()
        state = {
            "python": encode_record(random.getstate()),
            "numpy": encode_record([kind, keys.tolist(), position, has_gauss, cached]),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state()
        return {self.key: state}

    def load_state_dict(self, state: dict) -> None:
        state = state.get(self.key, {})
        if "python" in state:
            random.setstate(decode_record(state["python"]))
        if "numpy" in state:
            kind, keys, position, has_gauss, cached = decode_record(state["numpy"])
            np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
        if "torch" in state:
            torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
