"""Copying a checkpoint's state to CPU memory, so that training can go on while a background thread writes it.

`CpuStager` is DCP's staging step done here: each tensor (each DTensor's local shard) is copied to CPU memory,
then the copies are handed to the writer as they are. With `pinned`, the copies go into page-locked buffers that
are allocated at the first save and reused at every later one (the state's shapes do not change), so the
GPU-to-CPU copies run at full bus speed and no save allocates.
"""

from __future__ import annotations

import torch
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.tensor import DTensor


class CpuStager(AsyncStager):
    _synchronize_after_execute = False

    def __init__(self, pinned: bool):
        self.pinned = pinned and torch.cuda.is_available()
        self._buffers: dict[str, torch.Tensor] = {}

    def _copy(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        if not self.pinned:
            return tensor.detach().to("cpu", copy=True)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._buffers[key] = buffer
        buffer.copy_(tensor.detach(), non_blocking=True)
        return buffer

    def _stage(self, value, key: str):
        if isinstance(value, dict):
            return {name: self._stage(item, f"{key}.{name}") for name, item in value.items()}
        if isinstance(value, DTensor):
            local = self._copy(key, value.to_local())
            return DTensor.from_local(local, value.device_mesh, value.placements, run_check=False,
                                      shape=value.shape, stride=value.stride())
        if isinstance(value, torch.Tensor):
            return self._copy(key, value)
        return value

    def stage(self, state_dict: dict) -> dict:
        staged = self._stage(state_dict, "")
        if self.pinned:
            torch.cuda.synchronize()  # the non-blocking copies must land before training changes the sources
        return staged

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        self._buffers.clear()
