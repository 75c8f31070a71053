"""Process-level setup: device choice, seeding and deterministic mode."""

from __future__ import annotations

import contextlib
import logging
import os
import random

import numpy as np
import torch

from titanmem.config.errors import ConfigError


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="[titanmem] %(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", force=True
    )


def pick_device(choice: str) -> torch.device:
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("training.device", "is 'cuda' but no GPU is visible; use 'auto' or 'cpu'")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    return device


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed every generator; in deterministic mode also restrict torch to deterministic kernels."""
    if deterministic:
        # cuBLAS reads this when its handle is created; it must be set before the first GPU matmul.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast_dtype(choice: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if choice == "bf16" or (choice == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (a sharded parameter, gradient or state); a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def autocast(device: torch.device, dtype: torch.dtype | None):
    """The autocast context for `dtype` on `device`, or no autocast for None (plain fp32)."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)
