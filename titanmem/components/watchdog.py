"""A rank that stops, hangs or dies ends the run with one line, within the timeout, on every rank that waited for it.

Every collective waits for all ranks of its group, so one rank that stops (a frozen process, a loader stuck on a
dead mount, a deadlock in a library, a node that drops off the network) holds all the others until torch's own
process-group timeout, which ends them with an abort (NCCL) or an exception that names no rank (gloo). The watchdog
follows the trainer's phases instead (start-up, each step, each save, each evaluation, the end of the run): a thread
of each rank checks that the phase in force ends before its deadline (`comm.train_timeout_seconds` for a step,
`comm.init_timeout_seconds` for the rest and for the first step of a launch). When one does not, or when a collective
fails because a peer went away (gloo's "Connection closed by peer"), the rank:
1. posts a report to the job's key-value store (the process group's: rank 0 hosts it, under `python -m
   titanmem.launch` too): its phase, what its main thread was doing and where;
2. waits up to REPORT_GRACE_SECONDS for the other ranks' reports;
3. names the ranks that sent none (stopped, dead, or stuck where Python cannot run) and those that were doing
   something other than waiting for the others (reading their batch), writes the NCCL flight recorder's record of
   its collectives (CUDA), prints the line, leaves it in torchrun's error file (so that torchrun's summary shows it
   whatever rank's output the console filters) and exits with status 1. All of it is bounded (FAIL_WITHIN_SECONDS):
   a frozen store host or a dead mount cannot keep the rank from ending.
The launcher then stops the remaining ranks, and with `--max-restarts` relaunches them: the run resumes from its newest
complete checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, NoReturn

import torch
import torch.distributed as dist

from titanmem.components.checkpoint_io import find_error
from titanmem.config.sections import Comm as CommConfig
from titanmem.utils import print_error

logger = logging.getLogger(__name__)

REPORT_GRACE_SECONDS = 5.0
"""How long a rank that found the run hung waits for the other ranks' reports before naming those it has none from.
Ranks that wait for the same collective found it within a step of one another; reports come in at once."""

FAIL_WITHIN_SECONDS = 3 * REPORT_GRACE_SECONDS + 5
"""A rank that found the run hung ends within this, with its full line or at least its headline."""

BACKSTOP_SECONDS = FAIL_WITHIN_SECONDS + 30
"""torch's own process-group timeouts are the watchdog's deadlines plus this: a backstop that fires only if the
watchdog could not, never before it has reported."""

TRACE_FOLDER = "comm_traces"
"""Folder under job.dump_folder for the NCCL flight recorder's per-rank records (`rank_<r>`)."""

# Under this launch attempt's prefix: plain torchrun keeps its store across `--max-restarts` relaunches.
_KEY = f"titanmem/hang/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
# What a rank's main thread does while it waits for no one: a rank found doing it when the others hang is the one
# they wait for.
_NOT_WAITING = ("reading its batch",)
# Messages of gloo's (and the store's) errors when a peer went away or did not answer; NCCL's errors are DistErrors.
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Timed out waiting", "Broken pipe",
              "Socket Timeout")


def is_comm_failure(error: BaseException) -> bool:
    """Whether `error` (or an error behind it: DCP wraps each rank's) is a collective that failed because a peer is
    gone or did not answer in time."""
    def lost(e: BaseException) -> bool:
        return isinstance(e, getattr(dist, "DistError", ())) or (
            isinstance(e, RuntimeError) and any(text in str(e) for text in _PEER_LOST))

    return find_error(error, lost) is not None


def set_flight_recorder_env(comm: CommConfig, dump_folder: str, device: torch.device) -> None:
    """Turn on the NCCL flight recorder (read when the process group is created), dumping to the run's folder on a
    timeout NCCL finds itself. Settings already in the environment win."""
    if device.type != "cuda" or comm.trace_buf_size == 0:
        return
    folder = Path(dump_folder) / TRACE_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    # torch reads the TORCH_NCCL_ names, and from 2.7 also the TORCH_FR_ ones.
    for names, value in ((("TORCH_NCCL_TRACE_BUFFER_SIZE", "TORCH_FR_BUFFER_SIZE"), str(comm.trace_buf_size)),
                         (("TORCH_NCCL_DUMP_ON_TIMEOUT",), "1"),
                         (("TORCH_NCCL_DEBUG_INFO_TEMP_FILE", "TORCH_FR_DUMP_TEMP_FILE"), f"{folder}/rank_")):
        for name in names:
            os.environ.setdefault(name, value)


def set_backstop_timeouts(comm: CommConfig) -> None:
    """Set every process group's own timeout (the default group's, and the mesh's, which torch creates with its
    default of 10 min on NCCL, 30 on gloo) to the watchdog's longest deadline plus BACKSTOP_SECONDS: NCCL's watchdog
    aborts the process when it fires, so it must never fire before ours has reported."""
    timeout = timedelta(seconds=comm.init_timeout_seconds + BACKSTOP_SECONDS)
    for group in list(dist.distributed_c10d._world.pg_map):
        try:
            dist.distributed_c10d._set_pg_timeout(timeout, group)
        except Exception as e:  # a backstop: the watchdog does not depend on it
            logger.debug("could not set the timeout of a process group: %s", e)


def dump_flight_recorder(dump_folder: str, rank: int) -> Path | None:
    """Write this rank's NCCL flight recorder record (its recent collectives, each started or completed) next to the
    others'; None where there is none (no NCCL, recorder off)."""
    dump = getattr(torch._C._distributed_c10d, "_dump_nccl_trace", None)
    if dump is None or not torch.cuda.is_available() or not os.environ.get("TORCH_NCCL_TRACE_BUFFER_SIZE"):
        return None
    try:
        record = dump()
        path = Path(dump_folder) / TRACE_FOLDER / f"rank_{rank}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(record)
        return path
    except Exception as e:  # the line that ends the run matters more than the record
        logger.warning("the NCCL flight recorder could not be written: %s", e)
        return None


@dataclass
class Report:
    """What a rank that found the run hung posts for the others."""

    rank: int
    phase: str
    doing: str
    where: str


@dataclass
class _Phase:
    name: str
    timeout: float
    field: str
    started: float

    @property
    def deadline(self) -> float:
        return self.started + self.timeout


def _where(frame) -> str:
    """The innermost titanmem line of a stack (else its innermost line), as `path:line in function`."""
    innermost = None
    while frame is not None:
        filename = frame.f_code.co_filename
        here = (filename, frame.f_lineno, frame.f_code.co_name)
        innermost = innermost or here
        if f"{os.sep}titanmem{os.sep}" in filename:
            innermost = here
            break
        frame = frame.f_back
    if innermost is None:
        return "unknown"
    filename, line, function = innermost
    parts = Path(filename).parts
    short = "/".join(parts[parts.index("titanmem"):]) if "titanmem" in parts else Path(filename).name
    return f"{short}:{line} in {function}"


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))


def leave_with_line(line: str, code: int = 1) -> NoReturn:
    """Print `error: line` (and leave it in torchrun's error file), then end the process now: threads blocked in a
    collective cannot be joined, and the interpreter's teardown would wait on them."""
    print_error(line)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)


class CommWatchdog:
    """The phases of one rank's run, their deadlines, and the report that ends a hung run (module docstring). With
    one process nobody waits on anybody: it watches nothing."""

    def __init__(self, comm: CommConfig, world_size: int, dump_folder: str, resume_hint: Callable[[], str],
                 device_event: Callable[[], object] | None = None):
        """`device_event` makes a marker on the device's stream (on a GPU, `torch.cuda.Event`; `query()` tells whether
        the device got past it): see `end_step`."""
        self.comm = comm
        self.world_size = world_size
        self.dump_folder = dump_folder
        self.resume_hint = resume_hint
        self.enabled = world_size > 1
        self._at_exit: list[Callable[[], None]] = []
        self._phase = _Phase("start-up", comm.init_timeout_seconds, "comm.init_timeout_seconds", time.monotonic())
        self._doing = "starting"
        self._steps_begun = 0
        self._device_event = device_event
        # Steps whose work the host has launched and the device has not finished: (step, its phase, end marker).
        self._on_device: deque[tuple[int, _Phase, object]] = deque()
        self._device_caught_up = time.monotonic()  # when the device was last seen finishing a step
        self._slow_warned: set[str] = set()  # the timeouts already warned about
        self._cuda_device: int | None = None  # the GPU of this rank's markers, set by the first `end_step`
        self._thread_on_device = False
        self._failing = threading.Lock()
        self._closed = threading.Event()
        self._main_thread = threading.main_thread()
        self._thread = None
        if self.enabled:
            self._thread = threading.Thread(target=self._watch, name="titanmem-watchdog", daemon=True)
            self._thread.start()

    @property
    def rank(self) -> int:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
        return int(os.environ.get("RANK", "0"))

    # The trainer's side: phases and what the main thread does in them.

    def at_exit(self, release: Callable[[], None]) -> None:
        """Run `release` (e.g. give back the run lock) before a hung run's process ends."""
        self._at_exit.append(release)

    def begin(self, name: str, long: bool = True) -> None:
        """A new phase: it must end within the init timeout (`long`) or the train timeout."""
        self._check_phase_time(time.monotonic())
        timeout, field = ((self.comm.init_timeout_seconds, "comm.init_timeout_seconds") if long else
                          (self.comm.train_timeout_seconds, "comm.train_timeout_seconds"))
        self._phase = _Phase(name, timeout, field, time.monotonic())

    def begin_unwatched(self, name: str) -> None:
        """A phase of local work whose length the run cannot bound (the last background save writing to a slow
        disk): not timed here; its collectives keep torch's own timeout."""
        self._check_phase_time(time.monotonic())
        self._phase = _Phase(name, float("inf"), "", time.monotonic())

    def begin_step(self, step: int) -> None:
        """Step `step` starts. The first of a launch gets the init timeout (compilation, first allocations), and so
        does the first after an evaluation or a save: the ranks that finished theirs first wait in it for the last
        (rank 0 writes the eval's results after the eval's last collective)."""
        self._steps_begun += 1
        previous = self._phase
        after_long = not previous.name.startswith("step ") and previous.field == "comm.init_timeout_seconds"
        self.begin(f"step {step}", long=self._steps_begun == 1 or after_long)

    def end_step(self, step: int) -> None:
        """The host has launched all of step `step`'s work. On a GPU the host runs ahead of the device (up to the
        next read of the step's numbers), so a rank that stopped shows first as a step the device does not finish,
        while the host is already steps further: the step is watched on the device too, through a marker at its end,
        and a hang names the step the device is stuck in."""
        if self.enabled and self._device_event is not None:
            if self._cuda_device is None and torch.cuda.is_available():
                self._cuda_device = torch.cuda.current_device()
            marker = self._device_event()
            marker.record()
            self._on_device.append((step, self._phase, marker))

    def doing(self, what: str) -> None:
        self._doing = what

    def close(self) -> None:
        self._closed.set()

    def _check_phase_time(self, now: float) -> None:
        phase = self._phase
        if (phase.field and phase.field not in self._slow_warned and now - phase.started > phase.timeout / 2
                and self.rank == 0):
            self._slow_warned.add(phase.field)
            logger.warning("%s took %.0f s, more than half of %s (%d): raise it, or a slower one ends the run as hung",
                           phase.name, now - phase.started, phase.field, phase.timeout)

    # Finding the run hung, and ending it.

    def _watch(self) -> None:
        while not self._closed.is_set():
            phase = self._phase
            now = time.monotonic()
            # While the device is behind the host, the host only waits for it: the device's step is the one to time.
            stuck = self._device_phase(now)
            if stuck is not None:
                left = stuck.deadline - now
                if left <= 0:
                    self._phase_overdue(stuck, " on the device")
            else:
                left = phase.deadline - now
                if left <= 0 and phase is self._phase:
                    self._phase_overdue(phase, "")
            # Short waits: a new phase may have a nearer deadline than the one in force when this wait began.
            self._closed.wait(min(max(left, 0.01), 1.0))

    def _device_phase(self, now: float) -> _Phase | None:
        """The step the device is in, if it is behind the host: it began when the device finished the step before
        (as seen here, within a second) or when the host began it, whichever was later."""
        if (self._on_device and not self._thread_on_device and self._cuda_device is not None
                and threading.current_thread() is self._thread):
            # Else this thread's first CUDA call makes a context on GPU 0, half a GB on every rank.
            torch.cuda.set_device(self._cuda_device)
            self._thread_on_device = True
        while self._on_device and self._on_device[0][2].query():
            self._on_device.popleft()
            self._device_caught_up = now
        if not self._on_device:
            return None
        step, phase, _ = self._on_device[0]
        return _Phase(phase.name, phase.timeout, phase.field, max(phase.started, self._device_caught_up))

    def _phase_overdue(self, phase: _Phase, where_it_ran: str) -> NoReturn:
        self._phase = phase  # the report names the phase the device or host is stuck in
        frame = sys._current_frames().get(self._main_thread.ident)
        self.fail(f"{phase.name} did not finish{where_it_ran} within {phase.timeout:g} s ({phase.field})",
                  _where(frame))

    def end_if_peer_lost(self, error: BaseException) -> None:
        """End the run (not returning) if `error` is a collective that failed because a rank is gone
        (`is_comm_failure`); with one process there is no such error."""
        if self.enabled and is_comm_failure(error):
            self.fail_after(error)

    def fail_after(self, error: BaseException) -> NoReturn:
        """End the run after a collective failed in the main thread (`is_comm_failure`)."""
        cause = find_error(error, lambda e: isinstance(e, RuntimeError) and "Connection" in str(e)) or error
        text = " ".join(str(cause).split())
        # gloo prefixes its messages with the source file and line, and follows them with advice: the reader needs
        # the sentence between.
        text = text.split("] ", 1)[1] if text.startswith("[") and "] " in text else text
        text = text.split(". ", 1)[0]
        tb = error.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = _where(tb.tb_frame) if tb is not None else "unknown"
        self.fail(f"a collective of {self._phase.name} failed ({text[:160]})", where)

    def fail(self, headline: str, where: str) -> NoReturn:
        """Report, name who the run waits for, and end this process with the one line. Bounded: whatever of it
        blocks (a store whose host is frozen, a dump folder on a dead mount), the process ends within
        FAIL_WITHIN_SECONDS with at least the headline."""
        if not self._failing.acquire(blocking=False):
            # The other thread of this rank (main or watchdog) is already reporting; it ends the process.
            while True:
                time.sleep(3600)
        line = f"rank {self.rank}: {headline}"
        fallback = threading.Timer(FAIL_WITHIN_SECONDS, leave_with_line,
                                   (f"{line}: the report to the other ranks did not complete",))
        fallback.daemon = True
        fallback.start()
        report = Report(self.rank, self._phase.name, self._doing, where)
        line += f": {self._diagnosis(self._exchange(report))}"
        hint = self.resume_hint()
        line += f"; {hint}" if hint else ""
        traces = dump_flight_recorder(self.dump_folder, self.rank)
        if traces is not None:
            line += f"; the NCCL flight recorder's records are in {traces.parent}"
        for release in self._at_exit:
            try:
                release()
            except Exception:
                pass
        leave_with_line(line)

    def _store(self):
        if not (dist.is_available() and dist.is_initialized()):
            return None
        return dist.distributed_c10d._get_default_store()

    def _exchange(self, report: Report) -> dict[int, Report] | None | str:
        """Post this rank's report and collect the others' (those posted within the grace); None if the store does not
        answer, "no group" before the process group exists. Store calls can block past their timeout on a frozen
        store host: they run in a thread of their own, given up on after twice the grace."""
        if self._store() is None:
            return "no group"
        answer: list = []
        exchange = threading.Thread(target=lambda: answer.append(self._exchange_through_store(report)), daemon=True)
        exchange.start()
        exchange.join(2 * REPORT_GRACE_SECONDS + 1)
        return answer[0] if answer else None

    def _exchange_through_store(self, report: Report) -> dict[int, Report] | None:
        try:
            store = self._store()
            if store is None:
                return None
            store.set_timeout(timedelta(seconds=REPORT_GRACE_SECONDS))
            store.set(f"{_KEY}{self.rank}", json.dumps(asdict(report)))
            reported = store.add(f"{_KEY}count", 1)
            deadline = time.monotonic() + REPORT_GRACE_SECONDS
            while reported < self.world_size and time.monotonic() < deadline:
                time.sleep(0.1)
                reported = store.add(f"{_KEY}count", 0)
            reports = {}
            for rank in range(self.world_size):
                key = f"{_KEY}{rank}"
                if store.check([key]):
                    reports[rank] = Report(**json.loads(store.get(key)))
            store.add(f"{_KEY}read", 1)
            if self.rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
                # This process hosts the store: the others may still be reading it.
                while store.add(f"{_KEY}read", 0) < reported and time.monotonic() < deadline + REPORT_GRACE_SECONDS:
                    time.sleep(0.1)
            return reports
        except Exception as e:
            logger.warning("the job's store did not answer: %s", " ".join(str(e).split())[:200])
            return None

    def _diagnosis(self, reports: dict[int, Report] | None | str) -> str:
        if reports == "no group":
            return "the process group has not formed yet (a rank has not started, or cannot reach the others)"
        if reports is None:
            return ("the job's store did not answer, so the rank it waits for is unknown (when rank 0 hosts the store, "
                    "rank 0 is gone)")
        silent = [rank for rank in range(self.world_size) if rank not in reports]
        own = reports.get(self.rank)
        busy = [r for r in reports.values() if r.doing in _NOT_WAITING and r.rank != self.rank]
        elsewhere = [r for r in reports.values()
                     if own is not None and r.phase != own.phase and r.doing not in _NOT_WAITING]
        parts = []
        if silent:
            parts.append(f"{_ranks(silent)} did not answer (stopped, dead, or stuck where Python cannot run)")
        parts += [f"rank {r.rank} was {r.doing} ({r.where})" for r in busy[:8]]
        if own is not None and own.doing in _NOT_WAITING:
            parts.append(f"this rank was {own.doing} ({own.where})")
        parts += [f"rank {r.rank} was in {r.phase} ({r.where})" for r in elsewhere[:8]]
        if not parts:
            parts.append("every rank answered, each in the same phase: it takes longer than the timeout (raise it), or "
                         "the ranks wait in collectives that do not match (this rank waits at "
                         f"{own.where if own else 'unknown'})")
        return "; ".join(parts)
