"""Row-wise optimizers for the memory value table, fused into sparse updates (DESIGN.md §4).

With `[memory] value_optimizer` set to `sgd`, `adagrad` or `adam`, the table gets no dense gradient and no dense
optimizer state. Each memory-layer call records its (indices, weights) and, during backward, the gradient of its
read-out. At the optimizer step every recorded contribution of the step (all layers, all micro-batches) is merged,
and one fused pass per touched row applies the update in place (`titanmem.kernels.row_update`).

State per optimizer: nothing for SGD, one fp32 accumulator per row for row-wise Adagrad, two moment tables for lazy
Adam (fp32 or bf16). The state is saved in checkpoints with the rest of the training state.
"""

from __future__ import annotations

import math

import torch

from titanmem.models.memory import MemoryValues


class RowWiseValueOptimizer:
    def __init__(
        self,
        values: MemoryValues,
        kind: str,
        lr: float,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        state_dtype: torch.dtype = torch.float32,
    ):
        from titanmem.kernels.row_update import OPTIMIZERS

        if kind not in OPTIMIZERS:
            raise ValueError(f"unknown row-wise optimizer {kind!r}; choose one of {sorted(OPTIMIZERS)}")
        self.values = values
        self.kind = kind
        self.code = OPTIMIZERS[kind]
        self.base_lr = lr
        self.weight_decay = weight_decay
        self.betas = betas
        self.eps = eps
        self.steps = 0
        table = values.weight
        empty = table.new_empty(0, dtype=torch.float32)
        if kind == "adagrad":
            self.first, self.second = torch.zeros(table.shape[0], device=table.device, dtype=torch.float32), empty
        elif kind == "adam":
            self.first = torch.zeros(table.shape, device=table.device, dtype=state_dtype)
            self.second = torch.zeros(table.shape, device=table.device, dtype=state_dtype)
        else:
            self.first, self.second = empty, empty
        self._prepared = None
        # The table is trained here, not by autograd: no layer may ask for its dense gradient.
        table.requires_grad_(False)
        values.start_recording()

    def _merge(self):
        """All contributions recorded since the last step, as one [T_total, L] bag over one gradient table."""
        contributions = self.values.take_recorded()
        if not contributions:
            return None
        indices = torch.cat([c[0] for c in contributions])
        weights = torch.cat([c[1] for c in contributions]).float()
        grad_out = torch.cat([c[2] for c in contributions])
        return indices, weights, grad_out

    def grad_norm(self, deterministic: bool = False) -> torch.Tensor:
        """The table's gradient norm this step (0 when no memory layer ran); also prepares the update."""
        from titanmem.kernels import row_segments
        from titanmem.kernels.row_update import row_grad_sq

        merged = self._merge()
        if merged is None:
            self._prepared = None
            return torch.zeros((), device=self.values.weight.device)
        indices, weights, grad_out = merged
        pair_order, offsets, rows = row_segments(indices, self.values.weight.shape[0])
        row_sq = row_grad_sq(grad_out, weights, pair_order, offsets, deterministic)
        self._prepared = (indices, weights, grad_out, pair_order, offsets, rows, row_sq)
        return row_sq.sum().sqrt()

    def step(self, lr_multiplier: float, clip: float = 1.0) -> None:
        """Apply the prepared update with lr = base lr × multiplier and the gradient scaled by `clip`."""
        from titanmem.kernels.row_update import row_update_

        if self._prepared is None:
            return
        indices, weights, grad_out, pair_order, offsets, rows, row_sq = self._prepared
        self._prepared = None
        self.steps += 1
        row_update_(
            self.values.weight.data, self.first, self.second, grad_out, weights, pair_order, offsets, rows, row_sq,
            self.code, self.base_lr * lr_multiplier, self.weight_decay, clip, self.eps, self.betas[0], self.betas[1],
            self.steps,
        )

    def discard(self) -> None:
        """Drop this step's contributions (a skipped, non-finite step)."""
        self.values.take_recorded()
        self._prepared = None

    def state_dict(self) -> dict:
        # Keyed by the optimizer kind: a checkpoint of another kind then simply lacks these keys (see checkpoint.py).
        return {self.kind: {"first": self.first, "second": self.second, "steps": torch.tensor(self.steps)}}

    def load_state_dict(self, state: dict) -> None:
        state = state[self.kind]
        self.first.copy_(state["first"])
        self.second.copy_(state["second"])
        self.steps = int(state["steps"])


def clip_coefficient(norm: float, max_norm: float) -> float:
    """The factor that scales a gradient of `norm` down to `max_norm` (1 when within it, or when max_norm is 0)."""
    if max_norm <= 0 or not math.isfinite(norm) or norm <= max_norm:
        return 1.0
    return max_norm / (norm + 1e-6)
