"""Small helpers every layer may use; this module imports nothing else of titanmem."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="[titanmem] %(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", force=True
    )


def print_error(error: object) -> None:
    """Print the one line that ends a command, `error: ...`, and under torchrun leave it in the rank's error file."""
    print(f"error: {error}", file=sys.stderr, flush=True)
    leave_in_error_file(str(error))


def leave_in_error_file(line: str) -> None:
    """Under torchrun, leave the line that ends this rank in its error file: torchrun's summary of a failed job (and
    `python -m titanmem.launch`'s last line) shows it, though the console shows only one rank's output."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        # torchrun's format: it shows `py_callstack` as the failure's traceback, and sets `errorCode` itself.
        record = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}
        with contextlib.suppress(OSError):
            Path(error_file).write_text(json.dumps(record))


_PACKAGE_FOLDER = os.path.dirname(os.path.abspath(__file__)) + os.sep  # as the frames of its modules name it
_NOT_PERMITTED = "this user may not use that path: fix its permissions or choose another"
_STORAGE_FIXES = {
    errno.ENOSPC: "free space on that filesystem",
    errno.EDQUOT: "free space within your quota there, or raise it",
    errno.EROFS: "that filesystem is mounted read-only: point the run at a writable one",
    errno.EACCES: _NOT_PERMITTED,
    errno.EPERM: _NOT_PERMITTED,
    errno.EIO: "the disk (or network filesystem) under it failed: check it",
}


def storage_failure(error: BaseException, folder: str | Path | None = None) -> str | None:
    """What a file operation that failed for space, permission or a failing disk was doing, and the fix, for the line
    that ends a command; None for any other error, which stays a traceback (a bug to report). `folder` names where
    the command writes, for an error that does not name its file (a failed write to an open one)."""
    if not isinstance(error, OSError) or error.errno not in _STORAGE_FIXES:
        return None
    tb, where = error.__traceback__, None
    while tb is not None:  # the innermost frame of titanmem's own code: the write a reader can look up
        if tb.tb_frame.f_code.co_filename.startswith(_PACKAGE_FOLDER):
            code = tb.tb_frame.f_code
            where = f"{code.co_name} ({Path(code.co_filename).name}:{tb.tb_lineno})"
        tb = tb.tb_next
    subject = f"{error.filename or folder}: " if error.filename or folder else ""
    doing = f" in {where}" if where else ""
    return f"{subject}{error.strerror or error}{doing}; {_STORAGE_FIXES[error.errno]}"


def exit_with(code: int):
    """Leave the process with `code`, the exit status of a command whose main has returned. A process that joined a
    gloo process group can abort (SIGABRT) in the interpreter's teardown after a complete run: a worker thread of
    gloo's drops tensors once Python is gone. torchrun then reports a finished run as failed, and Slurm may requeue
    it. So a process launched as a rank of several (WORLD_SIZE > 1) skips the teardown, once its streams are flushed;
    main has already closed its files, checkpoints, lock and process group."""
    if os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1"):
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)
    sys.exit(code)


def print_output(text: str) -> None:
    """Print `text` on stdout; a reader that stops early (`--help | head`) ends the output quietly, not with a
    traceback."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # Python would fail again flushing stdout at exit: send what is left to /dev/null instead.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def give_plain_file_mode(path) -> None:
    """Give the new file at `path` the permission bits that a plain `open()` gives a new file beside it: those the
    umask or the folder's default ACL allow, read off a probe file created there. Writers that go through a private
    temporary file (safetensors' `save_file`: 0600) would otherwise leave it unreadable to the others they let in,
    such as the group on a shared cluster folder."""
    path = Path(path)
    probe = path.with_name(f".{path.name}.mode-probe-{os.getpid()}")
    try:
        handle = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        try:
            mode = stat.S_IMODE(os.fstat(handle).st_mode)
        finally:
            os.close(handle)
            os.unlink(probe)
        os.chmod(path, mode)
    except OSError as error:  # a file system without modes, say: the file is written all the same
        logging.getLogger(__name__).warning("could not give %s the folder's file mode (%s)", path, error)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (a sharded parameter, gradient or state); a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def block_offset(tensor: torch.Tensor) -> tuple[int, ...]:
    """Where this rank's part of a DTensor starts in the whole tensor, per dim (all 0 for a plain tensor)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(tensor, DTensor):
        return (0,) * tensor.ndim
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return tuple(offset)


def autocast(device: torch.device, dtype: torch.dtype | None):
    """The autocast context for `dtype` on `device`, or no autocast for None (plain fp32)."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


PhaseTimer = Callable[[str], contextlib.AbstractContextManager]
"""Times one named phase of a training step, `with timer("forward"): ...`: the trainer's `phase_timer` hook."""

_UNTIMED = contextlib.nullcontext()


def timed_phase(timer: PhaseTimer | None, phase: str) -> contextlib.AbstractContextManager:
    """`timer(phase)`, or, with no timer set, a context that does nothing (one shared object: nothing allocated)."""
    return _UNTIMED if timer is None else timer(phase)
