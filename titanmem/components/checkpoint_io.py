"""Reading and writing DCP checkpoints so that a folder received from elsewhere cannot run code.

DCP keeps its index (`.metadata`) as a pickle and stores every non-tensor value as a pickle too, which it unpickles
with no restriction on load. titanmem checkpoints hold tensors only (plain data goes in as JSON records,
`titanmem.components.records`), so:
- the index is read with an unpickler that builds DCP's own metadata classes and nothing else;
- a checkpoint entry stored as a pickled object is refused instead of unpickled.
"""

from __future__ import annotations

import dataclasses
import pickle
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

from titanmem.config.errors import ConfigError

E = TypeVar("E", bound=BaseException)

_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
                 "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class UnsafeCheckpointError(ConfigError):
    """A checkpoint folder holds something other than tensors and DCP's index."""

    def __init__(self, problem: str):
        super().__init__("checkpoint.folder", problem)


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_CLASSES or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                     torch.dtype)):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(f"the checkpoint index refers to {module}.{name}, which is not checkpoint "
                                    "metadata; refusing to load it")


class SafeReader(dcp.FileSystemReader):
    """DCP's file reader, with an index that can only build metadata, reading with `threads` threads.

    DCP's own reader reads a rank's items one after the other; a single stream stays far below what a disk (or a
    cluster file system) delivers to several. Here the items are dealt into `threads` groups of about equal bytes, and
    each group is read by DCP's reader in a thread of its own (its files opened by that thread)."""

    def __init__(self, path: str, threads: int = 1):
        super().__init__(path)
        self.threads = threads

    def read_data(self, plan, planner):
        groups = groups_by_bytes(plan.items, lambda item: self.storage_data[item.storage_index].length,
                                  self.threads)
        if len(groups) <= 1:
            return super().read_data(plan, planner)
        read = super().read_data
        with ThreadPoolExecutor(len(groups), thread_name_prefix="checkpoint-read") as pool:
            futures = [pool.submit(read, dataclasses.replace(plan, items=items), planner) for items in groups]
            for future in futures:
                future.result().wait()
        return _done()

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        try:
            with self.fs.create_stream(path, "rb") as handle:
                metadata = _MetadataUnpickler(handle).load()
        except UnsafeCheckpointError:
            raise
        except Exception as e:  # truncated, empty or garbage: whatever the unpickler trips on
            raise ConfigError("checkpoint.folder", f"{path} cannot be read ({error_reason(e)}): the checkpoint is "
                              "damaged; load an earlier one (checkpoint.load_step)") from None
        if not isinstance(metadata, Metadata):
            raise UnsafeCheckpointError(f"{path} is not a DCP index (it holds a {type(metadata).__name__})")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class TensorsOnlyPlanner(DefaultLoadPlanner):
    """Loads tensors; an entry that the checkpoint stores as a pickled object is refused, never unpickled."""

    def load_bytes(self, read_item, value) -> None:
        raise UnsafeCheckpointError(f"checkpoint entry {read_item.dest_index.fqn} is a pickled object; titanmem "
                                    "checkpoints hold tensors only")


def groups_by_bytes(items: list, size, count: int) -> list[list]:
    """`items` dealt into at most `count` non-empty groups of about equal total `size`, largest first to the lightest
    group (a group keeps its items in their order in `items`)."""
    if count <= 1 or len(items) <= 1:
        return [list(items)] if items else []
    loads = [0] * min(count, len(items))
    members: list[list[int]] = [[] for _ in loads]
    for position in sorted(range(len(items)), key=lambda i: -size(items[i])):
        lightest = loads.index(min(loads))
        loads[lightest] += size(items[position])
        members[lightest].append(position)
    return [[items[i] for i in sorted(group)] for group in members if group]


def _done():
    future = torch.futures.Future()
    future.set_result(None)
    return future


def read_metadata(path: str | Path) -> Metadata:
    return SafeReader(str(path)).read_metadata()


def saved_shapes(path: str | Path) -> dict[str, torch.Size | None]:
    """Every entry of a checkpoint: its global shape, or None for a (refused) pickled object."""
    return {key: getattr(entry, "size", None) for key, entry in read_metadata(path).state_dict_metadata.items()}


def load_tensors(state: dict, path: str | Path, threads: int = 1) -> None:
    """Load `state` (nested dicts of tensors, DTensors included) in place from the checkpoint at `path`, with `threads`
    reading threads per rank. Every entry must be in the checkpoint with the same global shape."""
    # Checked here first, so that a mismatch reaches the user as one line rather than wrapped by DCP.
    entries = read_metadata(path).state_dict_metadata
    missing = []
    for key, value in flatten(state).items():
        entry = entries.get(key)
        if entry is None:
            missing.append(key)
        elif not isinstance(entry, TensorStorageMetadata):
            raise UnsafeCheckpointError(f"checkpoint entry {key} in {path} is a pickled object; titanmem checkpoints "
                                        "hold tensors only")
        elif tuple(entry.size) != tuple(value.shape):
            raise ConfigError("checkpoint.folder", f"{path} holds {key} of shape {list(entry.size)}, but this run's "
                              f"is {list(value.shape)}: the model settings differ from the run that saved it; pass "
                              "that run's config (its config.toml)")
    if missing:
        raise ConfigError("checkpoint.folder", f"{path} lacks {len(missing)} entries this run needs (first: "
                          f"{missing[0]}): it was saved by another model, or is incomplete; pass the config of the run "
                          "that saved it (its config.toml)")
    try:
        dcp.load(state, storage_reader=SafeReader(str(path), threads), planner=TensorsOnlyPlanner())
    except ConfigError:
        raise
    except (Exception, CheckpointException) as e:  # a missing or truncated file, as DCP reports it (on every rank)
        unsafe = error_cause(e, UnsafeCheckpointError)
        if unsafe is not None:
            raise unsafe from None
        raise ConfigError("checkpoint.folder", f"{path} cannot be read ({error_reason(e)}): the checkpoint is damaged; "
                          "load an earlier one (checkpoint.load_step)") from None


def error_reason(error: BaseException) -> str:
    """One line for an error, as DCP raises it (the first failing rank's own error)."""
    if isinstance(error, CheckpointException) and error.failures:
        rank, (error, _) = next(iter(error.failures.items()))  # DCP's wrapper of each rank's (error, trace)
        return f"rank {rank}: {error_reason(error)}"
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:240]}" if text else type(error).__name__


def error_cause(error: BaseException, kind: type[E]) -> E | None:
    """The first error of `kind` behind `error`, through its causes and, for DCP's wrapper, every rank's own error
    (e.g. the refusal of a pickled entry, or the OSError of a full disk)."""
    return find_error(error, lambda current: isinstance(current, kind))


def find_error(error: BaseException, matches: Callable[[BaseException], bool]) -> BaseException | None:
    """The first error that `matches`, of `error` and those behind it (as `error_cause` walks them)."""
    seen = set()
    stack = [error]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if matches(current):
            return current
        stack += [current.__cause__, current.__context__]
        if isinstance(current, CheckpointException):
            stack += [pair[0] for pair in current.failures.values()]
    return None


def flatten(state: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as DCP names their leaves: keys joined by dots."""
    flat = {}
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat
