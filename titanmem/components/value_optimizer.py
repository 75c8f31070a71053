"""Row-wise optimizers for the memory value table, fused into sparse updates.

With `[memory] value_optimizer` set to `sgd`, `adagrad` or `adam`, the table gets no dense gradient and no dense
optimizer state. Each memory-layer read is recorded (`titanmem.distributed.lookup.ReadRecorder`): its (indices,
weights) and, during backward, the gradient of its read-out. At the optimizer step every recorded contribution of the
step (all layers, all micro-batches) is merged, and one fused pass per touched row applies the update in place
(`titanmem.kernels.row_update`).

Each optimizer's state is what its registry entry (`titanmem.registry.VALUE_OPTIMIZERS`) states: nothing for SGD, one
fp32 accumulator per row for row-wise Adagrad, two moment tables for lazy Adam (fp32 or bf16). The state is saved in
checkpoints with the rest of the training state.

On several processes each rank trains its own block of the table: its columns under memory parallel (else the whole
width), and either every row (`value_slice_sharding = "replicate"`) or its block of rows ("rows"). A replicated slice
gathers the step's records over its replicas, so that every one of them applies the same update of the global-batch
gradient. A rows-sharded block already received the reads of its rows from every rank (the lookup exchanges them,
`titanmem.distributed.row_parallel`): it updates its rows alone, and the norm sums its rows' part over the blocks.
Either way the per-row squared norms are summed over the ranks that hold the other columns of the same rows (the mp
group), so that Adagrad's row statistic and the clipping norm are those of whole rows.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard

from titanmem.components.row_update_torch import uses_torch_update
from titanmem.distributed.lookup import ReadRecorder
from titanmem.distributed.memory_parallel import all_gather_rows
from titanmem.models.memory import MemoryValues
from titanmem.registry import VALUE_OPTIMIZERS
from titanmem.utils import block_offset, local_tensor


class RowWiseValueOptimizer:
    def __init__(
        self,
        values: MemoryValues,
        recorder: ReadRecorder,
        kind: str,
        lr: float,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        state_dtype: torch.dtype = torch.float32,
        replica_group=None,
        slice_group=None,
        data_parallel_size: int = 1,
        rounding_seed: int | None = None,
        rows_group=None,
    ):
        """`replica_group`: the ranks that hold the same slice whole, over which the reads are gathered (replicate);
        `rows_group`: the ranks that hold the other row blocks of the same columns (rows); `slice_group`: those that
        hold the other columns of the same rows (mp)."""
        spec = VALUE_OPTIMIZERS.get(kind)
        if not spec.rowwise:
            rowwise = [entry.name for entry in VALUE_OPTIMIZERS.entries if entry.rowwise]
            raise ValueError(f"{kind!r} is no row-wise value optimizer; choose one of {rowwise}")
        self.values = values
        self.recorder = recorder
        self.kind = kind
        self.code = spec.update_code
        self.base_lr = lr
        self.weight_decay = weight_decay
        self.betas = betas
        self.eps = eps
        table = self._local_table()
        # Applied updates so far, on the device: a step is applied or skipped there (`step`'s `apply`), and Adam's bias
        # correction and the rounding draws follow this count without the host reading it.
        self.steps = torch.zeros((), dtype=torch.int64, device=table.device)
        self.replica_group = replica_group
        self.slice_group = slice_group
        self.rows_group = rows_group
        # Each rank's records carry the gradient of its own mean loss; the global loss is their mean.
        self.grad_scale = 1.0 / data_parallel_size
        self.full_width = values.weight.shape[1]
        # Where this rank's block lies in the whole table: the row selection and the rounding go by whole-table places.
        self.row_base, self.col_base = block_offset(values.weight)
        # A block of rows receives the reads of other blocks as -1 (read nothing).
        self.rows_sharded = isinstance(values.weight, DTensor) and any(
            isinstance(p, Shard) and p.dim == 0 for p in values.weight.placements)
        # A bf16 table's updated rows are rounded stochastically, seeded by (this seed, step, row); None: to nearest.
        self.rounding_seed = rounding_seed if table.dtype == torch.bfloat16 else None
        # The fused passes: Triton kernels on a GPU (and wherever Philox bits are drawn), tensor ops elsewhere and for
        # an optimizer the Triton update has no branch for. The kernels sum a hot row's pairs in chunks, found with the
        # grouping (`row_groups`); the tensor ops do not.
        if uses_torch_update(table, self.rounding_seed is not None) or not spec.triton_update:
            from titanmem.components import row_update_torch as passes
            self._heavy_pairs = None
        else:
            from titanmem.kernels import row_update as passes
            self._heavy_pairs = passes.heavy_threshold(table.shape[1])
        self._row_grad_sq, self._row_update_, self._heavy_rows = passes.row_grad_sq, passes.row_update_, passes.heavy_rows
        # The state tensors the entry states, per row (fp32) or per element (`state_dtype`); unused slots empty.
        shapes = {"row": (table.shape[0], torch.float32), "element": (table.shape, state_dtype)}
        state = [torch.zeros(shapes[per][0], device=table.device, dtype=shapes[per][1]) for per in spec.state]
        empty = table.new_empty(0, dtype=torch.float32)
        self.first, self.second = (state + [empty, empty])[:2]
        self._prepared = None
        # Sparse memory finetuning (`titanmem.components.row_selection.RowSelector`): which of a step's touched rows
        # train, as a flag per touched row; None trains them all.
        self.row_selector = None
        # The table is trained here, not by autograd: no layer may ask for its dense gradient.
        values.weight.requires_grad_(False)

    def _local_table(self) -> torch.Tensor:
        return local_tensor(self.values.weight)

    def _merge(self):
        """All contributions recorded since the last step, on every replica of this slice, as one [T_total, L] bag
        over one gradient table (weights scaled to the global-batch mean)."""
        contributions = self.recorder.take()
        if not contributions:
            return None
        merged = [torch.cat([c[i] for c in contributions]) for i in range(3)]
        if self.replica_group is not None:
            merged = [all_gather_rows(t, self.replica_group) for t in merged]
        indices, weights, grad_out = merged
        return indices, weights.float() * self.grad_scale, grad_out

    def grad_norm(self, deterministic: bool = False) -> torch.Tensor:
        """The table's gradient norm this step (0 when no memory layer ran); also prepares the update."""
        from titanmem.kernels.row_update import row_groups

        table = self._local_table()
        merged = self._merge()
        if merged is None:
            self._prepared = None
            return torch.zeros((), device=table.device)
        indices, weights, grad_out = merged
        # Every size the step's passes depend on is read from the device here, once.
        pair_order, offsets, rows, chunks = row_groups(indices, table.shape[0], self.rows_sharded, self._heavy_pairs)
        # Every replica and every rank of the slice group ranks the same merged reads alike: they select the same rows
        # (row blocks rank theirs against the others', `RowSelector`).
        selected = (self.row_selector(rows.long() + self.row_base, offsets, self.rows_group)
                    if self.row_selector is not None else None)
        # Summed once for both passes.
        heavy = self._heavy_rows(grad_out, weights, pair_order, offsets, chunks)
        row_sq = self._row_grad_sq(grad_out, weights, pair_order, offsets, deterministic, selected, *heavy)
        if self.slice_group is not None:
            # Every rank of the group grouped the same rows in the same order: sum their column parts.
            dist.all_reduce(row_sq, group=self.slice_group)
        # The update kernel averages the row statistic over the table's local width; make that the whole row's mean.
        local_row_sq = row_sq * (table.shape[1] / self.full_width)
        self._prepared = (indices, weights, grad_out, pair_order, offsets, rows, local_row_sq, selected, heavy)
        squared_norm = row_sq.sum()
        if self.rows_group is not None:
            dist.all_reduce(squared_norm, group=self.rows_group)
        return squared_norm.sqrt()

    def step(self, lr_multiplier: float, clip: torch.Tensor | float = 1.0, apply: torch.Tensor | bool = True
             ) -> None:
        """Apply the prepared update with lr = base lr × multiplier and the gradient scaled by `clip`, where `apply`
        holds. Both may be 0-d device tensors (`clip_coefficient`, and the device's own finite check): then nothing
        here waits for the device, and a step it decides to skip changes no value, state or step count."""
        if self._prepared is None:
            return
        from titanmem.kernels.row_update import step_scalars

        indices, weights, grad_out, pair_order, offsets, rows, row_sq, selected, heavy = self._prepared
        self._prepared = None
        device = self.steps.device
        apply = torch.as_tensor(apply, device=device)
        self.steps += apply.to(torch.int64)
        scalars = step_scalars(clip, self.steps, self.betas[0], self.betas[1], apply)
        seed = rounding_seeds(self.rounding_seed, self.steps) if self.rounding_seed is not None else None
        self._row_update_(
            self._local_table().data, self.first, self.second, grad_out, weights, pair_order, offsets, rows, row_sq,
            self.code, self.base_lr * lr_multiplier, self.weight_decay, self.eps, self.betas[0], self.betas[1],
            scalars, seed, selected, self.row_base, self.col_base, *heavy,
        )

    def discard(self) -> None:
        """Drop this step's contributions (a skipped, non-finite step)."""
        self.recorder.take()
        self._prepared = None

    def state_dict(self) -> dict:
        # Keyed by the optimizer kind: a checkpoint of another kind then simply lacks these keys (see checkpoint.py).
        return {self.kind: {"first": self._as_table(self.first), "second": self._as_table(self.second),
                            "steps": self.steps}}

    def _as_table(self, state: torch.Tensor) -> torch.Tensor:
        """Per-element state is saved as a global DTensor laid out like the table. Per-row state is the same on every
        rank of a replicated slice (a plain tensor); a rows-sharded table's is split like its rows."""
        table = self.values.weight
        if isinstance(table, DTensor) and state.ndim == 2:
            return DTensor.from_local(state, table.device_mesh, table.placements, run_check=False,
                                      shape=table.shape, stride=table.stride())
        if self.rows_sharded and state.ndim == 1 and state.numel():
            placements = [Shard(0) if p == Shard(0) else Replicate() for p in table.placements]
            return DTensor.from_local(state, table.device_mesh, placements, run_check=False,
                                      shape=table.shape[:1], stride=(1,))
        return state

    def load_state_dict(self, state: dict) -> None:
        state = state.get(self.kind)
        if not state:  # saved by another kind of value optimizer: this one starts fresh
            return
        for name in ("first", "second"):
            getattr(self, name).copy_(local_tensor(state[name]))
        self.steps.copy_(torch.as_tensor(state["steps"]).reshape(()))


def rounding_seed(seed: int | None, step: int) -> int:
    """The stochastic-rounding seed of one step (-1: round to nearest): a 31-bit mix of the run's seed and the step,
    so that a resumed run draws the same bits."""
    if seed is None:
        return -1
    mixed = (seed * 0x9E3779B1 + step * 0x85EBCA77) & _MASK64
    mixed ^= mixed >> 29
    return (mixed * 0xBF58476D1CE4E5B9 >> 33) & 0x7FFFFFFF


_MASK64 = (1 << 64) - 1


def rounding_seeds(seed: int, steps: torch.Tensor) -> torch.Tensor:
    """`rounding_seed(seed, step)` for an int64 tensor of steps, on its device (int64, same shape): the same 64-bit
    arithmetic, done in two's complement (products and sums wrap, shifts are made logical)."""

    def signed(constant: int) -> int:
        constant &= _MASK64
        return constant - (1 << 64) if constant >> 63 else constant

    def shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
        return (x >> bits) & ((1 << (64 - bits)) - 1)

    mixed = steps.to(torch.int64) * 0x85EBCA77 + signed(seed * 0x9E3779B1)
    mixed = mixed ^ shift_right(mixed, 29)
    return shift_right(mixed * signed(0xBF58476D1CE4E5B9), 33) & 0x7FFFFFFF


def clip_coefficient(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """The factor (0-d, on the norm's device) that scales a gradient of `norm` down to `max_norm`: 1 when within it,
    when max_norm is 0, or when the norm is not finite (that step is skipped anyway). Taken in fp64, as a host
    computation would."""
    norm = norm.double()
    if max_norm <= 0:
        return torch.ones_like(norm)
    return torch.where(norm.isfinite() & (norm > max_norm), max_norm / (norm + 1e-6), 1.0)
