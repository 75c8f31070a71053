"""The key-search seam of the memory layer: `search(query, subkeys, knn) -> (weights, indices)`.

query: [T, heads, k_dim]; subkeys: [heads, 2, n_keys, k_dim / 2] in the query's dtype. For each token and head,
the knn best of the n_keys² product keys (the score of key (r, c) is the first query half's dot with sub-key r of
the first half plus the second half's with sub-key c of the second), best first: their softmax weights [T, heads,
knn] in fp32 and their value rows n_keys · r + c [T, heads, knn] int64. Implementations are entries of
`titanmem.registry.KEY_SEARCHES`, imported on first use.
"""

from __future__ import annotations

from typing import Callable

import torch

from titanmem.registry import KEY_SEARCHES

# Limits of the Triton search (titanmem.kernels.key_search), as its registry entry states them.
MAX_TRITON_KEYS = KEY_SEARCHES.get("triton").max_keys
MAX_TRITON_KNN = KEY_SEARCHES.get("triton").max_knn

KeySearch = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
# `x.topk(k, dim=-1)` or a function like it: the k largest of each last-dim row, largest first, and their positions.
TopK = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]



def available_key_searches() -> list[str]:
    """The key searches whose module imports on this machine."""
    return KEY_SEARCHES.available()


def get_key_search(name: str) -> KeySearch:
    """The key search `name` (an entry of `titanmem.registry.KEY_SEARCHES`), imported now."""
    return KEY_SEARCHES.load(name)


def merge_candidates(knn: int, device: torch.device) -> torch.Tensor:
    """Flat positions i · knn + j of the pairs (i, j) of two descending lists with (i + 1)(j + 1) ≤ knn (119 of
    1024 at knn = 32): every other pair has at least knn pairs at least as good, since fp32 addition is monotone, so
    the knn best sums are among these."""
    rank = torch.arange(1, knn + 1, device=device)
    dropped = ((rank[:, None] * rank[None, :]).flatten() > knn).to(torch.uint8)
    # A stable sort puts the kept positions first, in order; their count is known on the host, so no sync and no
    # data-dependent shape (which torch.compile would break the graph on).
    return torch.argsort(dropped, stable=True)[: sum(knn // i for i in range(1, knn + 1))]


def torch_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return x.topk(k, dim=-1)


def product_key_topk(query: torch.Tensor, subkeys: torch.Tensor, knn: int,
                     topk: TopK = torch_topk) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k over the n_keys² product keys without forming them: scores [T, heads, knn] (descending, fp32 or
    wider) and value rows [T, heads, knn] (int64). `topk` makes both selections (torch's by default).

    The top-k of a sum of two independent halves always lies among the sums of each half's top-k, so the k×k
    candidates contain the exact answer.
    """
    n_keys = subkeys.shape[2]
    halves = query.unflatten(-1, (2, -1))  # [T, heads, 2, k_dim/2]
    # Both halves of every head in one batched product: [T, heads, 2, n_keys].
    scores = torch.einsum("thsd,hsnd->thsn", halves, subkeys)
    # Each half's top-k in the GEMM's dtype: widening first would keep the same order and only cost a pass over all
    # the scores (and a radix select over 16-bit keys takes half the passes of one over 32-bit keys).
    half_scores, half_indices = topk(scores, knn)  # [T, heads, 2, knn], descending
    # The merge and the softmax run in fp32 at least, also when the scoring GEMM ran in bf16 under autocast.
    half_scores = half_scores.to(torch.promote_types(half_scores.dtype, torch.float32))
    candidates = (half_scores[:, :, 0, :, None] + half_scores[:, :, 1, None, :]).flatten(-2)  # [T, heads, knn²]
    pairs = merge_candidates(knn, query.device)
    with torch.no_grad():
        best = pairs[topk(candidates[..., pairs], knn)[1]]
    # Gathered again outside no_grad: the positions are distinct, so the gradient is a plain scatter.
    best_scores = candidates.gather(-1, best)
    rows = half_indices[:, :, 0].gather(-1, torch.div(best, knn, rounding_mode="floor"))
    cols = half_indices[:, :, 1].gather(-1, best % knn)
    return best_scores, rows * n_keys + cols


def torch_key_search(query: torch.Tensor, subkeys: torch.Tensor, knn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch reference: `product_key_topk` and a softmax. Its autograd keeps the [T, heads, 2, n_keys]
    scores and the k×k candidates of every token."""
    scores, indices = product_key_topk(query, subkeys, knn)
    return torch.softmax(scores, dim=-1), indices
