"""The weighted embedding-bag seam of the memory layer: `lookup(values, indices, weights) -> [T, D]`.

values: [N, D]; indices: [T, L] int64 rows; weights: [T, L]. Row t of the result is Σ_l weights[t, l] ·
values[indices[t, l]], accumulated in fp32 or better. Implementations are named in `LOOKUPS` and imported on first
use (`titanmem.models.implementations`).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from titanmem.models.implementations import available, load

Lookup = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

LOOKUPS: dict[str, tuple[str, str]] = {
    "torch": (__name__, "torch_weighted_bag"),
    "triton": ("titanmem.kernels.embedding_bag", "weighted_bag"),
}


def available_lookups() -> list[str]:
    """The lookups whose module imports on this machine."""
    return available(LOOKUPS)


def get_lookup(name: str) -> Lookup:
    return load(LOOKUPS, name, "memory lookup")


def torch_weighted_bag(values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch reference: `F.embedding_bag` in sum mode, in the table's dtype (its CUDA kernel accumulates in
    fp32 for half types). Its backward writes a dense gradient of the whole table."""
    return F.embedding_bag(indices, values, per_sample_weights=weights.to(values.dtype), mode="sum")
