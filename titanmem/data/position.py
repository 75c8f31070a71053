"""The training stream's position, carried over a change in the number of shards that read it.

Documents are dealt to shards round-robin: with S shards (data-parallel ranks × loader workers), shard s reads
documents s, s + S, s + 2S, ... and packs them into windows. A shard's position is (epoch, next_document, buffer):
how far into its share of the current epoch it is, and the tokens it has read but not yet yielded. The position of
the whole stream is the list of every shard's.

When a run resumes with another shard count S', `reshard` deals the stream out again without losing or repeating a
document. Every new shard starts at the earliest saved epoch and skips each document that the saved shards had
already read: a *consumed table* {shards, epochs, next} says that document d was read in epoch e when
e < epochs[d % shards], or e == epochs[d % shards] and d // shards < next[d % shards]. The saved shards' unfinished
buffers are handed to the new shards (old shard s to new shard s % S'), so no token is lost either; the only cost is
one transition between two buffers' tails that no document contains. A shard keeps the tables until it has passed
their last epoch, so a later change of the shard count composes with an earlier one.
"""

from __future__ import annotations

from typing import Any

ShardState = dict[str, Any]


def shard_states(loader_state: dict, num_workers: int) -> list[ShardState]:
    """The dataset positions inside a `StatefulDataLoader` state, one per loader worker (one with no workers)."""
    if num_workers == 0:
        return [loader_state["dataset_state"]]
    snapshots = loader_state["_snapshot"]["_worker_snapshots"]
    return [snapshots[f"worker_{worker}"]["dataset_state"] for worker in range(num_workers)]


def consumed_table(states: list[ShardState]) -> dict:
    """How far each of `states` (the shards of one shard count, in shard order) has read."""
    return {"shards": len(states), "epochs": [s["epoch"] for s in states], "next": [s["next_document"] for s in states]}


def is_consumed(tables: list[dict], document: int, epoch: int) -> bool:
    """Whether any earlier shard count already read `document` in `epoch`."""
    for table in tables:
        shard, index = document % table["shards"], document // table["shards"]
        saved_epoch = table["epochs"][shard]
        if epoch < saved_epoch or (epoch == saved_epoch and index < table["next"][shard]):
            return True
    return False


def reshard(states: list[ShardState], num_shards: int) -> list[ShardState]:
    """The positions of `num_shards` new shards that continue the stream of the saved shards `states`."""
    tables = []
    for state in states:
        for table in state.get("consumed", []):
            if table not in tables:
                tables.append(table)
    tables.append(consumed_table(states))
    start = min(state["epoch"] for state in states)
    new = [{"epoch": start, "next_document": 0, "buffer": [], "consumed": tables} for _ in range(num_shards)]
    for shard, state in enumerate(states):
        new[shard % num_shards]["buffer"].extend(state["buffer"])
    return new
