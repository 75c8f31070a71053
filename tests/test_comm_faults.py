"""A rank that stops, hangs or dies ends a run of several with one line on the ranks that waited for it, within the
step timeout plus the report grace, and a relaunch resumes (titanmem/components/watchdog.py, titanmem/launch.py).

Two gloo CPU ranks train the debug model, launched as users launch them: by launch/run_multinode.sh (torchrun through
`python -m titanmem.launch`), or as plain processes that meet at MASTER_ADDR (as `srun` starts one per task). Each
fault is a fault point of titanmem/components/faults.py on rank 1 (or 0)."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import free_port

from titanmem.components.watchdog import FAIL_WITHIN_SECONDS

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 8
"""comm.train_timeout_seconds of these runs: well above a step of theirs on a loaded 2-core machine."""
SLACK = FAIL_WITHIN_SECONDS + 5
"""Beyond the timeout: the report to the other ranks (bounded), then the exit and the launcher's reaction."""
TRAIN = ["--training.device", "cpu", "--training.seq_len", "32", "--training.local_batch_size", "2",
         "--training.steps", "5", "--training.deterministic", "--checkpoint.interval", "2", "--metrics.log_freq", "1",
         "--comm.train_timeout_seconds", str(TIMEOUT), "--comm.init_timeout_seconds", "120"]


class Watched:
    """A process whose output lines are timed as they come."""

    def __init__(self, command: list[str], env: dict[str, str]):
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True)
        self.lines: list[tuple[float, str]] = []
        self.ended: float | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))
        self.process.wait()
        self.ended = time.monotonic()

    def first(self, text: str, wait: float = 0) -> tuple[float, str] | None:
        deadline = time.monotonic() + wait
        while True:
            found = next(((t, line) for t, line in self.lines if text in line), None)
            if found or time.monotonic() >= deadline or self.ended is not None and self._settled():
                return found
            time.sleep(0.1)

    def _settled(self) -> bool:
        return not self._reader.is_alive()

    def finish(self, timeout: float) -> int:
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code

    @property
    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)


def clean_env(**faults: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("TITANMEM_")}
    return {**env, "PYTHON": sys.executable, "TITANMEM_NO_INSTALL": "1", "HF_DATASETS_OFFLINE": "1", **faults}


def multinode(dump_folder: Path, restarts: int, **faults: str) -> Watched:
    """launch/run_multinode.sh with two ranks on this host (one torchrun agent)."""
    env = clean_env(NNODES="1", NGPU="2", MAX_RESTARTS=str(restarts), RDZV_ENDPOINT=f"127.0.0.1:{free_port()}",
                    **faults)
    return Watched([str(ROOT / "launch" / "run_multinode.sh"), "--job.dump_folder", str(dump_folder), *TRAIN], env)


def stopped_children(parent: int) -> list[int]:
    """Processes of `parent` that are stopped (state T)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "T" and int(fields[1]) == parent:
            found.append(int(stat.parent.name))
    return found


def losses(output: str) -> dict[int, str]:
    """Each logged step's loss, as printed; the last print of a step wins."""
    found = {}
    for line in output.splitlines():
        if "| loss " in line and " INFO step " in line:
            step = int(line.split("INFO step ")[1].split()[0])
            found[step] = line.split("| loss ")[1].split()[0]
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the stopped rank through /proc (Linux)")
@pytest.mark.parametrize("stopped", [1, 0])
def test_a_stopped_rank_ends_the_run_on_the_others_and_torchrun_restarts_it_from_the_checkpoint(tmp_path, stopped):
    """Rank 0 hosts the job's store (titanmem.launch gives each attempt its own): when it is the one stopped, the
    other cannot collect reports, and says so within the bound instead of waiting on the store."""
    waiter = 1 - stopped
    # Rank 1's output is shown too: the line of an attempt that torchrun restarts is only in the failed rank's output.
    run = multinode(tmp_path, restarts=1, TITANMEM_STOP_AT="step:3", TITANMEM_FAULT_RANK=str(stopped),
                    LOG_RANK="0,1")
    step3 = run.first("INFO step 3 |", wait=240) if stopped else run.first("saved checkpoint step-2", wait=240)
    assert step3 is not None, run.output[-3000:]
    line = run.first(f"error: rank {waiter}: step 4 did not finish", wait=TIMEOUT + SLACK + 30)
    assert line is not None, run.output[-3000:]
    # Every rank that waited is out within the timeout and the bounded report.
    assert line[0] - step3[0] <= TIMEOUT + SLACK, (line[0] - step3[0], line[1])
    # torchrun prefixes each line of a rank's output with the rank.
    said = line[1].split("error: ", 1)[1]
    headline = f"rank {waiter}: step 4 did not finish within {TIMEOUT} s (comm.train_timeout_seconds): "
    resume = "; the newest complete checkpoint is step-2, which relaunching the same command resumes from"
    if stopped == 1:
        assert said == headline + "rank 1 did not answer (stopped, dead, or stuck where Python cannot run)" + resume
    else:
        assert said.startswith(headline + "the job's store did not answer") and resume in said, said
    # torchrun would wait 30 s before it SIGKILLs a stopped process that ignores its SIGTERM; a cluster's scheduler
    # reaps it some time. Let it take the pending SIGTERM now.
    for pid in stopped_children(run.process.pid):
        os.kill(pid, signal.SIGCONT)
    assert run.finish(timeout=300) == 0, run.output[-4000:]
    restarted = run.output.split(line[1], 1)[1]
    assert "resumed at step 2 of 5" in restarted and "INFO step 5 |" in restarted
    before = losses(run.output.split(line[1], 1)[0])
    if 3 in before:
        assert losses(restarted)[3] == before[3]


def test_a_rank_stuck_in_its_loader_is_named_and_a_relaunch_resumes(tmp_path):
    run = multinode(tmp_path, restarts=0, TITANMEM_HANG_AT="batch:4", TITANMEM_FAULT_RANK="1")
    assert run.finish(timeout=300) == 1, run.output[-3000:]
    step3 = run.first("INFO step 3 |")
    error = run.first("error: rank")
    assert step3 is not None and error is not None, run.output[-3000:]
    assert error[0] - step3[0] <= TIMEOUT + SLACK
    # The launcher's last line is the first failed rank's: either the one that waited, or the stuck one itself, which
    # has a watchdog too.
    last = run.output.strip().splitlines()[-1]
    assert last.startswith("error: rank ") and f"step 4 did not finish within {TIMEOUT} s (comm.train_timeout_seconds)" in last
    assert ("rank 1 was reading its batch (titanmem/" in last or
            last.startswith("error: rank 1:") and "this rank was reading its batch (titanmem/" in last), last
    assert "did not answer" not in last  # both ranks answered: the stuck one is named by what it was doing
    again = multinode(tmp_path, restarts=0)
    assert again.finish(timeout=300) == 0, again.output[-3000:]
    assert "resumed at step 2 of 5" in again.output and "INFO step 5 |" in again.output


def start_ranks(dump_folder: Path, port: int, **faults: str) -> list[Watched]:
    """Two ranks as plain processes meeting at MASTER_ADDR:MASTER_PORT (rank 0 hosts the store), as srun starts them."""
    return [
        Watched([sys.executable, "-m", "titanmem.train", "--job.dump_folder", str(dump_folder), *TRAIN],
                clean_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **faults))
        for rank in range(2)
    ]


@pytest.mark.parametrize("killed", [1, 0])
def test_a_killed_rank_ends_the_other_without_torchrun_and_a_relaunch_resumes(tmp_path, killed):
    ranks = start_ranks(tmp_path, free_port(), TITANMEM_CRASH_AT="step:3", TITANMEM_FAULT_RANK=str(killed))
    dead, survivor = ranks[killed], ranks[1 - killed]
    assert dead.finish(timeout=300) == -signal.SIGKILL, dead.output[-3000:]
    assert survivor.finish(timeout=TIMEOUT + SLACK + 30) == 1, survivor.output[-3000:]
    assert survivor.ended - dead.ended <= SLACK
    last = survivor.output.strip().splitlines()[-1]
    assert last.startswith(f"error: rank {1 - killed}: a collective of step 4 failed ("), last
    if killed == 1:
        assert "rank 1 did not answer" in last
    else:  # the store died with rank 0
        assert "the job's store did not answer" in last and "rank 0 is gone" in last
    assert last.endswith("the newest complete checkpoint is step-2, which relaunching the same command resumes from")
    again = start_ranks(tmp_path, free_port())
    assert [rank.finish(timeout=300) for rank in again] == [0, 0], again[0].output[-3000:] + again[1].output[-3000:]
    assert "resumed at step 2 of 5" in again[0].output and "INFO step 5 |" in again[0].output


def test_the_launcher_ends_with_the_failed_ranks_own_line_or_how_it_ended(tmp_path, monkeypatch):
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from titanmem.launch import failure_line
    from titanmem.utils import print_error

    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    print_error("checkpoint step-6 could not be written to /x: No space left on device")
    said = ProcessFailure(local_rank=1, pid=11, exitcode=1, error_file=str(error_file))
    killed = ProcessFailure(local_rank=0, pid=12, exitcode=-9, error_file="")
    silent = ProcessFailure(local_rank=0, pid=13, exitcode=3, error_file="")
    assert failure_line(ChildFailedError("titanmem.train", {1: said})) == (
        "rank 1: checkpoint step-6 could not be written to /x: No space left on device")
    assert failure_line(ChildFailedError("titanmem.train", {0: killed, 1: said})).startswith(
        "rank 0 (pid 12) was ended by SIGKILL (and 1 other rank ended after it): killed from outside")
    assert failure_line(ChildFailedError("titanmem.train", {0: silent})).startswith("rank 0 exited with status 3;")


def test_a_collective_that_lost_a_rank_is_told_from_other_errors():
    import errno

    from torch.distributed.checkpoint.api import CheckpointException

    from titanmem.components.watchdog import is_comm_failure

    lost = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:35001")
    assert is_comm_failure(lost)
    # DCP wraps each rank's error; the trainer wraps DCP's.
    wrapped = CheckpointException("save failed", {1: (lost, None)})
    try:
        try:
            raise wrapped
        except CheckpointException:
            raise RuntimeError("checkpoint step-4 could not be written") from None
    except RuntimeError as outer:
        assert is_comm_failure(outer)
    assert not is_comm_failure(CheckpointException("save failed", {0: (OSError(errno.ENOSPC, "full"), None)}))
    assert not is_comm_failure(ValueError("bad shape"))
    assert not is_comm_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_timeouts_are_checked_and_a_slow_step_warns_before_it_ends_a_run(tmp_path, monkeypatch, caplog):
    from helpers import check_command_line

    from titanmem.components import watchdog as module
    from titanmem.config import ConfigError
    from titanmem.config.sections import Comm

    with pytest.raises(ConfigError, match=r"comm.train_timeout_seconds.*must not exceed comm.init_timeout_seconds"):
        check_command_line(["--comm.train_timeout_seconds", "700", "--comm.init_timeout_seconds", "600"])
    with pytest.raises(ConfigError, match="comm.trace_buf_size"):
        check_command_line(["--comm.trace_buf_size", "-1"])

    single = module.CommWatchdog(Comm(), 1, str(tmp_path), lambda: "")
    assert not single.enabled and single._thread is None  # one process waits on nobody

    clock = [1000.0]
    monkeypatch.setattr(module.time, "monotonic", lambda: clock[0])
    watchdog = module.CommWatchdog(Comm(init_timeout_seconds=600, train_timeout_seconds=100), 2, str(tmp_path),
                                   lambda: "")
    # Its thread reads the same frozen clock: no deadline below passes.
    try:
        watchdog.begin_step(1)
        assert watchdog._phase.timeout == 600  # the first step of a launch compiles and allocates
        clock[0] += 200  # under half of it: no warning
        watchdog.begin_step(2)
        assert watchdog._phase.timeout == 100 and not caplog.records
        clock[0] += 60
        with caplog.at_level("WARNING"):
            watchdog.begin_step(3)
        assert "step 2 took 60 s, more than half of comm.train_timeout_seconds (100)" in caplog.text
        watchdog.begin("the save of step-3")
        assert watchdog._phase.timeout == 600
        watchdog.begin_step(4)  # the ranks that saved first wait in it for the last
        assert watchdog._phase.timeout == 600
        watchdog.begin_step(5)
        assert watchdog._phase.timeout == 100
        watchdog.begin_unwatched("the end of the run")
        assert watchdog._phase.deadline == float("inf")
    finally:
        watchdog.close()


def test_on_a_gpu_the_step_the_device_is_stuck_in_is_watched_not_the_host_s(tmp_path, monkeypatch):
    """The host runs steps ahead of the device until it reads a step's numbers: a peer that stopped shows as a step
    whose end marker the device never passes. The watchdog times that step from when the device finished the one
    before it."""
    from titanmem.components import watchdog as module
    from titanmem.config.sections import Comm

    class Marker:
        def __init__(self):
            self.passed = False

        def record(self):
            markers.append(self)

        def query(self):
            return self.passed

    markers: list[Marker] = []
    clock = [1000.0]
    monkeypatch.setattr(module.time, "monotonic", lambda: clock[0])
    watchdog = module.CommWatchdog(Comm(init_timeout_seconds=600, train_timeout_seconds=100), 2, str(tmp_path),
                                   lambda: "", device_event=Marker)
    watchdog.close()  # its thread stops; the checks below call what it calls
    watchdog._thread.join()
    for step in (1, 2, 3, 4):  # the host launches four steps in 4 s
        watchdog.begin_step(step)
        clock[0] += 1
        watchdog.end_step(step)
    assert watchdog._device_phase(clock[0]).name == "step 1"  # nothing finished on the device yet
    markers[0].passed = True
    clock[0] += 1
    stuck = watchdog._device_phase(clock[0])
    assert (stuck.name, stuck.timeout, stuck.field) == ("step 2", 100, "comm.train_timeout_seconds")
    assert stuck.started == clock[0]  # the device began step 2 when it finished step 1, after the host began it
    clock[0] += 101
    assert watchdog._device_phase(clock[0]).deadline < clock[0]  # overdue, though the host is in step 4 or beyond
    for marker in markers:
        marker.passed = True
    assert watchdog._device_phase(clock[0]) is None
