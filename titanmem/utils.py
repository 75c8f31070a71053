"""Small helpers every layer may use; this module imports nothing else of titanmem."""

from __future__ import annotations

import contextlib
import logging

import torch


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="[titanmem] %(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", force=True
    )


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (a sharded parameter, gradient or state); a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def autocast(device: torch.device, dtype: torch.dtype | None):
    """The autocast context for `dtype` on `device`, or no autocast for None (plain fp32)."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)
