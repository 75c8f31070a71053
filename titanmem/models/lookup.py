"""The weighted embedding-bag seam of the memory layer: `lookup(values, indices, weights, out_dtype=None) -> [T, D]`.

values: [N, D]; indices: [T, L] int64 rows; weights: [T, L]. Row t of the result is Σ_l weights[t, l] ·
values[indices[t, l]], accumulated in fp32 or better and stored in `out_dtype` (default values' dtype: a partial bag
that is summed with others' is asked for in fp32). A negative index reads nothing: its pair adds nothing and gets
a weight gradient of 0 (a rank that holds only some of the table's rows is passed the other rows' pairs so).
Implementations are entries of `titanmem.registry.LOOKUPS`, imported on first use.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from titanmem.registry import LOOKUPS

Lookup = Callable[..., torch.Tensor]


def available_lookups() -> list[str]:
    """The lookups whose module imports on this machine."""
    return LOOKUPS.available()


def get_lookup(name: str) -> Lookup:
    """The lookup `name` (an entry of `titanmem.registry.LOOKUPS`), imported now."""
    return LOOKUPS.load(name)


def torch_weighted_bag(values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                       out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Plain PyTorch reference: `F.embedding_bag` in sum mode, with the weights rounded to the table's dtype. A bf16
    table is summed in fp32 (on CUDA by the kernel itself; on CPU, whose bf16 bag rounds on the way, over an fp32 copy
    of the table) and rounded once, to `out_dtype` or the table's dtype. Its backward writes a dense gradient of the
    whole table."""
    read = indices >= 0
    # A read-nothing pair points at row 0 with weight 0: its sum term and its weight's gradient are exactly 0.
    weights = (weights * read).to(values.dtype)
    out_dtype = out_dtype or values.dtype
    compute_dtype = torch.float32 if values.device.type == "cpu" and values.dtype == torch.bfloat16 else out_dtype
    if compute_dtype != values.dtype:
        values, weights = values.to(compute_dtype), weights.to(compute_dtype)
    return F.embedding_bag(indices.clamp(min=0), values, per_sample_weights=weights, mode="sum").to(out_dtype)
