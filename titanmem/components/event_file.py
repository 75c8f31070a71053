"""A TensorBoard event file written in the caller's thread.

torch's SummaryWriter hands each event to a thread of its own, which writes it later. When that write fails (a full
disk, a folder that went read-only or away), the thread prints a traceback and dies, and the next call in the training
loop raises the same error again, ending the run with a second traceback. Written here, in the thread that logs, a
write error reaches the caller once, as an OSError it can report in one line; the file format (TFRecord framing of
`Event` protos, `events.out.tfevents.<time>.<host>.<pid>.<n>`) is TensorBoard's own, read by its usual tools.
"""

from __future__ import annotations

import itertools
import os
import socket
import time

import torch
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.summary.writer.record_writer import RecordWriter
from torch.utils.tensorboard.summary import histogram, scalar


def _default_bins() -> list[float]:
    """TensorBoard's histogram edges: ±1e-12 growing by 10% to ±1e20, and 0 (what SummaryWriter uses by default)."""
    edges, edge = [], 1e-12
    while edge < 1e20:
        edges.append(edge)
        edge *= 1.1
    return [-e for e in reversed(edges)] + [0.0] + edges


_BINS = _default_bins()
_FILE_NUMBERS = itertools.count()


class EventFile:
    """One event file in `folder` (made if missing). Every method may raise OSError: the caller decides what a failed
    write means."""

    def __init__(self, folder: str):
        os.makedirs(folder, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{next(_FILE_NUMBERS)}"
        self.path = os.path.join(folder, name)
        self._records = RecordWriter(open(self.path, "wb"))
        self._write(Event(wall_time=time.time(), file_version="brain.Event:2"))
        self.flush()

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self._write(Event(wall_time=time.time(), step=step, summary=scalar(tag, float(value))))

    def add_histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        self._write(Event(wall_time=time.time(), step=step, summary=histogram(tag, values, _BINS)))

    def flush(self) -> None:
        self._records.flush()

    def close(self) -> None:
        if not self._records.closed:
            self._records.close()

    def _write(self, event: Event) -> None:
        self._records.write(event.SerializeToString())
