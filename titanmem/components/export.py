"""A model as one portable folder: safetensors files and their index, `config.json`, and the tokenizer.

`write_export` takes a model whose weights are whole on this process (the export entry point loads any plan's
checkpoint into one) and writes each parameter under its model name, in name order, split into files of at most
`max_shard_bytes`. The same weights therefore give the same bytes, whichever plan saved them. `load_export` reads
such a folder into a model of any plan: each rank reads only the block of each tensor it stores.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from titanmem.config.errors import ConfigError
from titanmem.distributed.initialize import local_block, model_name
from titanmem.utils import give_plain_file_mode

INDEX = "model.safetensors.index.json"


def is_export(path: str | Path) -> bool:
    return (Path(path) / INDEX).is_file()


def write_export(model: torch.nn.Module, folder: str | Path, *, model_args, step: int, max_shard_bytes: int,
                 dtype: torch.dtype, tokenizer_files: list[Path]) -> list[Path]:
    """Write `model` (whole on this process) to `folder`; returns the files written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {model_name(name): param.detach().to("cpu", dtype).contiguous()
               for name, param in model.named_parameters()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    written, weight_map = [], {}
    for number, shard in enumerate(shards, start=1):
        path = folder / f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path), metadata={"format": "pt"})
        give_plain_file_mode(path)
        weight_map.update({name: path.name for name in shard})
        written.append(path)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX).write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    config = {"model": dataclasses.asdict(model_args), "dtype": str(dtype).removeprefix("torch."), "step": step}
    (folder / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
    tokenizer_folder = folder / "tokenizer"
    tokenizer_folder.mkdir(exist_ok=True)
    for path in tokenizer_files:
        shutil.copyfile(path, tokenizer_folder / path.name)
    return [*written, folder / INDEX, folder / "config.json", *(tokenizer_folder / p.name for p in tokenizer_files)]


@torch.no_grad()
def load_export(model: torch.nn.Module, folder: str | Path) -> None:
    """Fill `model` (any plan) with the weights of an exported folder; every parameter must be there, same shape."""
    folder = Path(folder)
    try:
        weight_map: dict[str, str] = json.loads((folder / INDEX).read_text())["weight_map"]
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError("checkpoint.initial_load_path", f"{folder / INDEX} is not a safetensors index ({e})") from None
    handles: dict[str, object] = {}
    try:
        for name, param in model.named_parameters():
            declared, target, index = local_block(name, param)
            if declared not in weight_map:
                raise ConfigError("checkpoint.initial_load_path", f"{folder} has no tensor {declared}: it was exported "
                                  "from another model; match the model settings of its config.json")
            file = weight_map[declared]
            if file not in handles:
                handles[file] = safe_open(str(folder / file), framework="pt", device="cpu")
            stored = handles[file].get_slice(declared)
            if tuple(stored.get_shape()) != tuple(param.shape):
                raise ConfigError("checkpoint.initial_load_path", f"{folder} holds {declared} of shape "
                                  f"{list(stored.get_shape())}, but this run's is {list(param.shape)}: the model "
                                  "settings differ from its config.json")
            target.copy_(stored[index])
    finally:
        handles.clear()
