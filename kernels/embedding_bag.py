"""Weighted embedding-bag: the memory read, out[t] = Σ_l weights[t, l] · values[indices[t, l]].

Three Triton kernels, all accumulating in fp32 whatever the storage dtype, any D (masked tails), int64 addresses.
A negative index reads nothing: its pair adds nothing to the bag, gets a weight gradient of 0 and touches no row
(a rank that holds only some rows of the table is passed the other rows' pairs so, see
`titanmem.distributed.row_parallel`).

- forward, one program per (token, column block), gathering BLOCK_L rows at a time;
- weight gradient, token-ordered: grad_weights[t, l] = <grad_out[t], values[indices[t, l]]>;
- row backward, row-ordered: pairs (t, l) are sorted by row (stably, so the result is deterministic), and one program
  per touched row sums weights · grad_out over its pairs. Because it holds the row in registers anyway, it also
  computes the weight gradients of those pairs, reading each value row once instead of once per pair. It writes the
  summed row gradients either into a dense [N, D] gradient (the faithful baseline) or into a compact [U, D] one
  (sparse mode: only the touched rows).

Each is a `torch.library` custom op with a fake (meta) implementation, so `torch.compile` traces through them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from titanmem.kernels.config import INTERPRET, launch_config


# ---------------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _bag_forward_kernel(
    values_ptr, indices_ptr, weights_ptr, out_ptr,
    L, D, stride_values, stride_out,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    # Software pipelining (NUM_STAGES > 1) issues the next tiles' gathers before the current one is summed.
    for start in tl.range(0, L, BLOCK_L, num_stages=NUM_STAGES):
        slots = start + tl.arange(0, BLOCK_L)
        slot_mask = slots < L
        rows = tl.load(indices_ptr + token * L + slots, mask=slot_mask, other=-1).to(tl.int64)
        read = rows >= 0
        weights = tl.load(weights_ptr + token * L + slots, mask=read, other=0.0).to(tl.float32)
        # Value rows are read once: stream them past L2 (evict_first) instead of pushing out reusable data.
        tile = tl.load(
            values_ptr + rows[:, None] * stride_values + cols[None, :],
            mask=read[:, None] & col_mask[None, :],
            other=0.0,
            eviction_policy="evict_first",
        ).to(tl.float32)
        acc += tl.sum(tile * weights[:, None], axis=0)
    tl.store(out_ptr + token * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=col_mask)


@triton.jit
def _weight_grad_kernel(
    grad_out_ptr, values_ptr, indices_ptr, grad_weights_ptr,
    L, D, stride_grad, stride_values,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    for start in range(0, L, BLOCK_L):
        slots = start + tl.arange(0, BLOCK_L)
        slot_mask = slots < L
        rows = tl.load(indices_ptr + token * L + slots, mask=slot_mask, other=-1).to(tl.int64)
        read = rows >= 0
        dots = tl.zeros([BLOCK_L], dtype=tl.float32)
        for col_start in range(0, D, BLOCK_D):
            cols = col_start + tl.arange(0, BLOCK_D)
            col_mask = cols < D
            grad = tl.load(grad_out_ptr + token * stride_grad + cols, mask=col_mask, other=0.0).to(tl.float32)
            tile = tl.load(
                values_ptr + rows[:, None] * stride_values + cols[None, :],
                mask=read[:, None] & col_mask[None, :],
                other=0.0,
            ).to(tl.float32)
            dots += tl.sum(tile * grad[None, :], axis=1)
        tl.store(grad_weights_ptr + token * L + slots, dots, mask=slot_mask)


@triton.jit
def load_pair_chunk(
    grad_out_ptr, weights_ptr, pair_order_ptr, start, end, cols, col_mask, L, stride_grad, BLOCK_P: tl.constexpr
):
    """Up to BLOCK_P (token, slot) pairs of one row's segment, from position `start`: their flat pair ids, mask,
    weights and the output-gradient rows of their tokens, [BLOCK_P, BLOCK_D] in fp32."""
    positions = start + tl.arange(0, BLOCK_P)
    pair_mask = positions < end
    pairs = tl.load(pair_order_ptr + positions, mask=pair_mask, other=0).to(tl.int64)
    weights = tl.load(weights_ptr + pairs, mask=pair_mask, other=0.0).to(tl.float32)
    # A token's gradient row is gathered once per pair (~L times): keep these rows in L2 (evict_last).
    grads = tl.load(
        grad_out_ptr + (pairs // L)[:, None] * stride_grad + cols[None, :],
        mask=pair_mask[:, None] & col_mask[None, :],
        other=0.0,
        eviction_policy="evict_last",
    ).to(tl.float32)
    return pairs, pair_mask, weights, grads


@triton.jit
def _row_backward_kernel(
    values_ptr, grad_out_ptr, weights_ptr, pair_order_ptr, offsets_ptr, rows_ptr,
    grad_weights_ptr, row_grads_ptr,
    U, L, D, stride_values, stride_grad, stride_row_grads,
    DENSE: tl.constexpr, WEIGHT_GRADS: tl.constexpr, ATOMIC_WEIGHT_GRADS: tl.constexpr,
    ROWS_PER_PROGRAM: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    # Several touched rows per program: most rows have one or two pairs, too little work for a program each.
    for i in range(ROWS_PER_PROGRAM):
        segment = tl.program_id(0).to(tl.int64) * ROWS_PER_PROGRAM + i
        valid = segment < U
        begin = tl.load(offsets_ptr + segment, mask=valid, other=0)
        end = tl.load(offsets_ptr + segment + 1, mask=valid, other=0)
        row = tl.load(rows_ptr + segment, mask=valid, other=0).to(tl.int64)
        if WEIGHT_GRADS:
            value = tl.load(
                values_ptr + row * stride_values + cols, mask=col_mask & valid, other=0.0,
                eviction_policy="evict_first",
            ).to(tl.float32)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for start in range(begin, end, BLOCK_P):
            pairs, pair_mask, weights, grads = load_pair_chunk(
                grad_out_ptr, weights_ptr, pair_order_ptr, start, end, cols, col_mask, L, stride_grad, BLOCK_P
            )
            acc += tl.sum(grads * weights[:, None], axis=0)
            if WEIGHT_GRADS:
                dots = tl.sum(grads * value[None, :], axis=1)
                if ATOMIC_WEIGHT_GRADS:
                    tl.atomic_add(grad_weights_ptr + pairs, dots, mask=pair_mask)
                else:
                    tl.store(grad_weights_ptr + pairs, dots, mask=pair_mask)
        destination = row if DENSE else segment
        tl.store(
            row_grads_ptr + destination * stride_row_grads + cols,
            acc.to(row_grads_ptr.dtype.element_ty),
            mask=col_mask & valid,
        )


# --------------------------------------------------------------------------------------------------- python wrappers


def _check(values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> None:
    if values.ndim != 2 or indices.ndim != 2 or weights.shape != indices.shape:
        raise ValueError(
            f"expected values [N, D], indices [T, L], weights [T, L]; got {tuple(values.shape)}, "
            f"{tuple(indices.shape)}, {tuple(weights.shape)}"
        )
    if indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"indices must be int32 or int64, got {indices.dtype}")


def sort_pairs_by_row(indices: torch.Tensor, num_rows: int, unread: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs' rows, sorted (stable), and the pair ids in that order; with `unread`, the negative entries left out
    first (a host sync)."""
    flat = indices.reshape(-1)
    read = None
    if unread:
        read = (flat >= 0).nonzero().squeeze(1)
        flat = flat[read]
    if flat.dtype == torch.int64 and num_rows <= 2**31:
        # Radix sort time grows with key width: sort 32-bit keys when the table's rows fit (decided from the table
        # size, not the indices' max, which would stall the GPU for a host sync in every backward).
        flat = flat.to(torch.int32)
    sorted_rows, pair_order = torch.sort(flat, stable=True)
    if read is not None:
        pair_order = read[pair_order]
    return sorted_rows, pair_order


def row_segments(indices: torch.Tensor, num_rows: int, unread: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group the (token, slot) pairs by value row, for a table of `num_rows` rows. With `unread`, `indices` may hold
    negative entries, pairs that read nothing: they are left out before the sort (which then sorts only the pairs
    read, however many are not), at the cost of a host sync.

    Returns the pair ids sorted by row (a stable sort, so ties keep token order: the sums are deterministic), the
    segment offsets [U + 1] into that order, and the U distinct rows, ascending.
    """
    sorted_rows, pair_order = sort_pairs_by_row(indices, num_rows, unread)
    rows, counts = torch.unique_consecutive(sorted_rows, return_counts=True)
    rows = rows.to(indices.dtype)
    offsets = torch.zeros(rows.numel() + 1, dtype=torch.int64, device=indices.device)
    torch.cumsum(counts, dim=0, out=offsets[1:])
    return pair_order, offsets, rows


def _forward(values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
             out_dtype: torch.dtype | None = None) -> torch.Tensor:
    _check(values, indices, weights)
    values, indices, weights = values.contiguous(), indices.contiguous(), weights.contiguous()
    tokens, slots = indices.shape
    dim = values.shape[1]
    out = torch.empty(tokens, dim, device=values.device, dtype=out_dtype or values.dtype)
    if tokens == 0:
        return out
    cfg = launch_config("forward", dim)
    grid = (tokens, triton.cdiv(dim, cfg["BLOCK_D"]))
    _bag_forward_kernel[grid](
        values, indices, weights, out, slots, dim, values.stride(0), out.stride(0),
        BLOCK_L=cfg["BLOCK_L"], BLOCK_D=cfg["BLOCK_D"], NUM_STAGES=cfg["NUM_STAGES"], num_warps=cfg["num_warps"],
    )
    return out


def _weight_grad(grad_out: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    grad_out, values, indices = grad_out.contiguous(), values.contiguous(), indices.contiguous()
    tokens, slots = indices.shape
    grad_weights = torch.empty(tokens, slots, device=values.device, dtype=torch.float32)
    if tokens == 0:
        return grad_weights
    cfg = launch_config("weight_grad", values.shape[1])
    _weight_grad_kernel[(tokens,)](
        grad_out, values, indices, grad_weights, slots, values.shape[1], grad_out.stride(0), values.stride(0),
        BLOCK_L=cfg["BLOCK_L"], BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"],
    )
    return grad_weights


def _row_backward(
    grad_out: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    *,
    dense: bool,
    weight_grads: bool,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_weights [T, L] fp32 or empty, rows [U], row grads [U, D] or dense [N, D], both in values' dtype)."""
    grad_out, values = grad_out.contiguous(), values.contiguous()
    indices, weights = indices.contiguous(), weights.contiguous()
    tokens, slots = indices.shape
    num_rows, dim = values.shape
    # The dense baseline and the sparse gradients are not the hot path: they take read-nothing pairs always.
    pair_order, offsets, rows = row_segments(indices, num_rows, unread=True)
    # Summed in fp32, stored in the table's dtype: at 1M touched rows × 2048, fp32 row gradients would be 8 GB.
    if dense:
        row_grads = torch.zeros(num_rows, dim, device=values.device, dtype=values.dtype)
    else:
        row_grads = torch.empty(rows.numel(), dim, device=values.device, dtype=values.dtype)
    cfg = launch_config("row_backward", dim)
    block_d = cfg["BLOCK_D"]
    if deterministic and weight_grads:
        # One column block per row: each weight gradient is then a single program's dot product, no atomics.
        block_d = triton.next_power_of_2(dim)
    column_blocks = triton.cdiv(dim, block_d)
    atomic = weight_grads and column_blocks > 1
    # The kernel writes the weight gradients of the pairs it groups; those that read nothing must read 0.
    allocate = torch.zeros if atomic or pair_order.numel() < tokens * slots else torch.empty
    grad_weights = allocate(tokens, slots, device=values.device, dtype=torch.float32) if weight_grads else None
    if rows.numel():
        per_program = cfg["ROWS_PER_PROGRAM"]
        _row_backward_kernel[(triton.cdiv(rows.numel(), per_program), column_blocks)](
            values, grad_out, weights, pair_order, offsets, rows,
            grad_weights if weight_grads else row_grads, row_grads,
            rows.numel(), slots, dim, values.stride(0), grad_out.stride(0), row_grads.stride(0),
            DENSE=dense, WEIGHT_GRADS=weight_grads, ATOMIC_WEIGHT_GRADS=atomic,
            ROWS_PER_PROGRAM=per_program, BLOCK_P=cfg["BLOCK_P"], BLOCK_D=block_d, num_warps=cfg["num_warps"],
        )
    if grad_weights is None:
        grad_weights = torch.empty(0, device=values.device, dtype=torch.float32)
    return grad_weights, rows, row_grads


# ------------------------------------------------------------------------------------------------------ custom ops


@torch.library.custom_op("titanmem::weighted_bag", mutates_args=())
def weighted_bag(values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                 out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """out[t] = Σ_l weights[t, l] · values[indices[t, l]] in fp32, stored in `out_dtype` (default values' dtype).
    Its autograd writes a dense value gradient (the faithful baseline); sparse and fused-update training read
    `sparse_row_grads` or the row-wise optimizers instead."""
    return _forward(values, indices, weights, out_dtype)


@weighted_bag.register_fake
def _(values, indices, weights, out_dtype=None):
    _check(values, indices, weights)
    return values.new_empty(indices.shape[0], values.shape[1], dtype=out_dtype or values.dtype)


@torch.library.custom_op("titanmem::weighted_bag_weight_grad", mutates_args=())
def weighted_bag_weight_grad(grad_out: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """grad_weights[t, l] = <grad_out[t], values[indices[t, l]]>, fp32, token-ordered (no sort, deterministic)."""
    return _weight_grad(grad_out, values, indices)


@weighted_bag_weight_grad.register_fake
def _(grad_out, values, indices):
    return grad_out.new_empty(indices.shape, dtype=torch.float32)


@torch.library.custom_op("titanmem::weighted_bag_dense_backward", mutates_args=())
def weighted_bag_dense_backward(
    grad_out: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, deterministic: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_weights [T, L] fp32, grad_values [N, D] dense in values' dtype) in one row-ordered pass."""
    grad_weights, _, grad_values = _row_backward(
        grad_out, values, indices, weights, dense=True, weight_grads=True, deterministic=deterministic
    )
    return grad_weights, grad_values


@weighted_bag_dense_backward.register_fake
def _(grad_out, values, indices, weights, deterministic):
    return grad_out.new_empty(indices.shape, dtype=torch.float32), torch.empty_like(values)


@torch.library.custom_op("titanmem::weighted_bag_sparse_backward", mutates_args=())
def weighted_bag_sparse_backward(
    grad_out: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, deterministic: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_weights [T, L] fp32, rows [U] ascending, row_grads [U, D] in values' dtype): only the touched rows."""
    grad_weights, rows, row_grads = _row_backward(
        grad_out, values, indices, weights, dense=False, weight_grads=True, deterministic=deterministic
    )
    return grad_weights, rows, row_grads


@weighted_bag_sparse_backward.register_fake
def _(grad_out, values, indices, weights, deterministic):
    touched = torch.library.get_ctx().new_dynamic_size()
    return (
        grad_out.new_empty(indices.shape, dtype=torch.float32),
        indices.new_empty(touched, dtype=indices.dtype),
        values.new_empty(touched, values.shape[1]),
    )


def _setup_context(ctx, inputs, output):
    values, indices, weights = inputs[:3]  # then out_dtype, when it was passed
    ctx.save_for_backward(values, indices, weights)


def _backward(ctx, grad_out):
    values, indices, weights = ctx.saved_tensors
    needs_values, needs_weights = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    grad_values = grad_weights = None
    if needs_values:
        grad_weights, grad_values = weighted_bag_dense_backward(
            grad_out, values, indices, weights, torch.are_deterministic_algorithms_enabled()
        )
    elif needs_weights:
        grad_weights = weighted_bag_weight_grad(grad_out, values, indices)
    if grad_weights is not None:
        grad_weights = grad_weights.to(weights.dtype)
    if grad_values is not None:
        grad_values = grad_values.to(values.dtype)
    grads = (grad_values, None, grad_weights if needs_weights else None)
    return grads + (None,) * (len(ctx.needs_input_grad) - len(grads))


weighted_bag.register_autograd(_backward, setup_context=_setup_context)

__all__ = [
    "INTERPRET",
    "row_segments",
    "weighted_bag",
    "weighted_bag_dense_backward",
    "weighted_bag_sparse_backward",
    "weighted_bag_weight_grad",
]
