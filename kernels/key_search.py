"""Fused product-key search: for each token and memory head, the knn best of the n_keys² product keys and their
softmax weights, without storing the [tokens, heads, 2, n_keys] scores.

The forward runs one program per (block of 16 tokens, head), with a scratch row per (token, head) in global memory
(it stays in L2) for the lists it builds:

1. For each query half, the scores against a chunk of sub-keys come from `tl.dot` (fp32 accumulation, so bf16
   inputs rank exactly). Selection runs on uint32 keys ordered like the scores. A lower bound of the chunk's k-th
   best (the k-th best of the maxima of 2·k groups) leaves about 43 of 1024 keys as candidates; a radix select then
   merges them with the best so far, keeping exactly knn, ties to the lower sub-key. The knn best are sorted by
   rank (each counts the entries ahead of it).
2. The merge needs only the pairs (i, j) of sorted ranks with (i + 1)(j + 1) ≤ knn: every other pair has at least
   knn pairs scoring as high. That is 119 of the 32 × 32 pairs at knn = 32.
3. A radix select of the knn best pairs, their softmax, stored best first.

The backward turns the weights' gradient into the scores' (softmax backward), sums the pairs that picked the same
sub-key, and writes them into a dense [tokens, heads, 2, n_keys] score gradient: at most knn non-zeros per row, each
written by a plain store (pairs sharing a sub-key store the same sum, so the result does not depend on their order).
Two batched products of that gradient give the query's and the sub-keys' gradients.

Both are `torch.library` custom ops with fake implementations, so `torch.compile` traces through them. Measured on
an H200 (docs/benchmarks.md) the forward is still slower than torch's einsum + topk: its selection, 32 reductions
per radix select, costs about ten times what the instruction count predicts.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from titanmem.kernels.config import INTERPRET, launch_config
from titanmem.kernels.select import _kth_largest, _ordered, _select
from titanmem.registry import KEY_SEARCHES

INTERPRETED = tl.constexpr(INTERPRET)

# This search's limits, stated (with their reasons) by its registry entry: the int32 value row of a candidate, and
# the [16, knn, knn] comparisons of a program's ranking in registers.
MAX_KEYS = KEY_SEARCHES.get("triton").max_keys
MAX_KNN = KEY_SEARCHES.get("triton").max_knn

# Bytes of sub-key tiles the forward may stage in shared memory (Hopper has 227 KiB per block; the rest is scratch).
SHARED_MEMORY_BUDGET = 160 * 1024

# ---------------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _candidates(keys, valid, k, KP: tl.constexpr, CAP: tl.constexpr):
    """A superset of the k largest valid `keys` [R, M] of each row, of at most CAP per row: (mask, count).

    The k-th largest of the maxima of 2 KP groups is a lower bound of the row's k-th largest (those k maxima are k
    distinct keys at least as large), and on scores few keys pass it (about 43 of 1024 at k = 32). When some row
    has more than CAP, the exact selection runs instead."""
    GROUPS: tl.constexpr = 2 * KP
    maxima = tl.max(tl.reshape(tl.where(valid, keys, 0), [keys.shape[0], GROUPS, keys.shape[1] // GROUPS]), axis=2)
    floor = _kth_largest(maxima, maxima > 0, k)
    passed = valid & (keys >= floor[:, None])
    count = tl.sum(passed.to(tl.int32), axis=1)
    if tl.max(count, axis=0) > CAP:
        passed, count = _select(keys, valid, k)
    return passed, count


@triton.jit
def _compact(scores_row, ids_row, scores, ids, chosen):
    """Store the chosen (score, id) of each row side by side from slot 0 of its scratch row."""
    slot = tl.cumsum(chosen.to(tl.int32), axis=1) - 1
    tl.store(scores_row[:, None] + slot, scores, mask=chosen)
    tl.store(ids_row[:, None] + slot, ids, mask=chosen)


@triton.jit
def _ranks(scores, ids, valid):
    """Each entry's place in its row sorted by score, descending, ties to the lower id: [R, KP] of [R, KP]. Scores
    compare as the selection's ordered keys, a total order (NaN included), so the places are always distinct."""
    keys = _ordered(scores)
    ahead = (keys[:, None, :] > keys[:, :, None]) | (
        (keys[:, None, :] == keys[:, :, None]) & (ids[:, None, :] < ids[:, :, None]))
    return tl.sum((ahead & valid[:, None, :]).to(tl.int32), axis=2)


@triton.jit
def _half_best(
    q_ptr, keys_ptr, scores_row, ids_row, chunk_row, tokens, token_mask, n_keys, half_dim, knn, stride_qt, stride_kn,
    KP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
):
    """The knn best sub-keys of one query half, best first, into scratch slots [0, knn) of each token's row (scores
    fp32, ids int32). Slots [KP, 5 KP) hold each chunk's candidates before they are merged into the first KP."""
    slots = tl.arange(0, 8 * KP)
    kept = tl.zeros([BLOCK_T], tl.int32)
    for start in range(0, n_keys, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_mask = keys < n_keys
        scores = tl.zeros([BLOCK_T, BLOCK_N], tl.float32)
        for dim_start in range(0, half_dim, BLOCK_D):
            dims = dim_start + tl.arange(0, BLOCK_D)
            dim_mask = dims < half_dim
            query = tl.load(q_ptr + tokens[:, None] * stride_qt + dims[None, :],
                            mask=token_mask[:, None] & dim_mask[None, :], other=0.0)
            sub_keys = tl.load(keys_ptr + keys[:, None] * stride_kn + dims[None, :],
                               mask=key_mask[:, None] & dim_mask[None, :], other=0.0)
            if IEEE:
                scores = tl.dot(query, tl.trans(sub_keys), acc=scores, input_precision="ieee")
            elif INTERPRETED:  # the CPU interpreter's bf16 dot is wrong; bf16 → fp32 is exact, and so are products
                scores = tl.dot(query.to(tl.float32), tl.trans(sub_keys.to(tl.float32)), acc=scores,
                                input_precision="ieee")
            else:
                scores = tl.dot(query, tl.trans(sub_keys), acc=scores)
        # Through scratch and back: Triton 3.6 never finishes compiling the selection below on the matmul's own
        # register layout; a plain load gives it another.
        columns = tl.arange(0, BLOCK_N)[None, :]
        tl.debug_barrier()
        tl.store(chunk_row[:, None] + columns, scores, mask=token_mask[:, None])
        tl.debug_barrier()
        scores = tl.load(chunk_row[:, None] + columns, mask=token_mask[:, None], other=0.0)
        # Rows past the last token choose nothing, so they never touch scratch.
        ordered = _ordered(scores)
        passed, count = _candidates(ordered, token_mask[:, None] & key_mask[None, :], knn, KP, 4 * KP)
        tl.debug_barrier()  # the last merge's reads of these slots are done
        _compact(scores_row + KP, ids_row + KP, scores, tl.broadcast_to(keys[None, :], [BLOCK_T, BLOCK_N]), passed)
        tl.debug_barrier()
        # The best so far (slots < kept) and this chunk's candidates (KP ≤ slot < KP + count): keep the best knn.
        valid = (slots[None, :] < kept[:, None]) | ((slots[None, :] >= KP) & (slots[None, :] < KP + count[:, None]))
        merged_scores = tl.load(scores_row[:, None] + slots[None, :], mask=valid, other=0.0)
        merged_ids = tl.load(ids_row[:, None] + slots[None, :], mask=valid, other=0)
        chosen, kept = _select(_ordered(merged_scores), valid, knn)
        tl.debug_barrier()
        _compact(scores_row, ids_row, merged_scores, merged_ids, chosen)
    tl.debug_barrier()
    first = tl.arange(0, KP)
    valid = first[None, :] < kept[:, None]
    best_scores = tl.load(scores_row[:, None] + first[None, :], mask=valid, other=0.0)
    best_ids = tl.load(ids_row[:, None] + first[None, :], mask=valid, other=0)
    rank = _ranks(best_scores, best_ids, valid)
    tl.debug_barrier()
    tl.store(scores_row[:, None] + rank, best_scores, mask=valid)
    tl.store(ids_row[:, None] + rank, best_ids, mask=valid)


@triton.jit
def _key_search_kernel(
    q_ptr, subkeys_ptr, pair_rank_ptr, scratch_scores_ptr, scratch_ids_ptr, scratch_chunk_ptr, weights_ptr, indices_ptr,
    T, n_keys, half_dim, knn,
    stride_qt, stride_qh, stride_kh, stride_ks, stride_kn,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, KP: tl.constexpr, PAIRS: tl.constexpr,
    IEEE: tl.constexpr,
):
    head = tl.program_id(1)
    heads = tl.num_programs(1)
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_mask = tokens < T
    # Scratch per (token, head): two halves × 5 KP slots.
    first_scores = scratch_scores_ptr + (tokens * heads + head) * 10 * KP
    first_ids = scratch_ids_ptr + (tokens * heads + head) * 10 * KP
    q_head = q_ptr + head * stride_qh
    k_head = subkeys_ptr + head * stride_kh
    chunk_row = scratch_chunk_ptr + (tokens * heads + head) * BLOCK_N
    _half_best(q_head, k_head, first_scores, first_ids, chunk_row, tokens, token_mask, n_keys, half_dim, knn,
               stride_qt, stride_kn, KP, BLOCK_T, BLOCK_N, BLOCK_D, IEEE)
    _half_best(q_head + half_dim, k_head + stride_ks, first_scores + 5 * KP, first_ids + 5 * KP, chunk_row, tokens,
               token_mask, n_keys, half_dim, knn, stride_qt, stride_kn, KP, BLOCK_T, BLOCK_N, BLOCK_D, IEEE)
    tl.debug_barrier()

    # The candidate pairs (i, j) with (i + 1)(j + 1) ≤ knn, as ranks into the two sorted lists (host-built table).
    pair = tl.arange(0, PAIRS)
    i = tl.load(pair_rank_ptr + pair)
    j = tl.load(pair_rank_ptr + PAIRS + pair)
    pair_mask = token_mask[:, None] & (i >= 0)[None, :]
    i = tl.where(i >= 0, i, 0)[None, :]
    j = tl.where(j >= 0, j, 0)[None, :] + 5 * KP
    scores = (tl.load(first_scores[:, None] + i, mask=pair_mask, other=0.0)
              + tl.load(first_scores[:, None] + j, mask=pair_mask, other=0.0))
    rows = (tl.load(first_ids[:, None] + i, mask=pair_mask, other=0) * n_keys
            + tl.load(first_ids[:, None] + j, mask=pair_mask, other=0))
    chosen, _ = _select(_ordered(scores), pair_mask, knn)
    tl.debug_barrier()
    # The first half's chunk slots are free again: the knn best pairs go there, then into the output sorted.
    _compact(first_scores + KP, first_ids + KP, scores, rows, chosen)
    tl.debug_barrier()
    slots = tl.arange(0, KP)
    valid = token_mask[:, None] & (slots < knn)[None, :]
    best_scores = tl.load(first_scores[:, None] + KP + slots[None, :], mask=valid, other=0.0)
    best_rows = tl.load(first_ids[:, None] + KP + slots[None, :], mask=valid, other=0)
    rank = _ranks(best_scores, best_rows, valid)
    top = tl.max(tl.where(valid, best_scores, float("-inf")), axis=1)
    exps = tl.where(valid, tl.exp(best_scores - top[:, None]), 0.0)
    # The best pair adds exp(0) = 1, so the sum is at least 1 on every real row (and 0 past the last token).
    weights = exps / tl.maximum(tl.sum(exps, axis=1), 1.0)[:, None]
    out = (tokens[:, None] * heads + head) * knn + rank
    tl.store(weights_ptr + out, weights, mask=valid)
    tl.store(indices_ptr + out, best_rows.to(tl.int64), mask=valid)


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
def _pair_ranks(knn: int, pairs: int, device: torch.device) -> torch.Tensor:
    """[2, pairs] int32 ranks (i, j) with (i + 1)(j + 1) ≤ knn, padded with -1, on `device` (built once)."""
    ranks = [(i, j) for i in range(knn) for j in range(knn // (i + 1))]
    table = torch.full((2, pairs), -1, dtype=torch.int32)
    table[:, : len(ranks)] = torch.tensor(ranks, dtype=torch.int32).T
    return table.to(device)


def _pair_count(knn: int) -> int:
    return sum(knn // (i + 1) for i in range(knn))


def _padded_knn(knn: int) -> int:
    """The width of the kernels' top-k lists: a power of two, and at least 8 (Triton 3.6 failed to compile some
    reductions over narrower ones); the slots past knn are masked."""
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
    if not 1 <= knn <= min(n_keys, MAX_KNN) or n_keys > MAX_KEYS:
        raise ValueError(f"need 1 ≤ knn ≤ n_keys, knn ≤ {MAX_KNN} and n_keys ≤ {MAX_KEYS}; got knn {knn}, n_keys "
                         f"{n_keys}")


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
    block_d = max(16, min(cfg["BLOCK_D"], triton.next_power_of_2(half_dim)))
    block_n = max(16, 2 * kp, cfg["BLOCK_N"])  # at least one key per group of `_candidates`
    # The pipeline keeps num_stages tiles of sub-keys in shared memory.
    while block_n > max(16, 2 * kp) and cfg["num_stages"] * block_n * block_d * query.element_size() > SHARED_MEMORY_BUDGET:
        block_n //= 2
    scratch_scores = torch.empty(tokens, heads, 10 * kp, device=query.device, dtype=torch.float32)
    scratch_ids = torch.empty(tokens, heads, 10 * kp, device=query.device, dtype=torch.int32)
    scratch_chunk = torch.empty(tokens, heads, block_n, device=query.device, dtype=torch.float32)
    grid = (triton.cdiv(tokens, cfg["BLOCK_T"]), heads)
    _key_search_kernel[grid](
        query, subkeys, _pair_ranks(knn, pairs, query.device), scratch_scores, scratch_ids, scratch_chunk, weights,
        indices,
        tokens, n_keys, half_dim, knn,
        query.stride(0), query.stride(1), subkeys.stride(0), subkeys.stride(1), subkeys.stride(2),
        BLOCK_T=cfg["BLOCK_T"], BLOCK_N=block_n, BLOCK_D=block_d, KP=kp, PAIRS=pairs,
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

__all__ = ["MAX_KEYS", "MAX_KNN", "key_search", "key_search_score_grads"]
