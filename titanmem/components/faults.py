"""Fault points for testing recovery. Unset (always, in real runs), each check is one dictionary lookup.

- `TITANMEM_CRASH_AT=<point>:<step>` makes the process SIGKILL itself when it reaches `<point>` at training step
  `<step>`, as a node failure would, with no cleanup of any kind.
- `TITANMEM_STOP_AT=<point>:<step>` makes it SIGSTOP itself there instead: the process stays, frozen, as one whose
  node stopped answering; the others must notice (`comm.train_timeout_seconds`) and end the run.
- `TITANMEM_HANG_AT=<point>:<step>` makes its main thread sleep for good there, as a loader stuck on a dead mount or
  a deadlock does: its other threads (the watchdog's) go on.
- `TITANMEM_FAULT_RANK=<r>` limits these three to global rank r (default: every rank, as a node that loses power
  takes all its ranks).
- `TITANMEM_DISK_FULL_AFTER=<bytes>` makes this process's checkpoint writes fail with ENOSPC ("No space left on
  device") once they have written that many bytes in all, as a filesystem that fills up mid-save does.

A relaunch by torchrun itself (`--max-restarts`, TORCHELASTIC_RESTART_COUNT > 0) meets none of them: the fault
happened once, and the restart is what is being tested.

Points, in the order a step reaches them:
- `batch`: the step is about to read its batch (before any of its work);
- `step`: the optimizer step is done, nothing of it saved yet;
- `save:written`: a synchronous save has written every file, not yet renamed to `step-N`;
- `save:background`: an asynchronous save has been handed to its background thread and is being written;
- `save:renamed`: `step-N` is complete, older checkpoints not yet purged;
- `resumed`: a relaunch has loaded its checkpoint and not yet trained.

`tools/drills/crash_test.py`, `tests/test_crash.py` and `tests/test_comm_faults.py` use them.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
import time

POINTS = ("batch", "step", "save:written", "save:background", "save:renamed", "resumed")


def _fault_at(name: str) -> str:
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") not in ("", "0"):
        return ""
    only = os.environ.get("TITANMEM_FAULT_RANK", "")
    if only and only != os.environ.get("RANK", "0"):
        return ""
    return os.environ.get(name, "")


_CRASH_AT = _fault_at("TITANMEM_CRASH_AT")
_STOP_AT = _fault_at("TITANMEM_STOP_AT")
_HANG_AT = _fault_at("TITANMEM_HANG_AT")
_DISK_FULL_AFTER = int(os.environ.get("TITANMEM_DISK_FULL_AFTER", "0") or 0)
_written = 0
_written_lock = threading.Lock()  # a save writes its files from several threads


def crash_point(point: str, step: int) -> None:
    """Die, stop or hang here, now, if TITANMEM_CRASH_AT, TITANMEM_STOP_AT or TITANMEM_HANG_AT names this point and
    step."""
    if not (_CRASH_AT or _STOP_AT or _HANG_AT):
        return
    here = f"{point}:{step}"
    if _CRASH_AT == here:
        os.kill(os.getpid(), signal.SIGKILL)
    if _STOP_AT == here:
        os.kill(os.getpid(), signal.SIGSTOP)
    if _HANG_AT == here:
        while True:
            time.sleep(3600)


def disk_write_point(nbytes: int) -> None:
    """Fail as a full disk would, before writing `nbytes` more of a checkpoint, if TITANMEM_DISK_FULL_AFTER is set and
    this process's checkpoint writes would pass it."""
    global _written
    if not _DISK_FULL_AFTER:
        return
    with _written_lock:
        if _written + nbytes > _DISK_FULL_AFTER:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        _written += nbytes
