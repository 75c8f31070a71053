"""Memory parallel, column-wise (the paper's scheme): each rank of an `mp` group holds all N value rows but only
v_dim / mp of their columns, and reads them for the whole group's tokens.

Forward, on a group of M ranks with T tokens each:
1. all-gather the (indices, weights) of the group's tokens: [M·T, L] each, small next to the rows they select;
2. run the bag on this rank's column slice for the other ranks' tokens: [(M-1)·T, D/M];
3. all-to-all: rank r sends token block j to rank j and gets back its own tokens' slice from every other rank;
   meanwhile it bags its own tokens' slice, which needs no transfer. It lays the M slices side by side: [T, D].

Backward runs the mirror image: an all-to-all of the output gradient's column slices, the local bag backward on the
group's tokens, and a sum over the group of the partial weight gradients (each rank saw only its columns), scattered
back to the tokens' owners. The value gradient of a slice sums over the group's tokens; it is divided by M so that,
once averaged over the data-parallel replicas of the slice as every other gradient is, it is the global-batch mean.

Under tensor parallel (`tp` > 1, Memory+ layers), each tp rank scores its slice of the heads (the query projection
and the sub-keys are split by heads). The (indices, weights) of all heads are then gathered over tp, so every tp rank
reads the same full bag, and each keeps the columns of the read-out that its slice of W1/W2 needs. The lookup itself
is thus repeated on the tp ranks: the table's gradient agrees across them with no communication, and the table can
be laid out over `mp` alone. (Splitting the lookup's columns over tp as well would divide its memory traffic by tp;
it is left for when the lookup, not the search, bounds the layer.)

With a row-wise value optimizer the table gets no autograd gradient. The lookups here then record what they read
(rows, weights and the read-out's gradient, for this rank's columns) in a `ReadRecorder`; the optimizer gathers
these records over the slice's replicas (`titanmem.components.value_optimizer`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from torch.distributed.tensor import Shard, distribute_tensor

from titanmem.models.lookup import Lookup


def all_gather_rows(tensor: torch.Tensor, group) -> torch.Tensor:
    """The group's tensors stacked along dim 0, in rank order."""
    out = tensor.new_empty((dist.get_world_size(group) * tensor.shape[0], *tensor.shape[1:]))
    dist.all_gather_into_tensor(out, tensor.contiguous(), group=group)
    return out


def _all_to_all(tensor: torch.Tensor, group) -> torch.Tensor:
    out = torch.empty_like(tensor)
    dist.all_to_all_single(out, tensor.contiguous(), group=group)
    return out


def sum_and_scatter(tensor: torch.Tensor, group) -> torch.Tensor:
    """Sum over the group, keep this rank's block of rows."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if dist.get_backend(group) == "gloo":  # gloo has no reduce-scatter; these weight gradients are small
        total = tensor.contiguous().clone()
        dist.all_reduce(total, group=group)
        return total.chunk(size)[rank].contiguous()
    out = tensor.new_empty((tensor.shape[0] // size, *tensor.shape[1:]))
    dist.reduce_scatter_tensor(out, tensor.contiguous(), group=group)
    return out


class ColumnParallelLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values_slice, indices, weights, group, lookup: Lookup, recorder):
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        tokens = indices.shape[0]
        group_indices = all_gather_rows(indices, group)
        group_weights = all_gather_rows(weights.detach(), group)
        start, stop = rank * tokens, (rank + 1) * tokens
        with torch.no_grad():
            # The other ranks' tokens first: their rows travel while this rank bags its own tokens' slice.
            outgoing = lookup(values_slice, torch.cat([group_indices[:start], group_indices[stop:]]),
                              torch.cat([group_weights[:start], group_weights[stop:]]))  # [(M-1)·T, D/M]
            splits = [0 if peer == rank else tokens for peer in range(size)]
            received = outgoing.new_empty(outgoing.shape)  # this rank's tokens, one column slice per peer
            transfer = dist.all_to_all_single(received, outgoing, splits, splits, group=group, async_op=True)
            mine = lookup(values_slice, group_indices[start:stop], group_weights[start:stop])  # [T, D/M]
            transfer.wait()
        slices = list(received.view(size - 1, tokens, mine.shape[1]).unbind(0))
        slices.insert(rank, mine)
        out = torch.cat(slices, dim=1)  # columns in rank order
        ctx.save_for_backward(values_slice, group_indices, group_weights)
        ctx.group, ctx.lookup, ctx.size, ctx.tokens, ctx.recorder = group, lookup, size, tokens, recorder
        return out

    @staticmethod
    def backward(ctx, grad_out):
        values_slice, group_indices, group_weights = ctx.saved_tensors
        size, tokens = ctx.size, ctx.tokens
        # Column slice j of this rank's output gradient goes to rank j; it gets its columns for every rank's tokens.
        outgoing = grad_out.reshape(tokens, size, -1).permute(1, 0, 2).reshape(size * tokens, -1)
        grad_local = _all_to_all(outgoing, ctx.group)  # [M·T, D/M]
        if ctx.recorder is not None:
            grad_local = ctx.recorder.add(group_indices, group_weights, grad_local)
        with torch.enable_grad():
            values_leaf = values_slice.detach().requires_grad_(ctx.needs_input_grad[0])
            weights_leaf = group_weights.detach().requires_grad_(True)
            local = ctx.lookup(values_leaf, group_indices, weights_leaf)
            inputs = (values_leaf, weights_leaf) if ctx.needs_input_grad[0] else (weights_leaf,)
            grads = torch.autograd.grad(local, inputs, grad_local)
        grad_values = grads[0] / size if ctx.needs_input_grad[0] else None
        # Each rank's weight gradient covers only its columns: sum over the group, back to the tokens' owners.
        grad_weights = sum_and_scatter(grads[-1], ctx.group)
        return grad_values, None, grad_weights, None, None, None


def column_parallel_lookup(values_slice: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, group,
                           lookup: Lookup, recorder=None) -> torch.Tensor:
    """The weighted bag of `indices` over a table whose columns are split over `group`; [T, D] for this rank's T
    tokens. Every rank of the group must pass the same number of tokens. `recorder` (if recording) receives the
    group's reads with this rank's columns of their gradient."""
    return ColumnParallelLookup.apply(values_slice, indices, weights, group, lookup, recorder)


def shard_value_columns(values: torch.nn.Module, mp_mesh) -> None:
    """Make the value table a DTensor whose columns are split over `mp_mesh` (Shard(1)): one global table for
    checkpoints, replicated over the other mesh dims or row-sharded over them by FSDP (`apply_fsdp`)."""
    sharded = distribute_tensor(values.weight.data, mp_mesh, [Shard(1)])
    values.weight = torch.nn.Parameter(sharded, requires_grad=values.weight.requires_grad)
