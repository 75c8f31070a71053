"""Crash points for testing recovery: `TITANMEM_CRASH_AT=<point>:<step>` makes the process SIGKILL itself when it
reaches `<point>` at training step `<step>`, as a node failure would, with no cleanup of any kind. Unset (always, in
real runs), each check is one dictionary lookup.

Points, in the order a step reaches them:
- `step`: the optimizer step is done, nothing of it saved yet;
- `save:written`: a synchronous save has written every file, not yet renamed to `step-N`;
- `save:background`: an asynchronous save has been handed to its background thread and is being written;
- `save:renamed`: `step-N` is complete, older checkpoints not yet purged;
- `resumed`: a relaunch has loaded its checkpoint and not yet trained.

`tools/crash_test.py` and `tests/test_crash.py` use them.

A full disk, for the same purpose: `TITANMEM_DISK_FULL_AFTER=<bytes>` makes this process's checkpoint writes fail with
ENOSPC ("No space left on device") once they have written that many bytes in all, as a filesystem that fills up
mid-save does.
"""

from __future__ import annotations

import errno
import os
import signal
import threading

POINTS = ("step", "save:written", "save:background", "save:renamed", "resumed")

_CRASH_AT = os.environ.get("TITANMEM_CRASH_AT", "")
_DISK_FULL_AFTER = int(os.environ.get("TITANMEM_DISK_FULL_AFTER", "0") or 0)
_written = 0
_written_lock = threading.Lock()  # a save writes its files from several threads


def crash_point(point: str, step: int) -> None:
    """Die here, now, if TITANMEM_CRASH_AT names this point and step."""
    if _CRASH_AT and _CRASH_AT == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


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
