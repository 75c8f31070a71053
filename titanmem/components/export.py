"""A model as one portable folder: safetensors files and their index, `config.json`, and the tokenizer.

`write_shards` is the streamed writer that every export format shares: tensors given by their shape and a function
that reads rows of them, written in name order into files of at most `max_shard_bytes` (a larger tensor gets a file
alone), converted to the export dtype a block of rows at a time, so that the host holds one block, whatever the
model's size. `write_export` writes titanmem's own format on top of it: each weight under its model name, read from a
checkpoint or another export (`titanmem.components.stored_tensors.outputs_of`). The same weights therefore give the
same bytes, whichever plan saved them. `load_export` reads such a folder into a model of any plan: each rank reads
only the block of each tensor it stores.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from titanmem.components.hf_checkpoint import is_hf_folder
from titanmem.components.safetensors_folder import INDEX, SafetensorsFolder
from titanmem.components.safetensors_stream import StreamedTensor, write_safetensors
from titanmem.config.errors import ConfigError
from titanmem.distributed.initialize import local_block

# Rows read, converted and written at a time: large enough for full-speed file reads, small beside any host's memory.
BLOCK_BYTES = 64 << 20


def is_export(path: str | Path) -> bool:
    """Whether `path` is a titanmem exported folder: it holds the safetensors index, and no Hugging Face config (an
    `export.format = "hf"` folder holds the same index)."""
    return (Path(path) / INDEX).is_file() and not is_hf_folder(path)


@dataclass(frozen=True)
class OutputTensor:
    """A tensor to export: its shape, and `read(start, stop)`, which gives its rows [start, stop) of dim 0 (the
    elements of a 1-D tensor; the whole tensor, for a 0-D one) in any floating dtype."""

    shape: tuple[int, ...]
    read: Callable[[int, int], torch.Tensor]


def _blocks(tensor: OutputTensor, dtype: torch.dtype, block_bytes: int) -> Callable[[], Iterator[torch.Tensor]]:
    """Its rows in blocks of about `block_bytes` (counted at 4 bytes an element, as read), converted to `dtype`.
    Rounding is element by element, so the blocks hold the bytes of the whole tensor converted at once."""

    def blocks() -> Iterator[torch.Tensor]:
        if not tensor.shape:
            yield tensor.read(0, 1).to(dtype)
            return
        row = 4
        for size in tensor.shape[1:]:
            row *= size
        step = max(1, block_bytes // max(row, 1))
        for start in range(0, tensor.shape[0], step):
            stop = min(start + step, tensor.shape[0])
            block = tensor.read(start, stop).to(dtype)
            if tuple(block.shape) != (stop - start, *tensor.shape[1:]):
                raise ValueError(f"rows [{start}, {stop}) read as shape {list(block.shape)}")
            yield block
            del block  # before the next block is read: one block at a time

    return blocks


def write_shards(folder: str | Path, tensors: dict[str, OutputTensor], *, dtype: torch.dtype, max_shard_bytes: int,
                 block_bytes: int = BLOCK_BYTES) -> list[Path]:
    """Write `tensors` as `dtype` into `model-0000k-of-0000n.safetensors` files of at most `max_shard_bytes` each (in
    name order; a tensor larger than that gets a file alone) and their index, `model.safetensors.index.json`; returns
    the files written, the index last. At most about one block of `block_bytes` is held at a time."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    streamed = {name: StreamedTensor(dtype, tuple(tensor.shape), _blocks(tensor, dtype, block_bytes))
                for name, tensor in tensors.items()}
    shards: list[list[str]] = [[]]
    size = 0
    for name in sorted(streamed):
        nbytes = streamed[name].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    written, weight_map = [], {}
    for number, shard in enumerate(shards, start=1):
        path = folder / f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(path, {name: streamed[name] for name in shard}, metadata={"format": "pt"})
        weight_map.update({name: path.name for name in shard})
        written.append(path)
    total = sum(tensor.nbytes for tensor in streamed.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX).write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    return [*written, folder / INDEX]


def write_export(tensors: dict[str, OutputTensor], folder: str | Path, *, model_args, step: int,
                 max_shard_bytes: int, dtype: torch.dtype, tokenizer_files: list[Path],
                 block_bytes: int = BLOCK_BYTES) -> list[Path]:
    """Write the model's `tensors` (by model name) to `folder` in titanmem's format, streamed: the shards and their
    index (`write_shards`), `config.json` (the model's settings, the dtype and the step) and `tokenizer/`; returns the
    files written."""
    folder = Path(folder)
    written = write_shards(folder, tensors, dtype=dtype, max_shard_bytes=max_shard_bytes, block_bytes=block_bytes)
    config = {"model": dataclasses.asdict(model_args), "dtype": str(dtype).removeprefix("torch."), "step": step}
    (folder / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
    tokenizer_folder = folder / "tokenizer"
    tokenizer_folder.mkdir(exist_ok=True)
    for path in tokenizer_files:
        shutil.copyfile(path, tokenizer_folder / path.name)
    return [*written, folder / "config.json", *(tokenizer_folder / p.name for p in tokenizer_files)]


@torch.no_grad()
def load_export(model: torch.nn.Module, folder: str | Path) -> None:
    """Fill `model` (any plan) with the weights of an exported folder; every parameter must be there, same shape."""
    folder = Path(folder)
    with SafetensorsFolder(folder, "checkpoint.initial_load_path") as stored_tensors:
        for name, param in model.named_parameters():
            declared, target, index = local_block(name, param)
            if declared not in stored_tensors.files:
                raise ConfigError("checkpoint.initial_load_path", f"{folder} has no tensor {declared}: it was exported "
                                  "from another model; match the model settings of its config.json")
            stored = stored_tensors.get_slice(declared)
            if tuple(stored.get_shape()) != tuple(param.shape):
                raise ConfigError("checkpoint.initial_load_path", f"{folder} holds {declared} of shape "
                                  f"{list(stored.get_shape())}, but this run's is {list(param.shape)}: the model "
                                  "settings differ from its config.json")
            target.copy_(stored[index])
