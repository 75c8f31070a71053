"""The fused row-wise value update in plain PyTorch, for tables that do not live on a GPU.

Same contract as `titanmem.kernels.row_update` (`row_grad_sq`, `row_update_`: the pairs grouped by row with
`row_segments`, one pass for the rows' squared norms, one for the update), computed with tensor ops instead of a
program per touched row. On a CPU the Triton kernels run under Triton's interpreter, whose cost is per program and
per operation: a step of a small model spends most of its time there. These ops give the same update in fp32, with
each row's gradient summed over its pairs in their order (`index_add_` on the CPU adds in index order), so a
run's result does not depend on how its batch was split over ranks.

Each row-wise optimizer's own arithmetic is its rule (`sgd_rows`, `adagrad_rows`, `adam_rows`): the implementation its
entry of `titanmem.registry.VALUE_OPTIMIZERS` names, found by the entry's update code. A new row-wise optimizer
needs only a rule here to run; a branch of the Triton update makes it fast on GPUs.

A bf16 table is rounded to nearest here. Stochastic rounding draws Triton's Philox bits, so those tables keep the
Triton kernels on every device (`uses_torch_update`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from titanmem.registry import VALUE_OPTIMIZERS

# Pairs per chunk: bounds the [pairs, D] fp32 temporary of the gathered gradients.
_CHUNK_PAIRS = 1 << 15


def uses_torch_update(table: torch.Tensor, stochastic_rounding: bool) -> bool:
    """Whether a table is updated by these ops rather than by the Triton kernels."""
    return table.device.type != "cuda" and not (stochastic_rounding and table.dtype == torch.bfloat16)


def row_grads(grad_out: torch.Tensor, weights: torch.Tensor, pair_order: torch.Tensor, offsets: torch.Tensor
              ) -> torch.Tensor:
    """[U, D] fp32: each touched row's Σ w · grad_out[t] over its pairs, in the order `pair_order` lists them."""
    segments, dim = offsets.numel() - 1, grad_out.shape[1]
    grads = torch.zeros(segments, dim, device=grad_out.device, dtype=torch.float32)
    if segments == 0:
        return grads
    owner = torch.repeat_interleave(torch.arange(segments, device=grad_out.device), offsets.diff())
    flat_weights = weights.reshape(-1)
    slots = weights.shape[1]
    for start in range(0, pair_order.numel(), _CHUNK_PAIRS):
        pairs = pair_order[start:start + _CHUNK_PAIRS].long()
        terms = grad_out[pairs // slots].float() * flat_weights[pairs].float()[:, None]
        grads.index_add_(0, owner[start:start + _CHUNK_PAIRS], terms)
    return grads


def heavy_rows(grad_out, weights, pair_order, offsets, chunks=None) -> tuple[None, None]:
    """No row is summed apart here: `row_grads` adds every pair in one `index_add_`, a hot row's too."""
    return None, None


def row_grad_sq(grad_out, weights, pair_order, offsets, deterministic: bool = True, selected=None, heavy_slots=None,
                heavy_grads=None) -> torch.Tensor:
    """`titanmem.kernels.row_update.row_grad_sq` in tensor ops (always deterministic)."""
    squares = (row_grads(grad_out, weights, pair_order, offsets) ** 2).sum(1)
    return squares * selected if selected is not None else squares


def row_update_(values, first, second, grad_out, weights, pair_order, offsets, rows, row_sq, optimizer: int,
                lr: float, weight_decay: float, eps: float, beta1: float, beta2: float, scalars: torch.Tensor,
                seed=None, selected=None, row_base: int = 0, col_base: int = 0, heavy_slots=None,
                heavy_grads=None) -> None:
    """`titanmem.kernels.row_update.row_update_` in tensor ops, for fp32 tables and bf16 tables rounded to nearest
    (no `seed`); `row_base` and `col_base` only place the stochastic draws, which these ops do not make."""
    # The kernels' checks of the table's dtype, rounding and scalars (imports Triton).
    from titanmem.kernels.row_update import _check_scalars, _rounding

    if _rounding(values.dtype, seed is not None) == 2:
        raise ValueError("stochastic rounding of a bf16 table needs the Triton update (titanmem.kernels.row_update)")
    _check_scalars(scalars, seed)
    # Off the GPU, reading the decision costs no wait.
    if rows.numel() == 0 or scalars[1] == 0:
        return
    clip = scalars[0]
    grad = row_grads(grad_out, weights, pair_order, offsets) * clip
    rows = rows.long()
    if selected is not None:
        # A row left out keeps its value and its state bit for bit.
        keep = selected.to(torch.bool)
        rows, grad, row_sq = rows[keep], grad[keep], row_sq[keep]
    value = values[rows].float() * (1.0 - lr * weight_decay)
    step = RowStep(rows, grad, row_sq, scalars, values.shape[1], lr, eps, beta1, beta2)
    value = row_rule(optimizer)(value, first, second, step)
    values[rows] = value.to(values.dtype)


@dataclass(frozen=True)
class RowStep:
    """What a row-wise optimizer's rule gets for one step's touched rows (its state is passed whole beside it)."""

    rows: torch.Tensor
    """[U] int64: the table rows the step updates, distinct."""
    grad: torch.Tensor
    """[U, D] fp32: each row's summed gradient, clipped."""
    row_sq: torch.Tensor
    """[U] fp32: each row's squared gradient norm before clipping (of the whole row, under memory parallel too)."""
    scalars: torch.Tensor
    """The step's `step_scalars`: clip factor, apply flag, Adam's bias corrections."""
    width: int
    """Columns of the table held here."""
    lr: float
    eps: float
    beta1: float
    beta2: float


RowRule = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, RowStep], torch.Tensor]
"""`rule(value, first, second, step) -> value`: the touched rows' new fp32 values from their values after weight decay
([U, D] fp32), updating the rule's state tensors `first` and `second` in place at `step.rows`."""


def row_rule(code: int) -> RowRule:
    """The rule of the row-wise optimizer whose registry entry has update code `code`."""
    for entry in VALUE_OPTIMIZERS.entries:
        if entry.rowwise and entry.update_code == code:
            return VALUE_OPTIMIZERS.load(entry.name)
    raise ValueError(f"unknown row-wise optimizer code {code}")


def sgd_rows(value: torch.Tensor, first: torch.Tensor, second: torch.Tensor, step: RowStep) -> torch.Tensor:
    """Plain SGD; no state."""
    return value - step.lr * step.grad


def adagrad_rows(value: torch.Tensor, first: torch.Tensor, second: torch.Tensor, step: RowStep) -> torch.Tensor:
    """Row-wise Adagrad: `first` [N] fp32, one accumulator per row, grows by the row's mean squared clipped gradient."""
    from titanmem.kernels.row_update import adagrad_increment

    first[step.rows] += adagrad_increment(step.row_sq, step.scalars, step.width)
    return value - step.lr * step.grad / (first[step.rows].sqrt() + step.eps)[:, None]


def adam_rows(value: torch.Tensor, first: torch.Tensor, second: torch.Tensor, step: RowStep) -> torch.Tensor:
    """Lazy Adam: `first` and `second` [N, D] moments (fp32 or bf16) of the touched rows only, bias-corrected by the
    count of applied steps."""
    rows, grad = step.rows, step.grad
    bias_correction1, bias_correction2 = step.scalars[2], step.scalars[3]
    moment = step.beta1 * first[rows].float() + (1.0 - step.beta1) * grad
    square = step.beta2 * second[rows].float() + (1.0 - step.beta2) * grad * grad
    first[rows] = moment.to(first.dtype)
    second[rows] = square.to(second.dtype)
    return value - step.lr * (moment / bias_correction1) / ((square / bias_correction2).sqrt() + step.eps)
