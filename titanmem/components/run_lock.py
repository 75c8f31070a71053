"""One training run per dump folder: `<job.dump_folder>/.titanmem.lock` names the process that trains in it.

A second run on the folder refuses to start and says who holds it. A lock whose holder is gone is taken over with a
warning, so that a relaunch after a crash needs no manual cleanup. The holder is known to be gone when it ran on this
host and its process no longer exists (or its pid now belongs to another process), or, from any host, when it has
not refreshed the lock for `STALE_AFTER_SECONDS`: a background thread of the holder touches the file every
`HEARTBEAT_SECONDS`, so a job killed on one node and requeued on another takes its folder back after a few minutes,
or at once when both attempts carry the same job id (`TITANMEM_RUN_ID`).

Only rank 0 takes the lock; `acquire_run_lock` tells every rank the outcome, so that all refuse together.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch.distributed as dist

from titanmem.config.errors import ConfigError

logger = logging.getLogger(__name__)

LOCK_NAME = ".titanmem.lock"
HEARTBEAT_SECONDS = 30.0
STALE_AFTER_SECONDS = 300.0
# A lock file younger than this may still be being written by its creator: unreadable is not yet stale.
_WRITE_GRACE_SECONDS = 10.0


def process_start_time(pid: int) -> int | None:
    """The start time of process `pid` in clock ticks since boot (Linux), to tell a reused pid from its first owner;
    None where /proc does not say."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces; the start time is field 22.
    return int(stat.rsplit(")", 1)[1].split()[19])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: it exists
    return True


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    process_start: int | None
    user: str
    since: str
    command: str
    run_id: str = ""
    """The job's id (`TITANMEM_RUN_ID`, set by launch/run_multinode.sh from RDZV_ID, e.g. the Slurm job id): a
    relaunch of the same job on another node need not wait for the heartbeat to go stale."""

    @staticmethod
    def me() -> Holder:
        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = str(os.getuid())
        return Holder(host=socket.gethostname(), pid=os.getpid(), process_start=process_start_time(os.getpid()),
                      user=user, since=time.strftime("%Y-%m-%d %H:%M:%S %Z"), command=" ".join(sys.argv)[:300],
                      run_id=os.environ.get("TITANMEM_RUN_ID", ""))

    def same_process(self, other: Holder) -> bool:
        return (self.host, self.pid, self.process_start) == (other.host, other.pid, other.process_start)

    def describe(self) -> str:
        return f"process {self.pid} of {self.user} on {self.host}, since {self.since} ({self.command})"


class RunLock:
    """The lock of one dump folder, held by this process from `acquire` to `release`."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.me = Holder.me()
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lock, taking over a stale one with a warning; raise a config error naming the holder of a live
        one."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError("job.dump_folder", f"cannot create {self.folder} ({e.strerror}); choose a folder you "
                              "can write") from None
        if self.path.exists() and not self.path.is_file():
            raise ConfigError("job.dump_folder", f"{self.path} is not a lock file; remove it")
        for _ in range(5):
            if self._create():
                self._start_heartbeat()
                return
            holder, raw, age = self._read()
            if holder is not None and holder.same_process(self.me):
                self._start_heartbeat()  # this process already trains here (an earlier Trainer, not yet closed)
                return
            reason = self._stale_reason(holder, age)
            if reason is None:
                who = holder.describe() if holder is not None else "a run that is still writing its lock"
                raise ConfigError("job.dump_folder", f"{self.folder} is in use by {who}; stop that run or train in "
                                  f"another folder (a lock whose holder is gone is taken over after "
                                  f"{STALE_AFTER_SECONDS:.0f} s without heartbeat; {self.path} holds it)")
            if self._set_aside(raw):
                what = holder.describe() if holder is not None else "an unreadable lock"
                logger.warning("took over the lock of %s on %s: %s", self.folder, what, reason)
        raise ConfigError("job.dump_folder", f"could not take {self.path}: other runs keep taking it; start one run "
                          "per folder")

    def release(self) -> None:
        """Give the lock back, if it is still this process's."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
            self._heartbeat = None
        holder, _, _ = self._read()
        if holder is not None and holder.same_process(self.me):
            self.path.unlink(missing_ok=True)

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as e:
            raise self._unwritable(e) from None
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(asdict(self.me), handle)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as e:  # a full disk: no lock is left behind for the next run to find unreadable
            self.path.unlink(missing_ok=True)
            raise self._unwritable(e) from None
        return True

    def _unwritable(self, error: OSError) -> ConfigError:
        return ConfigError("job.dump_folder", f"cannot write {self.path} ({error.strerror}); training needs a folder "
                           "it can write")

    def _read(self) -> tuple[Holder | None, bytes | None, float]:
        """The lock's holder (None if unreadable), its bytes, and seconds since it was last touched."""
        try:
            raw = self.path.read_bytes()
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None, None, 0.0
        except OSError:
            return None, None, 0.0  # unreadable for now (a permission, a flaky file system): not stale
        try:
            return Holder(**json.loads(raw)), raw, age
        except (ValueError, TypeError):
            return None, raw, age

    def _stale_reason(self, holder: Holder | None, age: float) -> str | None:
        """Why the lock's holder is gone, or None while it may be alive. On this host the process table decides (a
        stopped process is alive, however old its heartbeat); from another host, the job id or the heartbeat."""
        if holder is None:
            if age > STALE_AFTER_SECONDS:
                return f"the lock file is unreadable and untouched for {age:.0f} s"
            return None if age < _WRITE_GRACE_SECONDS else "the lock file is unreadable"
        if holder.host == self.me.host:
            if not _alive(holder.pid):
                return f"its process {holder.pid} is gone"
            if holder.process_start is not None and process_start_time(holder.pid) != holder.process_start:
                return f"its process {holder.pid} is gone (the pid now belongs to another process)"
            return None
        if holder.run_id and holder.run_id == self.me.run_id:
            return f"it is an earlier attempt of this job (run id {holder.run_id}) on another node"
        if age > STALE_AFTER_SECONDS:
            return f"it has not refreshed the lock for {age:.0f} s"
        return None

    def _set_aside(self, raw: bytes | None) -> bool:
        """Remove the stale lock whose bytes are `raw`; False (and nothing removed) if another run took it over first."""
        aside = self.path.with_name(f"{LOCK_NAME}.stale.{self.me.pid}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return True  # gone already: create it on the next try
        if aside.read_bytes() != raw:
            # Another run replaced the stale lock with its own in the meantime: give it back.
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        aside.unlink(missing_ok=True)
        return True

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._heartbeat = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._heartbeat.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            holder, _, _ = self._read()
            if holder is not None and not holder.same_process(self.me):
                logger.error("lost the lock of %s to another run; two runs now write into it", self.folder)
                return
            try:
                os.utime(self.path)
            except OSError:
                pass  # unreadable or untouchable for now (a flaky file system): the next beat tries again


def acquire_run_lock(folder: str | Path, rank: int) -> RunLock | None:
    """Rank 0 takes the folder's lock; every rank gets the same outcome (the lock on rank 0, None elsewhere, or the
    same config error)."""
    lock, error = None, None
    if rank == 0:
        lock = RunLock(folder)
        try:
            lock.acquire()
        except ConfigError as e:
            error = e
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        outcome = [None if error is None else (error.field, error.problem)]
        dist.broadcast_object_list(outcome, src=0)
        if outcome[0] is not None:
            error = ConfigError(*outcome[0])
    if error is not None:
        raise error
    return lock
