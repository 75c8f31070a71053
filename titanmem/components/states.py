"""The Stateful pieces of a training run that are not optimizers: the model, the lr schedule's position, the data
loader's position, the RNG states and the counters. Each turns itself into tensors and plain-data records for the
checkpoint (`titanmem.components.checkpoint`) and back.

The data loader and the RNGs are per process: their entries are keyed by data-parallel rank and by rank, because DCP
keeps a single copy of a plain tensor that every rank saves under one name.
"""

from __future__ import annotations

import logging
import random
import warnings
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from titanmem.components.records import decode_record, encode_record
from titanmem.data.position import reshard, shard_states

logger = logging.getLogger(__name__)


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
        # Put the scheduler at the saved position, and its lrs into the optimizer. This step only moves the position:
        # torch's warning about a scheduler step before any optimizer step does not apply (it shows when AdamW trains
        # nothing, as in sparse memory finetuning, whose optimizer state load then runs no step of its own).
        self.scheduler.last_epoch = int(state["last_epoch"]) - 1
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
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
    """The position in the training stream: this data-parallel rank's loader state, exact for a resume on the same
    data-parallel degree and loader workers, and every shard's position (`position`), which a resume on another
    number of shards deals out again (`titanmem.data.position`) unless `on_reshard` is `restart`."""

    def __init__(self, loader, dp_rank: int, dp_group=None, on_reshard: str = "continue"):
        self.loader = loader
        self.dp_rank = dp_rank
        self.dp_group = dp_group
        self.on_reshard = on_reshard
        self.key = f"dp_rank_{dp_rank}"

    def _num_shards(self) -> int:
        ranks = torch.distributed.get_world_size(self.dp_group) if self.dp_group is not None else 1
        return ranks * max(self.loader.num_workers, 1)

    def state_dict(self) -> dict:
        own = self.loader.state_dict()
        shards = shard_states(own, self.loader.num_workers)
        if self.dp_group is not None:
            gathered: list = [None] * torch.distributed.get_world_size(self.dp_group)
            torch.distributed.all_gather_object(gathered, shards, group=self.dp_group)
            shards = [state for rank_shards in gathered for state in rank_shards]
        return {"position": encode_record({"shards": shards}),
                self.key: encode_record({"num_workers": self.loader.num_workers, "state": own})}

    def load_state_dict(self, state: dict) -> None:
        own = decode_record(state[self.key]) if self.key in state else None
        saved = decode_record(state["position"])["shards"] if "position" in state else None
        if own is not None and own["num_workers"] == self.loader.num_workers and len(saved or []) == self._num_shards():
            self.loader.load_state_dict(own["state"])
            return
        if saved is None:
            return  # nothing saved: the stream starts afresh (the checkpoint manager warned)
        if self.on_reshard == "restart":
            logger.warning("the checkpoint's data was read by %d shards and this run has %d; data.on_reshard = "
                           "'restart' starts the data order afresh", len(saved), self._num_shards())
            return
        self.loader.dataset.continue_from(reshard(saved, self._num_shards()))
        if self.dp_rank == 0:
            logger.info("the data stream of %d shards continues on %d (no document skipped or repeated)",
                        len(saved), self._num_shards())


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
