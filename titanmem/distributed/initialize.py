"""Initialise a parallelized model so that its full weights do not depend on the plan.

Every rank fills only the block of each parameter it stores, drawn as `titanmem.models.init` draws it: the same
seed gives the same full tensor on 1 process, FSDP, HSDP, TP and MP (DTensor's own random ops do not: on CPU meshes
every shard gets the same numbers, and on CUDA the numbers follow the sharding). Wrappers applied by the plan
(activation checkpointing, compile) are looked through, so a parameter is drawn under its model name.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from titanmem.models.init import init_weights

# Name parts that activation checkpointing and torch.compile insert around a block.
_WRAPPER_PARTS = ("_checkpoint_wrapped_module.", "_orig_mod.")


def model_name(name: str) -> str:
    """A parameter's name in the plain model, without the wrappers' parts."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def local_block(name: str, param: nn.Parameter) -> tuple[str, torch.Tensor, tuple[slice, ...]]:
    """This rank's stored block of `param`: the tensor to fill and where it lies in the full parameter."""
    if not isinstance(param.data, DTensor):
        return model_name(name), param.data, tuple(slice(0, size) for size in param.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local = param.data.to_local()
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    if tuple(local.shape) != tuple(shape):
        raise RuntimeError(f"{name}: local shard {tuple(local.shape)} is not the block DTensor reports {shape}")
    return model_name(name), local, tuple(slice(start, start + size) for start, size in zip(offset, shape))


def init_model_weights(model: nn.Module, seed: int) -> None:
    """Fill every parameter's stored block and recompute the buffers (after `to_empty` from the meta device)."""
    init_weights(model, seed, locate=local_block)
