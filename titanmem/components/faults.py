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
"""

from __future__ import annotations

import os
import signal

POINTS = ("step", "save:written", "save:background", "save:renamed", "resumed")

_CRASH_AT = os.environ.get("TITANMEM_CRASH_AT", "")


def crash_point(point: str, step: int) -> None:
    """Die here, now, if TITANMEM_CRASH_AT names this point and step."""
    if _CRASH_AT and _CRASH_AT == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
