"""The weighted embedding-bag seam of the memory layer: `lookup(values, indices, weights) -> [T, D]`.

values: [N, D]; indices: [T, L] int64 rows; weights: [T, L]. Row t of the result is Σ_l weights[t, l] ·
values[indices[t, l]], accumulated in fp32 or better. The implementations are a fixed table from name to
(module, function), imported on first use: the Triton kernels load only when a run asks for them, and a platform
without Triton still has the torch lookup. A new implementation is one more entry here (docs/architecture.md).
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch
import torch.nn.functional as F

Lookup = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

LOOKUPS: dict[str, tuple[str, str]] = {
    "torch": (__name__, "torch_weighted_bag"),
    "triton": ("titanmem.kernels.embedding_bag", "weighted_bag"),
}


def available_lookups() -> list[str]:
    """The lookups whose module imports on this machine."""
    available = []
    for name, (module, _) in LOOKUPS.items():
        try:
            importlib.import_module(module)
        except ImportError:  # no Triton on this platform: the torch lookup still works
            continue
        available.append(name)
    return sorted(available)


def get_lookup(name: str) -> Lookup:
    if name not in LOOKUPS:
        raise ValueError(f"unknown memory lookup {name!r}; choose one of {sorted(LOOKUPS)}")
    module, function = LOOKUPS[name]
    try:
        return getattr(importlib.import_module(module), function)
    except ImportError as e:
        raise ValueError(f"memory lookup {name!r} is not available in this build ({e}); available: "
                         f"{available_lookups()}") from None


def torch_weighted_bag(values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch reference: `F.embedding_bag` in sum mode, in the table's dtype (its CUDA kernel accumulates in
    fp32 for half types). Its backward writes a dense gradient of the whole table."""
    return F.embedding_bag(indices, values, per_sample_weights=weights.to(values.dtype), mode="sum")
