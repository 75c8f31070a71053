"""The key search with Triton's selection: torch's batched scoring GEMM and merge, with both top-k selections made by
`titanmem.kernels.select.row_topk` (one warp per row, 16 compare-and-count passes over bf16 scores) instead of
torch.topk's multi-pass radix select. Same results as the torch search, ties aside; autograd sees gathers."""

from __future__ import annotations

import torch

from titanmem.kernels.select import row_topk
from titanmem.models.key_search import product_key_topk


def selected_key_search(query: torch.Tensor, subkeys: torch.Tensor, knn: int) -> tuple[torch.Tensor, torch.Tensor]:
    scores, indices = product_key_topk(query, subkeys, knn, topk=row_topk)
    return torch.softmax(scores, dim=-1), indices
