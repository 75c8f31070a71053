"""The memory layers' lookup under the parallel plan, and the recording of what it reads.

Every memory layer's `lookup` is wrapped by `DistributedLookup` (`apply_memory_lookups`), on one process too. It
gathers the heads over tp when the layer is tensor parallel, exchanges over the data-parallel group when the table's
rows and columns are split over it (`titanmem.distributed.row_parallel`), else over the mp group when only its columns
are (`titanmem.distributed.memory_parallel`), and, when a row-wise value optimizer trains the table, records each
read in a `ReadRecorder`: the rows, their weights and, once backward reaches the read-out, its gradient. The
optimizer takes the records at its step (`titanmem.distributed.read_recorder`). The model itself only reads.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard

from titanmem.distributed.memory_parallel import column_parallel_lookup
from titanmem.distributed.read_recorder import ReadRecorder
from titanmem.distributed.row_parallel import grid_lookup
from titanmem.models.lookup import Lookup
from titanmem.models.memory import ProductKeyMemory
from titanmem.utils import local_tensor

__all__ = ["DistributedLookup", "ReadRecorder", "apply_memory_lookups", "is_tensor_parallel"]


def _gather_heads(indices: torch.Tensor, weights: torch.Tensor, tp_mesh) -> tuple[torch.Tensor, torch.Tensor]:
    """Every tp rank's heads side by side: [T, heads·knn]. The lookup after this runs the same on every tp rank, so
    the weights' gradient is replicated too, and its backward keeps this rank's columns."""

    def gather(tensor):
        return DTensor.from_local(tensor, tp_mesh, [Shard(1)], run_check=False).redistribute(
            tp_mesh, [Replicate()]).to_local()

    return gather(indices), gather(weights)


def _own_columns(read: torch.Tensor, tp_mesh) -> torch.Tensor:
    """This tp rank's columns of a read-out that every tp rank computed alike (W1's and W2's slice of v_dim); the
    backward gathers the column gradients back into the full read-out's."""
    return DTensor.from_local(read, tp_mesh, [Replicate()], run_check=False).redistribute(
        tp_mesh, [Shard(1)]).to_local()


class DistributedLookup:
    """A memory layer's lookup under the parallel plan: the bag of all heads (gathered over `tp_mesh` when the layer
    is tensor parallel), over the table's local block (exchanged over `grid_group`, the data-parallel ranks, when
    its rows and columns are split over them; else over `mp_group` when only its columns are), recorded in `recorder`
    when one is given."""

    def __init__(self, local_lookup: Lookup, recorder: ReadRecorder | None = None, mp_group=None, tp_mesh=None,
                 grid_group=None):
        self.local_lookup = local_lookup
        self.recorder = recorder
        self.mp_group = mp_group
        self.tp_mesh = tp_mesh
        self.grid_group = grid_group

    def __call__(self, table: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.recorder is not None and torch.is_grad_enabled() and not weights.requires_grad:
            # Finetuning with the key path frozen: nothing before the read needs a gradient, but the read-out's
            # gradient is what the value optimizer trains from. A leaf that asks for one makes backward reach it.
            weights = weights.detach().requires_grad_()
        if self.tp_mesh is not None:
            indices, weights = _gather_heads(indices, weights, self.tp_mesh)
        local_table = local_tensor(table)
        if self.grid_group is not None:
            read = grid_lookup(table, indices, weights, self.grid_group, self.local_lookup, self.recorder)
        elif self.mp_group is not None:
            read = column_parallel_lookup(local_table, indices, weights, self.mp_group, self.local_lookup,
                                          self.recorder)
        else:
            read = self.local_lookup(local_table, indices, weights)
            if self.recorder is not None:
                read = self.recorder.record_on_backward(indices, weights, read)
        if self.tp_mesh is not None:
            read = _own_columns(read, self.tp_mesh)
        return read


def is_tensor_parallel(layer: ProductKeyMemory) -> bool:
    """Memory+ layers (with W1) are split over tp; the others run whole on every tp rank."""
    return layer.w1 is not None


def apply_memory_lookups(model: torch.nn.Module, recorder: ReadRecorder | None, mp_group=None, tp_mesh=None,
                         grid_group=None) -> None:
    """Route every memory layer's lookup through `DistributedLookup`; only the layers' `lookup` attribute changes."""
    for layer in model.modules():
        if isinstance(layer, ProductKeyMemory):
            layer_tp = tp_mesh if tp_mesh is not None and is_tensor_parallel(layer) else None
            layer.lookup = DistributedLookup(layer.lookup, recorder, mp_group, layer_tp, grid_group)
