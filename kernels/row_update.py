"""Fused row-wise optimizer updates of the value table, straight from the memory layers' output gradients.

No [N, D] gradient is ever formed. The (token, slot) pairs of every memory-layer call since the last step (all
layers, all micro-batches) are grouped by value row (`row_groups`, which reads every size the passes need from the
device at once), and two passes run over the touched rows:

1. `row_grad_sq`: the squared norm of each touched row's summed gradient, Σ_pairs w · grad_out[t]. Their sum is the
   value table's gradient norm, used for its separate clipping and logged; row-wise Adagrad also needs it per row.
2. `row_update_`: recompute each row's gradient, scale it by the clip factor and apply the optimizer to that row in
   place: SGD, row-wise Adagrad (one fp32 accumulator per row), or lazy Adam (moments of untouched rows are not
   decayed, as in torch.optim.SparseAdam; bias correction uses the count of applied steps). Weight decay is
   decoupled and, like the moments, applied only to the rows a step touches. The step's clip factor, whether to apply
   it at all, and Adam's bias corrections come from the device (`step_scalars`), so that the host never has to read
   the norms to decide: a step the device skips writes nothing.

Recomputing the row gradient in pass 2 costs one more read of the gathered output gradients, which is what it takes
to clip by the global norm without materialising the gradients.

A row's pairs are summed by one program, in order; a hot row (read by most tokens of the whole batch, which under a
rows-sharded table means the whole data-parallel group's batch) would make that program the step's tail. Rows of more
than `HEAVY_PAIRS` pairs are therefore summed beforehand in chunks of that many pairs, by a program each, and their
chunks then added in order (`heavy_row_chunks`, `sum_heavy_rows`), once per step: both passes read these rows'
gradients instead of their pairs. The
chunks start at the row's first pair, so the sum's association depends only on the row's pairs and their order,
never on the rest of the batch or on the layout that gathered it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from titanmem.kernels.config import launch_config
from titanmem.kernels.embedding_bag import load_pair_chunk, sort_pairs_by_row
from titanmem.registry import VALUE_OPTIMIZERS

# The row-wise optimizers this update has a branch for, by the codes their registry entries give them.
OPTIMIZERS = {entry.name: entry.update_code for entry in VALUE_OPTIMIZERS.entries if entry.triton_update}
SGD, ADAGRAD, ADAM = OPTIMIZERS["sgd"], OPTIMIZERS["adagrad"], OPTIMIZERS["adam"]
# The same codes as the kernel compares them (a jitted function reads only constexpr globals).
_SGD, _ADAGRAD = tl.constexpr(SGD), tl.constexpr(ADAGRAD)


@triton.jit
def _summed_row_grad(
    grad_out_ptr, weights_ptr, pair_order_ptr, begin, end, cols, col_mask, L, stride_grad, BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(begin, end, BLOCK_P):
        _, _, weights, grads = load_pair_chunk(
            grad_out_ptr, weights_ptr, pair_order_ptr, start, end, cols, col_mask, L, stride_grad, BLOCK_P
        )
        acc += tl.sum(grads * weights[:, None], axis=0)
    return acc


@triton.jit
def _chunk_sum_kernel(
    grad_out_ptr, weights_ptr, pair_order_ptr, begins_ptr, ends_ptr, out_ptr, L, D, stride_grad, stride_out,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[i] = Σ w · grad_out[t] over the pairs at positions [begins[i], ends[i]) of `pair_order`, in order."""
    item = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    acc = _summed_row_grad(
        grad_out_ptr, weights_ptr, pair_order_ptr, tl.load(begins_ptr + item), tl.load(ends_ptr + item), cols,
        col_mask, L, stride_grad, BLOCK_P, BLOCK_D,
    )
    tl.store(out_ptr + item * stride_out + cols, acc, mask=col_mask)


@triton.jit
def _row_grad(
    grad_out_ptr, weights_ptr, pair_order_ptr, begin, end, segment, keep, heavy_slots_ptr, heavy_grads_ptr,
    cols, col_mask, L, stride_grad, stride_heavy, HEAVY: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """A touched row's summed gradient on `cols`: from its pairs, or, for a heavy row, from its precomputed sum;
    0 where `keep` is false (a row left out of the update)."""
    end = tl.where(keep, end, begin)
    if HEAVY:
        slot = tl.load(heavy_slots_ptr + segment).to(tl.int64)
        end = tl.where(slot >= 0, begin, end)
    grad = _summed_row_grad(
        grad_out_ptr, weights_ptr, pair_order_ptr, begin, end, cols, col_mask, L, stride_grad, BLOCK_P, BLOCK_D
    )
    if HEAVY:
        grad += tl.load(heavy_grads_ptr + tl.maximum(slot, 0) * stride_heavy + cols,
                        mask=col_mask & keep & (slot >= 0), other=0.0)
    return grad


@triton.jit
def _row_grad_sq_kernel(
    grad_out_ptr, weights_ptr, pair_order_ptr, offsets_ptr, selected_ptr, heavy_slots_ptr, heavy_grads_ptr,
    row_sq_ptr, L, D, stride_grad, stride_heavy,
    SELECTED: tl.constexpr, HEAVY: tl.constexpr, ATOMIC: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    segment = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    begin = tl.load(offsets_ptr + segment)
    end = tl.load(offsets_ptr + segment + 1)
    keep = True
    if SELECTED:
        # A row left out of the update reads none of its pairs: its gradient, and its share of the norm, are 0.
        keep = tl.load(selected_ptr + segment) != 0
    grad = _row_grad(
        grad_out_ptr, weights_ptr, pair_order_ptr, begin, end, segment, keep, heavy_slots_ptr, heavy_grads_ptr,
        cols, col_mask, L, stride_grad, stride_heavy, HEAVY, BLOCK_P, BLOCK_D,
    )
    partial = tl.sum(grad * grad, axis=0)
    if ATOMIC:
        tl.atomic_add(row_sq_ptr + segment, partial)
    else:
        tl.store(row_sq_ptr + segment, partial)


@triton.jit
def _row_update_kernel(
    values_ptr, first_ptr, second_ptr,
    grad_out_ptr, weights_ptr, pair_order_ptr, offsets_ptr, rows_ptr, selected_ptr, heavy_slots_ptr, heavy_grads_ptr,
    L, D, stride_values, stride_first, stride_second, stride_grad, stride_heavy,
    lr, weight_decay, eps, beta1, beta2, step_scalars_ptr, seed_ptr, row_base, col_base,
    OPTIMIZER: tl.constexpr, ROUNDING: tl.constexpr, SELECTED: tl.constexpr, HEAVY: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    segment = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    # The step's scalars come from the device (`step_scalars`): a step the device decided to skip writes nothing.
    clip = tl.load(step_scalars_ptr)
    # (A column bound of 0 rather than a masked `and`, which Triton's interpreter cannot take for this scalar.)
    col_mask = cols < tl.where(tl.load(step_scalars_ptr + 1) != 0.0, D, 0)
    begin = tl.load(offsets_ptr + segment)
    end = tl.load(offsets_ptr + segment + 1)
    keep = True
    if SELECTED:
        # A row left out reads nothing and writes nothing: its value and its moments stay as they are, bit for bit
        # (no decay of either, unlike a zero gradient).
        keep = tl.load(selected_ptr + segment) != 0
        col_mask = col_mask & keep
    row = tl.load(rows_ptr + segment).to(tl.int64)
    grad = clip * _row_grad(
        grad_out_ptr, weights_ptr, pair_order_ptr, begin, end, segment, keep, heavy_slots_ptr, heavy_grads_ptr,
        cols, col_mask, L, stride_grad, stride_heavy, HEAVY, BLOCK_P, BLOCK_D,
    )
    value_ptrs = values_ptr + row * stride_values + cols
    value = tl.load(value_ptrs, mask=col_mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    value = value * (1.0 - lr * weight_decay)
    if OPTIMIZER == _SGD:
        value = value - lr * grad
    elif OPTIMIZER == _ADAGRAD:  # row-wise Adagrad; its accumulator was already advanced by the caller
        value = value - lr * grad / (tl.sqrt(tl.load(first_ptr + row)) + eps)
    else:  # lazy Adam
        first_ptrs = first_ptr + row * stride_first + cols
        second_ptrs = second_ptr + row * stride_second + cols
        first = tl.load(first_ptrs, mask=col_mask, other=0.0).to(tl.float32)
        second = tl.load(second_ptrs, mask=col_mask, other=0.0).to(tl.float32)
        first = beta1 * first + (1.0 - beta1) * grad
        second = beta2 * second + (1.0 - beta2) * grad * grad
        tl.store(first_ptrs, first.to(first_ptr.dtype.element_ty), mask=col_mask)
        tl.store(second_ptrs, second.to(second_ptr.dtype.element_ty), mask=col_mask)
        bias_correction1 = tl.load(step_scalars_ptr + 2)
        bias_correction2 = tl.load(step_scalars_ptr + 3)
        value = value - lr * (first / bias_correction1) / (tl.sqrt(second / bias_correction2) + eps)
    if ROUNDING == 1:
        value = _round_to_nearest_bf16(value)
    elif ROUNDING == 2:
        # Drawn by the element's place in the whole table, so that every layout of it draws the same bits.
        value = _stochastic_round_to_bf16(value, tl.load(seed_ptr), row + row_base, cols + col_base)
    tl.store(value_ptrs, value.to(values_ptr.dtype.element_ty), mask=col_mask)


@triton.jit
def _round_to_nearest_bf16(value):
    """`value` (fp32) rounded to the nearest bf16, ties to even, done on the bits: the same on every backend (a plain
    conversion truncates under the interpreter)."""
    bits = value.to(tl.uint32, bitcast=True)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    finite = (bits & 0x7F800000) != 0x7F800000
    return tl.where(finite, rounded, value)


@triton.jit
def _stochastic_round_to_bf16(value, seed, row, cols):
    """`value` (fp32) moved to one of its two bf16 neighbours, the upper one with probability equal to its distance
    from the lower: 16 random bits are added below the bf16 mantissa and then cut off. The bits are Philox's, keyed by
    (seed, row) and counted by column, so a run repeats them. The result is exactly representable in bf16."""
    bits = value.to(tl.uint32, bitcast=True)
    noise = tl.randint(seed + row * 2147483648, cols.to(tl.uint32)) & 0xFFFF
    rounded = ((bits + noise) & 0xFFFF0000).to(tl.float32, bitcast=True)
    # Inf and NaN keep their bits: carrying noise into them could turn one into the other.
    finite = (bits & 0x7F800000) != 0x7F800000
    return tl.where(finite, rounded, value)


def _rounding(dtype: torch.dtype, stochastic: bool) -> int:
    """How the kernel stores an updated value: 0 as it is (an fp32 table), 1 to nearest bf16, 2 stochastically."""
    if dtype == torch.float32:
        return 0
    if dtype != torch.bfloat16:
        raise ValueError(f"the fused value update stores fp32 or bf16 tables, not {dtype}")
    return 2 if stochastic else 1


def step_scalars(clip, step, beta1: float, beta2: float, apply=True, device=None) -> torch.Tensor:
    """The scalars of one update as `row_update_` reads them from the device: [clip factor, apply (1 or 0),
    1 - beta1**step, 1 - beta2**step] (fp32; Adam's bias corrections of the step being applied).

    Numbers give a tensor on `device`; 0-d device tensors (the optimizer's clip factor, its applied-step count and its
    decision to apply) give one computed there, so that nothing waits for the host. The powers are taken in fp64 either
    way, and then rounded to fp32, as the kernels use them."""
    if not any(isinstance(x, torch.Tensor) for x in (clip, step, apply)):
        return torch.tensor([clip, float(apply), 1.0 - beta1**step, 1.0 - beta2**step], dtype=torch.float32,
                            device=device)
    on = next(x for x in (clip, step, apply) if isinstance(x, torch.Tensor)).device
    step = torch.as_tensor(step, device=on).double().clamp(min=1)  # a skipped first step has no bias correction
    return torch.stack([torch.as_tensor(clip, device=on).double(), torch.as_tensor(apply, device=on).double(),
                        1.0 - beta1**step, 1.0 - beta2**step]).float()


def _launch_shape(dim: int, deterministic: bool) -> tuple[dict, int]:
    cfg = launch_config("row_update", dim)
    if deterministic:
        cfg["BLOCK_D"] = triton.next_power_of_2(dim)
    return cfg, triton.cdiv(dim, cfg["BLOCK_D"])


@dataclass(frozen=True)
class HeavyRows:
    """The touched rows of more than `HEAVY_PAIRS` pairs and their chunks, fixed once the pairs are grouped by row."""

    slots: torch.Tensor
    """[U] int32: each touched row's place among the heavy rows, -1 for the others."""
    segments: torch.Tensor
    """[H]: the heavy rows, as touched-row numbers (ascending)."""
    begins: torch.Tensor
    """[C]: each chunk's first pair, as a position in `pair_order`."""
    ends: torch.Tensor
    """[C]: one past each chunk's last pair."""
    chunk_offsets: torch.Tensor
    """[H + 1]: each heavy row's chunks, in order."""


def heavy_threshold(dim: int) -> int:
    """The launch config's `HEAVY_PAIRS` for rows of width `dim`: rows of more pairs are summed in chunks."""
    return launch_config("row_update", dim)["HEAVY_PAIRS"]


def heavy_row_chunks(offsets: torch.Tensor, heavy_pairs: int, counts: tuple[int, int] | None = None) -> HeavyRows:
    """The heavy rows of the grouping `offsets` and their chunks of `heavy_pairs` pairs, each starting at its row's
    first pair (none, possibly). `counts` (heavy rows, chunks), when the caller already read them from the device
    (`row_groups`), spare the host sync that finds them here."""
    lengths = offsets.diff()
    heavy = lengths > heavy_pairs
    pieces = torch.where(heavy, (lengths + heavy_pairs - 1) // heavy_pairs, 0)
    if counts is None:
        counts = tuple(int(x) for x in torch.stack([heavy.sum(), pieces.sum()]).tolist())
    rows, count = counts
    device = offsets.device
    if rows == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return HeavyRows(torch.full((lengths.numel(),), -1, dtype=torch.int32, device=device), empty, empty, empty,
                         torch.zeros(1, dtype=torch.int64, device=device))
    # The heavy rows' numbers, in order, without a data-dependent `nonzero`: each one's place is its running count.
    place = torch.cumsum(heavy, 0) - 1
    segments = torch.zeros(rows + 1, dtype=torch.int64, device=device)
    segments.scatter_(0, torch.where(heavy, place, rows), torch.arange(lengths.numel(), device=device))
    segments = segments[:rows]
    chunk_offsets = torch.zeros(rows + 1, dtype=torch.int64, device=device)
    torch.cumsum(pieces[segments], dim=0, out=chunk_offsets[1:])
    owner = torch.repeat_interleave(torch.arange(rows, device=device), pieces[segments], output_size=count)
    begins = offsets[segments][owner] + (torch.arange(count, device=device) - chunk_offsets[owner]) * heavy_pairs
    ends = torch.minimum(begins + heavy_pairs, offsets[segments + 1][owner])
    slots = torch.where(heavy, place, -1).to(torch.int32)
    return HeavyRows(slots, segments, begins, ends, chunk_offsets)


def _no_heavy_rows(chunks: HeavyRows) -> bool:
    return chunks.segments.numel() == 0


def row_groups(indices: torch.Tensor, num_rows: int, unread: bool = False, heavy_pairs: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, HeavyRows | None]:
    """`row_segments`' grouping of the pairs by row, and with `heavy_pairs` the heavy rows' chunks
    (`heavy_row_chunks`; None without), at the cost of one host sync for all the sizes they depend on (plus, with
    `unread`, the one that leaves the unread pairs out before the sort). Returns (pair_order, offsets, rows, heavy)."""
    sorted_rows, pair_order = sort_pairs_by_row(indices, num_rows, unread)
    pairs, device = sorted_rows.numel(), indices.device
    if pairs == 0:
        offsets = torch.zeros(1, dtype=torch.int64, device=device)
        return pair_order, offsets, indices.new_empty(0), (
            heavy_row_chunks(offsets, heavy_pairs, (0, 0)) if heavy_pairs is not None else None)
    starts = torch.ones(pairs, dtype=torch.bool, device=device)
    torch.ne(sorted_rows[1:], sorted_rows[:-1], out=starts[1:])
    segment = torch.cumsum(starts, 0) - 1
    # Each segment's first pair, in a table as long as the pairs could make segments; the others end up at `pairs`,
    # so their lengths are 0. Every non-start goes to a dummy slot past the table (no write from the host: that
    # would be a sync).
    padded = torch.full((pairs + 2,), pairs, dtype=torch.int64, device=device)
    padded.scatter_(0, torch.where(starts, segment, pairs + 1), torch.arange(pairs, device=device))
    padded = padded[:pairs + 1]
    sizes = [segment[-1] + 1]
    if heavy_pairs is not None:
        lengths = padded.diff()
        heavy = lengths > heavy_pairs
        sizes += [heavy.sum(), torch.where(heavy, (lengths + heavy_pairs - 1) // heavy_pairs, 0).sum()]
    sizes = [int(x) for x in torch.stack(sizes).tolist()]  # the one read of the device
    offsets = padded[:sizes[0] + 1]
    rows = sorted_rows[offsets[:-1]].to(indices.dtype)
    heavy_rows = heavy_row_chunks(offsets, heavy_pairs, (sizes[1], sizes[2])) if heavy_pairs is not None else None
    return pair_order, offsets, rows, heavy_rows


def sum_heavy_rows(grad_out: torch.Tensor, weights: torch.Tensor, pair_order: torch.Tensor, chunks: HeavyRows,
                   block_p: int, block_d: int, num_warps: int) -> torch.Tensor:
    """The summed gradients [H, D] (fp32) of the heavy rows: each chunk by a program of its own, then each row's
    chunks added in order."""
    device, dim = grad_out.device, grad_out.shape[1]
    count, rows = chunks.begins.numel(), chunks.segments.numel()
    column_blocks = triton.cdiv(dim, block_d)
    partial = torch.empty(count, dim, device=device, dtype=torch.float32)
    _chunk_sum_kernel[(count, column_blocks)](
        grad_out, weights, pair_order, chunks.begins, chunks.ends, partial, weights.shape[1], dim, grad_out.stride(0),
        partial.stride(0), BLOCK_P=block_p, BLOCK_D=block_d, num_warps=num_warps,
    )
    # Each heavy row's chunks, added in order: the same kernel, over the chunk sums as pairs of weight 1.
    grads = torch.empty(rows, dim, device=device, dtype=torch.float32)
    _chunk_sum_kernel[(rows, column_blocks)](
        partial, torch.ones(count, device=device), torch.arange(count, device=device), chunks.chunk_offsets[:-1],
        chunks.chunk_offsets[1:], grads, 1, dim, partial.stride(0), grads.stride(0), BLOCK_P=block_p, BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return grads


def heavy_row_grads(grad_out: torch.Tensor, weights: torch.Tensor, pair_order: torch.Tensor, offsets: torch.Tensor,
                    heavy_pairs: int, block_p: int, block_d: int, num_warps: int
                    ) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
    """The summed gradients [H, D] (fp32) of the touched rows of more than `heavy_pairs` pairs, and each touched row's
    slot among them ([U] int32, -1 for the others); (None, None) when there are none (one host sync to tell)."""
    chunks = heavy_row_chunks(offsets, heavy_pairs)
    if _no_heavy_rows(chunks):
        return None, None
    return chunks.slots, sum_heavy_rows(grad_out, weights, pair_order, chunks, block_p, block_d, num_warps)


def heavy_rows(grad_out: torch.Tensor, weights: torch.Tensor, pair_order: torch.Tensor, offsets: torch.Tensor,
               chunks: HeavyRows | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The heavy rows' slots and summed gradients at the launch config's threshold, for both passes of a step to
    share: empty when no row is heavy. `chunks`: their chunks from `row_groups`, else found here (a host sync). The
    chunks' sums do not depend on the column blocks, so one result serves a deterministic norm pass and the update
    alike."""
    grad_out, weights = grad_out.contiguous(), weights.contiguous()
    dim = grad_out.shape[1]
    cfg = launch_config("row_update", dim)
    if chunks is None:
        chunks = heavy_row_chunks(offsets, cfg["HEAVY_PAIRS"])
    if _no_heavy_rows(chunks):
        return (torch.empty(0, dtype=torch.int32, device=grad_out.device),
                torch.empty(0, dim, dtype=torch.float32, device=grad_out.device))
    return chunks.slots, sum_heavy_rows(grad_out, weights, pair_order, chunks, cfg["BLOCK_P"], cfg["BLOCK_D"],
                                        cfg["num_warps"])


def _heavy_rows(grad_out, weights, pair_order, offsets, heavy_slots, heavy_grads
                ) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
    """The heavy rows as the kernels take them (None when there are none), computed here unless given."""
    if heavy_slots is None or heavy_grads is None:
        heavy_slots, heavy_grads = heavy_rows(grad_out, weights, pair_order, offsets)
    if heavy_slots.numel() == 0:
        return None, None, 0
    return heavy_slots, heavy_grads, heavy_grads.stride(0)


@torch.library.custom_op("titanmem::row_grad_sq", mutates_args=())
def row_grad_sq(
    grad_out: torch.Tensor,
    weights: torch.Tensor,
    pair_order: torch.Tensor,
    offsets: torch.Tensor,
    deterministic: bool,
    selected: torch.Tensor | None = None,
    heavy_slots: torch.Tensor | None = None,
    heavy_grads: torch.Tensor | None = None,
) -> torch.Tensor:
    """Squared norm [U] (fp32) of each touched row's summed gradient; rows as grouped by `row_segments`. `selected`
    ([U] bool, per touched row), when given, leaves the other rows out: their squared norm is 0. `heavy_slots` and
    `heavy_grads`: the step's `heavy_rows`, when already summed (else summed here)."""
    grad_out, weights = grad_out.contiguous(), weights.contiguous()
    segments = offsets.numel() - 1
    dim = grad_out.shape[1]
    cfg, column_blocks = _launch_shape(dim, deterministic)
    atomic = column_blocks > 1
    row_sq = (torch.zeros if atomic else torch.empty)(segments, device=grad_out.device, dtype=torch.float32)
    if segments:
        slots, heavy_grads, stride_heavy = _heavy_rows(grad_out, weights, pair_order, offsets, heavy_slots,
                                                       heavy_grads)
        _row_grad_sq_kernel[(segments, column_blocks)](
            grad_out, weights, pair_order, offsets, _selection(selected, segments), slots, heavy_grads, row_sq,
            weights.shape[1], dim, grad_out.stride(0), stride_heavy, SELECTED=selected is not None,
            HEAVY=slots is not None, ATOMIC=atomic, BLOCK_P=cfg["BLOCK_P"], BLOCK_D=cfg["BLOCK_D"],
            num_warps=cfg["num_warps"],
        )
    return row_sq


def _selection(selected: torch.Tensor | None, segments: int) -> torch.Tensor | None:
    """The per-touched-row selection as the kernels read it (one byte per row), checked against the rows."""
    if selected is None:
        return None
    if selected.shape != (segments,):
        raise ValueError(f"selected must hold one flag per touched row ({segments}), got shape "
                         f"{tuple(selected.shape)}")
    return selected.to(torch.uint8).contiguous()


@row_grad_sq.register_fake
def _(grad_out, weights, pair_order, offsets, deterministic, selected=None, heavy_slots=None, heavy_grads=None):
    return grad_out.new_empty(offsets.shape[0] - 1, dtype=torch.float32)


@torch.library.custom_op("titanmem::row_update_", mutates_args=("values", "first", "second"))
def row_update_(
    values: torch.Tensor,
    first: torch.Tensor,
    second: torch.Tensor,
    grad_out: torch.Tensor,
    weights: torch.Tensor,
    pair_order: torch.Tensor,
    offsets: torch.Tensor,
    rows: torch.Tensor,
    row_sq: torch.Tensor,
    optimizer: int,
    lr: float,
    weight_decay: float,
    eps: float,
    beta1: float,
    beta2: float,
    scalars: torch.Tensor,
    seed: torch.Tensor | None = None,
    selected: torch.Tensor | None = None,
    row_base: int = 0,
    col_base: int = 0,
    heavy_slots: torch.Tensor | None = None,
    heavy_grads: torch.Tensor | None = None,
) -> None:
    """Apply one optimizer step, in place, to the touched rows of `values` (and their state `first`/`second`:
    unused [0] tensors for SGD, the [N] accumulator for Adagrad, the [N, D] moments for Adam). `scalars` are the
    step's `step_scalars` on the device: the clip factor, whether to apply the step at all (a skipped step leaves
    everything as it was), and Adam's bias corrections. The update is computed in fp32; a bf16 table is rounded back
    stochastically when `seed` (an int64 [1] tensor, `rounding_seeds`) is given, seeded by it and the row, else to
    nearest. `selected` ([U] bool, per touched row), when given, updates only those rows: the others, with their
    state, are left untouched (their `row_sq` must be 0, as `row_grad_sq` gives it with the same selection).
    `row_base` and `col_base` place `values` in the whole table (a block of it held by this rank): the stochastic
    rounding draws by the element's place there. `heavy_slots`, `heavy_grads`: as for `row_grad_sq`."""
    grad_out, weights = grad_out.contiguous(), weights.contiguous()
    segments = rows.numel()
    if not segments:
        return
    dim = values.shape[1]
    _check_scalars(scalars, seed)
    if optimizer not in OPTIMIZERS.values():
        raise ValueError(f"the fused Triton update has no branch for optimizer code {optimizer}; it has "
                         f"{OPTIMIZERS}")
    if optimizer == ADAGRAD:
        # The accumulator grows by the mean squared (clipped) gradient of its row. Advanced here, once per row, so
        # that the kernel's column blocks all read the same new value. Rows are distinct, so this is a plain update.
        first[rows] += adagrad_increment(row_sq, scalars, dim)
    cfg, column_blocks = _launch_shape(dim, deterministic=False)
    slots, heavy_grads, stride_heavy = _heavy_rows(grad_out, weights, pair_order, offsets, heavy_slots, heavy_grads)
    _row_update_kernel[(segments, column_blocks)](
        values, first, second, grad_out, weights, pair_order, offsets, rows, _selection(selected, segments), slots,
        heavy_grads, weights.shape[1], dim, values.stride(0),
        first.stride(0) if first.ndim == 2 else 0, second.stride(0) if second.ndim == 2 else 0, grad_out.stride(0),
        stride_heavy, lr, weight_decay, eps, beta1, beta2, scalars, seed, row_base, col_base, OPTIMIZER=optimizer,
        ROUNDING=_rounding(values.dtype, seed is not None), SELECTED=selected is not None, HEAVY=slots is not None,
        BLOCK_P=cfg["BLOCK_P"], BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"],
    )


def adagrad_increment(row_sq: torch.Tensor, scalars: torch.Tensor, dim: int) -> torch.Tensor:
    """What row-wise Adagrad adds to each touched row's accumulator: the mean squared clipped gradient of the row, or 0
    on a skipped step (whose norms may be infinite or NaN)."""
    clip, apply = scalars[0], scalars[1] != 0
    return torch.where(apply, row_sq * (clip * clip / dim), 0.0)


def _check_scalars(scalars: torch.Tensor, seed: torch.Tensor | None) -> None:
    if scalars.dtype != torch.float32 or scalars.shape != (4,):
        raise ValueError(f"scalars must be step_scalars' fp32 [4] tensor, got {scalars.dtype} of shape "
                         f"{tuple(scalars.shape)}")
    if seed is not None and (seed.dtype != torch.int64 or seed.numel() != 1):
        raise ValueError(f"seed must be an int64 tensor of one element, got {seed.dtype} of shape {tuple(seed.shape)}")


@row_update_.register_fake
def _(values, first, second, grad_out, weights, pair_order, offsets, rows, row_sq, optimizer, lr, weight_decay, eps,
      beta1, beta2, scalars, seed=None, selected=None, row_base=0, col_base=0, heavy_slots=None, heavy_grads=None):
    return None
