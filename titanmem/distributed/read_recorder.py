"""What the memory layers read since the last optimizer step, for a row-wise value optimizer.

A row-wise optimizer trains the value table from each read's rows, weights and read-out gradient, never from a
dense gradient of the table. The read-out's gradient only exists in the backward, so a lookup passes its read-out
through `record_read`, an identity whose backward hands (indices, weights, gradient) to the model's
`ReadRecorder`.

Both are `torch.library` custom ops, opaque to `torch.compile`: the hand-over is a Python side effect, which a
compiled graph may not contain but an opaque op may. Nothing depends on the order of hand-overs, so the compiler is
free to schedule them. What is handed over is a private copy: a compiled graph may reuse the memory of its own
tensors once their last use in it has passed.
"""

from __future__ import annotations

import itertools
import weakref

import torch

Record = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

# Ops take the recorder as an integer (custom ops take tensors and numbers only); a model holds its recorder, so a
# recorder lives as long as a model can call it.
_RECORDERS: weakref.WeakValueDictionary[int, ReadRecorder] = weakref.WeakValueDictionary()
_NEXT_ID = itertools.count()


class ReadRecorder:
    """The reads of the value table since the last optimizer step: (indices [T, L], weights [T, L], gradient of the
    read-out [T, D_local]) per lookup call, over this rank's columns."""

    def __init__(self):
        self._records: list[Record] = []
        self.id = next(_NEXT_ID)
        _RECORDERS[self.id] = self

    def record_on_backward(self, indices: torch.Tensor, weights: torch.Tensor, read: torch.Tensor) -> torch.Tensor:
        """`read`, passed on so that its gradient, when backward reaches it, is recorded with (indices, weights).
        Use the returned tensor in place of `read`."""
        if not read.requires_grad:  # eval, or a no-grad forward: nothing will train on it
            return read
        return record_read(read, indices, weights.detach(), self.id)

    def add(self, indices: torch.Tensor, weights: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """Record a read whose read-out gradient is `grad`, in a backward; returns `grad` (a copy) to pass on."""
        return deliver_read_grad(grad, indices, weights.detach(), self.id)

    def take(self) -> list[Record]:
        records, self._records = self._records, []
        return records


@torch.library.custom_op("titanmem::record_read", mutates_args=())
def record_read(read: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, recorder: int) -> torch.Tensor:
    """An identity on `read` (a copy: custom ops may not return their inputs) whose backward records the read in
    recorder number `recorder`."""
    return read.clone()


@record_read.register_fake
def _(read, indices, weights, recorder):
    return torch.empty_like(read)


@torch.library.custom_op("titanmem::deliver_read_grad", mutates_args=())
def deliver_read_grad(grad: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, recorder: int
                      ) -> torch.Tensor:
    """Record (indices, weights, grad) in recorder number `recorder`, as copies; returns a copy of `grad`."""
    _RECORDERS[recorder]._records.append((indices.clone(), weights.clone(), grad.clone()))
    return grad.clone()


@deliver_read_grad.register_fake
def _(grad, indices, weights, recorder):
    return torch.empty_like(grad)


def _record_setup(ctx, inputs, output):
    _, indices, weights, recorder = inputs
    ctx.save_for_backward(indices, weights)
    ctx.recorder = recorder


def _record_backward(ctx, grad):
    indices, weights = ctx.saved_tensors
    return deliver_read_grad(grad, indices, weights, ctx.recorder), None, None, None


record_read.register_autograd(_record_backward, setup_context=_record_setup)
