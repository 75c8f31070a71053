"""The weighted embedding-bag seam of the memory layer: `lookup(values, indices, weights) -> [T, D]`.

values: [N, D]; indices: [T, L] int64 rows; weights: [T, L]. Row t of the result is Σ_l weights[t, l] ·
values[indices[t, l]], accumulated in fp32 or better. Faster implementations (the Triton kernels) register under
their own name and are chosen with `[memory] lookup`.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

Lookup = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

_LOOKUPS: dict[str, Lookup] = {}


def register_lookup(name: str, lookup: Lookup) -> None:
    _LOOKUPS[name] = lookup


def available_lookups() -> list[str]:
    try:
        import titanmem.kernels  # noqa: F401  (registers "triton")
    except ImportError:  # no Triton on this platform: the torch lookup still works
        pass
    return sorted(_LOOKUPS)


def get_lookup(name: str) -> Lookup:
    if name not in available_lookups():
        raise ValueError(f"memory lookup {name!r} is not available in this build; available: {available_lookups()}")
    return _LOOKUPS[name]


def torch_weighted_bag(values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch reference: `F.embedding_bag` in sum mode, in the table's dtype (its CUDA kernel accumulates in
    fp32 for half types). Its backward writes a dense gradient of the whole table."""
    return F.embedding_bag(indices, values, per_sample_weights=weights.to(values.dtype), mode="sum")


register_lookup("torch", torch_weighted_bag)
