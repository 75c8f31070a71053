"""Fused product-key search: for each token and memory head, the knn best of the n_keys² product keys and their
softmax weights, without forming the [tokens, heads, 2, n_keys] score tensor.

The forward runs one program per (block of tokens, head):

1. For each query half, scores against that half's sub-keys come from `tl.dot`, chunk by chunk of sub-keys, and a
   running top-k keeps the best. Each score is packed with its key into one int64 whose order is the score's, ties
   going to the lower key, so a single integer top-k (`titanmem.kernels.bitonic`) selects both at once.
2. The merge needs only the candidates (i, j) with (i + 1)(j + 1) ≤ knn: both halves come out sorted, so every
   other pair has at least knn pairs scoring as high. That is 119 of the 32 × 32 pairs at knn = 32.
3. The final top-k of those candidates, then their softmax.

The backward turns the weights' gradient into the scores' (softmax backward), sums the pairs that picked the same
sub-key, and writes them into a dense [tokens, heads, 2, n_keys] score gradient: at most knn non-zeros per row, each
written by a plain store (pairs sharing a sub-key store the same sum, so the result does not depend on their order).
Two batched products of that gradient give the query's and the sub-keys' gradients.

Both are `torch.library` custom ops with fake implementations, so `torch.compile` traces through them.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from titanmem.kernels.bitonic import topk
from titanmem.kernels.config import INTERPRET, launch_config

INTERPRETED = tl.constexpr(INTERPRET)

# A candidate's value row, n_keys · row + col, must fit the 32 bits of the packed key below it.
MAX_KEYS = 2**16

# Bytes of sub-key tiles the forward may stage in shared memory (Hopper has 227 KiB per block; the rest is scratch).
SHARED_MEMORY_BUDGET = 160 * 1024

# ---------------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _pack(scores, keys, KEY_LIMIT: tl.constexpr):
    """int64s ordered as the fp32 scores are, ties broken towards the lower key (0 ≤ key < KEY_LIMIT ≤ 2³²)."""
    bits = scores.to(tl.int32, bitcast=True)
    # Negative floats order backwards as integers: flipping their magnitude bits makes the int32 order the float order.
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | (KEY_LIMIT - 1 - keys).to(tl.int64)


@triton.jit
def _unpack(packed, KEY_LIMIT: tl.constexpr):
    ordered = (packed >> 32).to(tl.int32)
    bits = tl.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True), KEY_LIMIT - 1 - (packed & 0xFFFFFFFF)


@triton.jit
def _half_topk(
    q_ptr, keys_ptr, tokens, token_mask, n_keys, half_dim, stride_qt, stride_kn,
    KP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DH: tl.constexpr, KEY_LIMIT: tl.constexpr, IEEE: tl.constexpr,
):
    """The KP best sub-keys of one query half, best first: (scores [BLOCK_T, KP] fp32, keys [BLOCK_T, KP] int64)."""
    dims = tl.arange(0, BLOCK_DH)
    dim_mask = dims < half_dim
    query = tl.load(q_ptr + tokens[:, None] * stride_qt + dims[None, :],
                    mask=token_mask[:, None] & dim_mask[None, :], other=0.0)
    lowest = tl.full([query.shape[0], KP], -2**63, tl.int64)
    best = lowest
    for start in range(0, n_keys, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_mask = keys < n_keys
        sub_keys = tl.load(keys_ptr + keys[:, None] * stride_kn + dims[None, :],
                           mask=key_mask[:, None] & dim_mask[None, :], other=0.0)
        if IEEE:
            scores = tl.dot(query, tl.trans(sub_keys), input_precision="ieee")
        elif INTERPRETED:  # the CPU interpreter's bf16 dot is wrong; bf16 → fp32 is exact, and so are their products
            scores = tl.dot(query.to(tl.float32), tl.trans(sub_keys.to(tl.float32)), input_precision="ieee")
        else:
            scores = tl.dot(query, tl.trans(sub_keys))
        packed = tl.where(key_mask[None, :], _pack(scores, keys[None, :], KEY_LIMIT), -2**63)
        if BLOCK_N > KP:
            packed = topk(packed, KP)
        # Both are [BLOCK_T, KP]: side by side, then the best KP of the 2·KP.
        best = topk(tl.reshape(tl.join(best, packed), [query.shape[0], 2 * KP]), KP)
    return _unpack(best, KEY_LIMIT)


@triton.jit
def _key_search_kernel(
    q_ptr, subkeys_ptr, pair_rank_ptr, weights_ptr, indices_ptr,
    T, n_keys, half_dim, knn,
    stride_qt, stride_qh, stride_kh, stride_ks, stride_kn,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DH: tl.constexpr, KP: tl.constexpr, PAIRS: tl.constexpr,
    IEEE: tl.constexpr,
):
    head = tl.program_id(1)
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_mask = tokens < T
    q_head = q_ptr + head * stride_qh
    k_head = subkeys_ptr + head * stride_kh
    first_scores, first_keys = _half_topk(
        q_head, k_head, tokens, token_mask, n_keys, half_dim, stride_qt, stride_kn,
        KP, BLOCK_N, BLOCK_DH, 2**16, IEEE)
    second_scores, second_keys = _half_topk(
        q_head + half_dim, k_head + stride_ks, tokens, token_mask, n_keys, half_dim, stride_qt, stride_kn,
        KP, BLOCK_N, BLOCK_DH, 2**16, IEEE)

    # The candidate pairs (i, j) with (i + 1)(j + 1) ≤ knn, as ranks into the two sorted lists (host-built table).
    pair = tl.arange(0, PAIRS)
    i = tl.load(pair_rank_ptr + pair)
    j = tl.load(pair_rank_ptr + PAIRS + pair)
    pair_mask = i >= 0
    i = tl.where(pair_mask, i, 0)
    j = tl.where(pair_mask, j, 0)
    i = tl.broadcast_to(i[None, :], [BLOCK_T, PAIRS])
    j = tl.broadcast_to(j[None, :], [BLOCK_T, PAIRS])
    scores = tl.gather(first_scores, i, 1) + tl.gather(second_scores, j, 1)
    rows = tl.gather(first_keys, i, 1) * n_keys + tl.gather(second_keys, j, 1)
    packed = tl.where(pair_mask[None, :], _pack(scores, rows, 2**32), -2**63)
    best_scores, best_rows = _unpack(topk(packed, KP), 2**32)

    slots = tl.arange(0, KP)
    slot_mask = slots < knn
    # Sorted: the first score is the largest.
    top = tl.max(tl.where(slot_mask[None, :], best_scores, float("-inf")), axis=1)
    exps = tl.where(slot_mask[None, :], tl.exp(best_scores - top[:, None]), 0.0)
    weights = exps / tl.sum(exps, axis=1)[:, None]
    out = (tokens[:, None] * tl.num_programs(1) + head) * knn + slots[None, :]
    out_mask = token_mask[:, None] & slot_mask[None, :]
    tl.store(weights_ptr + out, weights, mask=out_mask)
    tl.store(indices_ptr + out, best_rows, mask=out_mask)


@triton.jit
def _scatter_half(grad_ptr, keys, score_grads, valid, KP: tl.constexpr):
    """Store, at each selected sub-key, the sum of the score gradients of the pairs that selected it."""
    same = (keys[:, :, None] == keys[:, None, :]) & valid[:, None, :]
    summed = tl.sum(tl.where(same, score_grads[:, None, :], 0.0), axis=2)
    tl.store(grad_ptr + keys, summed.to(grad_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _score_grad_kernel(
    grad_weights_ptr, weights_ptr, indices_ptr, grad_scores_ptr,
    T, n_keys, knn, stride_gt, stride_gh, stride_gs,
    BLOCK_T: tl.constexpr, KP: tl.constexpr,
):
    head = tl.program_id(1)
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    slots = tl.arange(0, KP)
    valid = (tokens < T)[:, None] & (slots < knn)[None, :]
    at = (tokens[:, None] * tl.num_programs(1) + head) * knn + slots[None, :]
    weights = tl.load(weights_ptr + at, mask=valid, other=0.0)
    grad_weights = tl.load(grad_weights_ptr + at, mask=valid, other=0.0).to(tl.float32)
    # Softmax backward: dL/ds = w · (dL/dw − Σ w · dL/dw).
    score_grads = weights * (grad_weights - tl.sum(weights * grad_weights, axis=1)[:, None])
    rows = tl.load(indices_ptr + at, mask=valid, other=0)
    row_base = grad_scores_ptr + tokens[:, None] * stride_gt + head * stride_gh
    _scatter_half(row_base, rows // n_keys, score_grads, valid, KP)
    _scatter_half(row_base + stride_gs, rows % n_keys, score_grads, valid, KP)


# --------------------------------------------------------------------------------------------------- python wrappers


@functools.lru_cache(maxsize=None)
def _pair_ranks(knn: int, pairs: int) -> torch.Tensor:
    """[2, pairs] int32 ranks (i, j) with (i + 1)(j + 1) ≤ knn, padded with -1."""
    ranks = [(i, j) for i in range(knn) for j in range(knn // (i + 1))]
    table = torch.full((2, pairs), -1, dtype=torch.int32)
    table[:, : len(ranks)] = torch.tensor(ranks, dtype=torch.int32).T
    return table


def _pair_count(knn: int) -> int:
    return sum(knn // (i + 1) for i in range(knn))


def _padded_knn(knn: int) -> int:
    """The width of the kernels' top-k lists: a power of two, and at least 8 (Triton 3.6 fails to compile the
    bitonic top-k of narrower lists); the slots past knn are computed and dropped."""
    return max(8, triton.next_power_of_2(knn))


def _check(query: torch.Tensor, subkeys: torch.Tensor, knn: int) -> None:
    if query.ndim != 3 or subkeys.ndim != 4 or subkeys.shape[1] != 2:
        raise ValueError(f"expected query [T, heads, k_dim] and subkeys [heads, 2, n_keys, k_dim / 2]; got "
                         f"{tuple(query.shape)} and {tuple(subkeys.shape)}")
    heads, _, n_keys, half_dim = subkeys.shape
    if query.shape[1] != heads or query.shape[2] != 2 * half_dim:
        raise ValueError(f"query {tuple(query.shape)} does not match subkeys {tuple(subkeys.shape)}")
    if query.dtype not in (torch.float32, torch.bfloat16, torch.float16) or subkeys.dtype != query.dtype:
        raise ValueError(f"query and subkeys must share a dtype among fp32, bf16 and fp16; got {query.dtype} and "
                         f"{subkeys.dtype}")
    if not 1 <= knn <= n_keys or n_keys > MAX_KEYS:
        raise ValueError(f"need 1 ≤ knn ≤ n_keys ≤ {MAX_KEYS}; got knn {knn}, n_keys {n_keys}")


def _forward(query: torch.Tensor, subkeys: torch.Tensor, knn: int) -> tuple[torch.Tensor, torch.Tensor]:
    _check(query, subkeys, knn)
    query, subkeys = query.contiguous(), subkeys.contiguous()
    tokens, heads, _ = query.shape
    n_keys, half_dim = subkeys.shape[2:]
    weights = torch.empty(tokens, heads, knn, device=query.device, dtype=torch.float32)
    indices = torch.empty(tokens, heads, knn, device=query.device, dtype=torch.int64)
    if tokens == 0:
        return weights, indices
    kp = _padded_knn(knn)
    pairs = triton.next_power_of_2(max(_pair_count(knn), kp))
    cfg = launch_config("key_search", n_keys)
    block_dh = max(16, triton.next_power_of_2(half_dim))
    block_n = cfg["BLOCK_N"]
    # The pipeline keeps num_stages tiles of sub-keys in shared memory: narrower tiles for wider keys.
    while block_n > kp and cfg["num_stages"] * block_n * block_dh * query.element_size() > SHARED_MEMORY_BUDGET:
        block_n //= 2
    block_n = max(block_n, kp)
    pair_ranks = _pair_ranks(knn, pairs).to(query.device)
    grid = (triton.cdiv(tokens, cfg["BLOCK_T"]), heads)
    _key_search_kernel[grid](
        query, subkeys, pair_ranks, weights, indices,
        tokens, n_keys, half_dim, knn,
        query.stride(0), query.stride(1), subkeys.stride(0), subkeys.stride(1), subkeys.stride(2),
        BLOCK_T=cfg["BLOCK_T"], BLOCK_N=block_n, BLOCK_DH=block_dh, KP=kp, PAIRS=pairs,
        IEEE=query.dtype == torch.float32, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return weights, indices


def _score_grads(grad_weights: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, n_keys: int,
                 dtype: torch.dtype) -> torch.Tensor:
    tokens, heads, knn = weights.shape
    grad_scores = torch.zeros(tokens, heads, 2, n_keys, device=weights.device, dtype=dtype)
    if tokens == 0:
        return grad_scores
    cfg = launch_config("key_search_backward", n_keys)
    _score_grad_kernel[(triton.cdiv(tokens, cfg["BLOCK_T"]), heads)](
        grad_weights.contiguous(), weights.contiguous(), indices.contiguous(), grad_scores,
        tokens, n_keys, knn, grad_scores.stride(0), grad_scores.stride(1), grad_scores.stride(2),
        BLOCK_T=cfg["BLOCK_T"], KP=_padded_knn(knn), num_warps=cfg["num_warps"],
    )
    return grad_scores


# ------------------------------------------------------------------------------------------------------ custom ops


@torch.library.custom_op("titanmem::key_search", mutates_args=())
def key_search(query: torch.Tensor, subkeys: torch.Tensor, knn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The knn best product keys per token and head: (softmax weights [T, heads, knn] fp32, value rows [T, heads,
    knn] int64, n_keys · row + col), best first. query: [T, heads, k_dim]; subkeys: [heads, 2, n_keys, k_dim / 2]
    in the query's dtype. Scores accumulate in fp32."""
    return _forward(query, subkeys, knn)


@key_search.register_fake
def _(query, subkeys, knn):
    _check(query, subkeys, knn)
    shape = (query.shape[0], query.shape[1], knn)
    return query.new_empty(shape, dtype=torch.float32), query.new_empty(shape, dtype=torch.int64)


@torch.library.custom_op("titanmem::key_search_score_grads", mutates_args=())
def key_search_score_grads(grad_weights: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, n_keys: int,
                           dtype: torch.dtype) -> torch.Tensor:
    """The gradient of the scores of both halves, [T, heads, 2, n_keys] in `dtype`, from the weights' gradient: at
    most knn non-zeros per row."""
    return _score_grads(grad_weights, weights, indices, n_keys, dtype)


@key_search_score_grads.register_fake
def _(grad_weights, weights, indices, n_keys, dtype):
    return weights.new_empty(weights.shape[0], weights.shape[1], 2, n_keys, dtype=dtype)


def _setup_context(ctx, inputs, output):
    query, subkeys, _ = inputs
    weights, indices = output
    ctx.save_for_backward(query, subkeys, weights, indices)
    ctx.mark_non_differentiable(indices)


def _backward(ctx, grad_weights, _grad_indices):
    query, subkeys, weights, indices = ctx.saved_tensors
    grad_scores = key_search_score_grads(grad_weights, weights, indices, subkeys.shape[2], query.dtype)
    halves = query.unflatten(-1, (2, -1))
    grad_query = grad_subkeys = None
    if ctx.needs_input_grad[0]:
        grad_query = torch.einsum("thsn,hsnd->thsd", grad_scores, subkeys).flatten(-2)
    if ctx.needs_input_grad[1]:
        grad_subkeys = torch.einsum("thsn,thsd->hsnd", grad_scores, halves)
    return grad_query, grad_subkeys, None


key_search.register_autograd(_backward, setup_context=_setup_context)

__all__ = ["MAX_KEYS", "key_search", "key_search_score_grads"]
