"""Exact top-k selection in Triton: the k largest entries of each row, by a bitwise search for the k-th largest key.

Floats become unsigned integer keys with the same order (-0 below +0, and every NaN above +inf, as torch.topk ranks
them), so a row's k-th largest key is built bit by bit from the top: a bit stays set when at least k keys
are at or above the threshold with it. That is one compare and one row sum per key bit (16 for bf16 and fp16, 32
for fp32), whatever the row width; entries above the threshold are chosen, and ties at the threshold go to the lower
positions.

`row_topk` runs it with one warp per program, so every row sum stays within a warp (no shared memory, no barriers).
On an H200 it takes 0.72× the time of torch.topk's multi-pass radix select on the key search's [tokens · heads · 2,
1024] bf16 scores, sorting of the chosen included (docs/benchmarks.md). The fused key search
(`titanmem.kernels.key_search`) uses the same device functions.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from titanmem.kernels.config import launch_config

# A row lives in one warp's registers (32 keys per lane at 1024): wider rows go to torch.topk.
MAX_WIDTH = 4096

# --------------------------------------------------------------------------------------------------- device functions


@triton.jit
def _ordered(scores):
    """uint32 keys whose unsigned order is the order of the fp32 `scores`, every NaN on top (as torch.topk has it)."""
    bits = scores.to(tl.uint32, bitcast=True)
    # Negative floats order backwards as integers: flip them whole; lift the others above them.
    keys = tl.where((bits >> 31) != 0, bits ^ 0xFFFFFFFF, bits | 0x80000000)
    return tl.where(scores != scores, 0xFFFFFFFF, keys)


@triton.jit
def _ordered16(bits, INF: tl.constexpr):
    """uint32 keys below 2^16 whose order is the order of the 16-bit floats whose bits are `bits` (int16), every NaN
    on top. `INF` is the format's +inf bit pattern: a magnitude above it is a NaN."""
    bits = bits.to(tl.int32) & 0xFFFF
    keys = tl.where(bits >= 0x8000, bits ^ 0xFFFF, bits | 0x8000)
    return tl.where((bits & 0x7FFF) > INF, 0xFFFF, keys).to(tl.uint32)


@triton.jit
def _kth_largest(keys, valid, k, BITS: tl.constexpr = 32):
    """Per row of `keys` [R, M] (uint32 below 2^BITS): the largest threshold with at least k valid keys at or above
    it (0 when fewer than k are valid). A radix select, from the top bit down."""
    threshold = tl.zeros([keys.shape[0]], tl.uint32)
    for bit in tl.static_range(BITS - 1, -1, -1):
        candidate = threshold | (tl.full([], 1, tl.uint32) << bit)
        count = tl.sum((valid & (keys >= candidate[:, None])).to(tl.int32), axis=1)
        threshold = tl.where(count >= k, candidate, threshold)
    return threshold


@triton.jit
def _select(keys, valid, k, BITS: tl.constexpr = 32):
    """The k largest `keys` [R, M] (uint32 below 2^BITS) of each row among `valid`, ties going to the lower position:
    (mask of the chosen, how many per row: k, or all the valid ones when fewer)."""
    threshold = _kth_largest(keys, valid, k, BITS)
    above = valid & (keys > threshold[:, None])
    tied = valid & (keys == threshold[:, None])
    room = k - tl.sum(above.to(tl.int32), axis=1)
    chosen = above | (tied & (tl.cumsum(tied.to(tl.int32), axis=1) <= room[:, None]))
    return chosen, tl.sum(chosen.to(tl.int32), axis=1)


# ------------------------------------------------------------------------------------------------------------ kernel


@triton.jit
def _row_topk_kernel(
    x_ptr, out_ptr, rows, width, k, stride_x, stride_out,
    BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr, BITS: tl.constexpr, INF: tl.constexpr,
):
    """Positions of the k largest entries of BLOCK_R rows, in increasing order, into out[row, :k]."""
    row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    column = tl.arange(0, BLOCK_W)
    valid = (row[:, None] < rows) & (column[None, :] < width)
    bits = tl.load(x_ptr + row[:, None].to(tl.int64) * stride_x + column[None, :], mask=valid, other=0)
    if BITS == 16:
        keys = _ordered16(bits, INF)
    else:
        keys = _ordered(bits.to(tl.float32, bitcast=True))
    chosen, _ = _select(keys, valid, k, BITS)
    slot = tl.cumsum(chosen.to(tl.int32), axis=1) - 1
    tl.store(out_ptr + row[:, None].to(tl.int64) * stride_out + slot,
             tl.broadcast_to(column[None, :].to(tl.int64), [BLOCK_R, BLOCK_W]), mask=chosen)


# ------------------------------------------------------------------------------------------------------- custom ops

# Each float dtype the kernel reads: the integer view it loads, and the bits of +inf in the 16-bit ones.
_FORMATS = {torch.bfloat16: (torch.int16, 0x7F80), torch.float16: (torch.int16, 0x7C00),
            torch.float32: (torch.int32, 0)}


@torch.library.custom_op("titanmem::row_topk_positions", mutates_args=())
def row_topk_positions(x: torch.Tensor, k: int) -> torch.Tensor:
    """Positions [R, k] (int64, increasing) of the k largest entries of each row of `x` [R, W] (bf16, fp16 or fp32,
    1 ≤ k ≤ W); among equal entries the lower positions win."""
    if x.ndim != 2 or x.dtype not in _FORMATS or not 1 <= k <= x.shape[1]:
        raise ValueError(f"row_topk needs a 2-D bf16, fp16 or fp32 tensor and 1 ≤ k ≤ its width; got "
                         f"{tuple(x.shape)} {x.dtype}, k {k}")
    rows, width = x.shape
    out = torch.empty(rows, k, device=x.device, dtype=torch.int64)
    if rows == 0:
        return out
    view, inf = _FORMATS[x.dtype]
    bits = x.contiguous().view(view)
    cfg = launch_config("row_topk", width)
    block_w = triton.next_power_of_2(width)
    block_r = max(1, min(cfg["BLOCK_R"], cfg["ELEMENTS"] // block_w))  # about the same registers at any width
    _row_topk_kernel[(triton.cdiv(rows, block_r),)](
        bits, out, rows, width, k, bits.stride(0), out.stride(0),
        BLOCK_R=block_r, BLOCK_W=block_w, BITS=8 * x.element_size(), INF=inf, num_warps=cfg["num_warps"],
    )
    return out


@row_topk_positions.register_fake
def _(x, k):
    return x.new_empty(x.shape[0], k, dtype=torch.int64)


def row_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Like `x.topk(k, dim=-1)` on a tensor of any leading shape: the k largest of each last-dim row, largest first
    (equal values in increasing position), and their positions. The values are gathered from `x`, so autograd sees a
    gather: its backward is a scatter to distinct positions. Rows wider than MAX_WIDTH, and dtypes the kernel does not
    read, take torch.topk."""
    if x.shape[-1] > MAX_WIDTH or x.dtype not in _FORMATS:
        return x.topk(k, dim=-1)
    positions = row_topk_positions(x.reshape(-1, x.shape[-1]), k).view(*x.shape[:-1], k)
    values = x.gather(-1, positions)
    values, order = values.sort(dim=-1, descending=True, stable=True)
    return values, positions.gather(-1, order)
