"""Memory parallel over rows × columns (`value_slice_sharding = "rows"`; TorchRec calls it grid sharding): every
data-parallel rank holds one block of the value table's rows and one slice of its columns, so that the table is
stored once over the whole group and each rank updates only its own rows.

The group is the G = R × M data-parallel ranks: rank a·M + c holds row block a (of R, contiguous blocks as DTensor's
Shard(0) cuts them) and column slice c (of M = mp). Forward, on T tokens per rank:
1. all-gather the (indices, weights) of the group's tokens: [G·T, L] each (indices as int32 where the table's rows
   fit), small next to what they select;
2. bag them on this rank's block, rows of other blocks reading nothing (index -1): for each token, the partial
   read-out of this block's rows on this rank's columns, [G·T, D/M];
3. all-to-all: rank j gets the block of its tokens from every rank; it sums the R row blocks of each column slice (in
   block order, in fp32) and lays the M slices side by side: [T, D].

Backward mirrors it: an all-to-all sends each rank's output gradient, column slice c, to every rank that holds slice
c; each rank gets the gradient of the group's tokens on its columns, runs the bag's backward on the pairs it owns,
and the weight gradients (0 for pairs it does not own; partial over columns for those it does) are summed over the
group back to the tokens' owners. The block's value gradient sums over the group's tokens; it is divided by G, so it
is the global-batch mean with no further averaging (no other rank holds these rows). A row-wise value optimizer gets
no gradient: the reads are recorded with this rank's rows as local indices and the others as -1
(`titanmem.components.value_optimizer`).

Each direction moves R·T·D elements per rank per call (the partial read-outs in fp32, then their gradients in the
table's dtype), against the column-parallel exchange's T·D; the indices and weights add G·T·L·(4 + 4) bytes forward
and G·T·L·4 backward. What
it saves: the table and its optimizer state are stored once over the G ranks, not R times, and the update's work per
rank does not grow with R.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from titanmem.distributed.memory_parallel import all_gather_rows, sum_and_scatter
from titanmem.models.lookup import Lookup
from titanmem.utils import block_offset


def local_rows(indices: torch.Tensor, start: int, count: int, num_rows: int) -> torch.Tensor:
    """`indices` as rows of the block [start, start + count), and -1 (read nothing) where another block holds them;
    int32 when the table's rows fit, which halves what the exchanges and the sort move."""
    local = indices - start
    local = torch.where((local >= 0) & (local < count), local, -1)
    return local.to(torch.int32) if num_rows < 2**31 else local


class GridLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, block, indices, weights, group, start, num_rows, columns, lookup: Lookup, recorder):
        size = dist.get_world_size(group)
        tokens = indices.shape[0]
        group_indices = local_rows(all_gather_rows(indices, group), start, block.shape[0], num_rows)
        group_weights = all_gather_rows(weights.detach(), group)
        with torch.no_grad():
            # [G·T, D/M]: this block's rows, these columns. In fp32, as the whole bag sums them: a bf16 table's
            # partial read-outs, rounded before their sum, would read differently from every other layout's.
            partial = lookup(block, group_indices, group_weights, out_dtype=torch.float32)
            received = torch.empty_like(partial)
            dist.all_to_all_single(received, partial, group=group)
        # From rank a·M + c: row block a's part of this rank's tokens on column slice c.
        parts = received.view(size // columns, columns, tokens, -1)
        out = parts.sum(0).to(block.dtype).permute(1, 0, 2).reshape(tokens, -1)
        ctx.save_for_backward(block, group_indices, group_weights)
        ctx.group, ctx.lookup, ctx.size, ctx.columns, ctx.tokens, ctx.recorder = (
            group, lookup, size, columns, tokens, recorder)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        block, group_indices, group_weights = ctx.saved_tensors
        size, columns, tokens = ctx.size, ctx.columns, ctx.tokens
        # To rank a·M + c: column slice c of this rank's output gradient, for every row block a.
        slices = grad_out.reshape(tokens, columns, -1).permute(1, 0, 2)
        outgoing = slices.unsqueeze(0).expand(size // columns, -1, -1, -1).reshape(size * tokens, -1)
        grad_local = torch.empty_like(outgoing)
        dist.all_to_all_single(grad_local, outgoing, group=ctx.group)  # [G·T, D/M]: the group's tokens, my columns
        if ctx.recorder is not None:
            grad_local = ctx.recorder.add(group_indices, group_weights, grad_local)
        with torch.enable_grad():
            block_leaf = block.detach().requires_grad_(ctx.needs_input_grad[0])
            weights_leaf = group_weights.detach().requires_grad_(True)
            local = ctx.lookup(block_leaf, group_indices, weights_leaf, out_dtype=torch.float32)
            inputs = (block_leaf, weights_leaf) if ctx.needs_input_grad[0] else (weights_leaf,)
            grads = torch.autograd.grad(local, inputs, grad_local.to(local.dtype))
        grad_block = grads[0] / size if ctx.needs_input_grad[0] else None
        # A pair's weight gradient comes from its row's owner, one part per column slice: sum them back to its token.
        grad_weights = sum_and_scatter(grads[-1], ctx.group)
        return grad_block, None, grad_weights, None, None, None, None, None, None


def grid_lookup(table: DTensor, indices: torch.Tensor, weights: torch.Tensor, group, lookup: Lookup,
                recorder=None) -> torch.Tensor:
    """The weighted bag of `indices` over a table laid out by `shard_value_grid`, whose ranks form `group` (the
    data-parallel ranks, in mesh order); [T, D] for this rank's T tokens. Every rank of the group must pass the same
    number of tokens. `recorder` (if recording) receives the group's reads of this rank's rows (the others as -1)
    with this rank's columns of their gradient."""
    start = block_offset(table)[0]
    columns = table.device_mesh.size(1)
    return GridLookup.apply(table.to_local(), indices, weights, group, start, table.shape[0], columns, lookup,
                            recorder)


def shard_value_grid(values: torch.nn.Module, grid_mesh) -> None:
    """Make the value table a DTensor on the (rows, mp) mesh: rows in contiguous blocks over the first dim (Shard(0)),
    columns over mp (Shard(1)). One global table, as every other layout saves it."""
    sharded = distribute_tensor(values.weight.data, grid_mesh, [Shard(0), Shard(1)])
    values.weight = torch.nn.Parameter(sharded, requires_grad=values.weight.requires_grad)
