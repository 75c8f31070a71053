"""One training run per dump folder: a live holder's lock refuses a second run with one line naming it; a lock whose
holder is gone (dead process, reused pid, no heartbeat) is taken over with a warning."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from helpers import launch_ranks

TINY = ["--training.device", "cpu", "--training.seq_len", "32", "--training.local_batch_size", "2",
        "--training.steps", "2", "--checkpoint.interval", "2", "--metrics.enable_tensorboard", "false"]


def train(folder) -> int:
    from titanmem.train import main

    return main(["--job.dump_folder", str(folder), *TINY])


@pytest.fixture
def sleeper():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield process
    process.kill()
    process.wait()


def plant_lock(folder, *, pid, host=None, process_start="real", age=0.0, raw=None):
    from titanmem.components.run_lock import LOCK_NAME, process_start_time

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    if raw is None:
        start = process_start_time(pid) if process_start == "real" else process_start
        raw = json.dumps({"host": host or socket.gethostname(), "pid": pid, "process_start": start, "user": "ana",
                          "since": "2026-11-30 01:00:00 UTC", "command": "torchrun titanmem.train"}).encode()
    path.write_bytes(raw)
    if age:
        os.utime(path, (time.time() - age, time.time() - age))
    return path


def stderr_problems(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[titanmem] ")]


@pytest.mark.parametrize("holder", ["live process here", "stopped process here, old heartbeat",
                                    "fresh heartbeat elsewhere", "lock being written"])
def test_a_live_holder_refuses_a_second_run_with_one_line(tmp_path, capsys, sleeper, holder):
    folder = tmp_path / "run"
    if holder in ("live process here", "stopped process here, old heartbeat"):
        # A process stopped (Ctrl-Z) beats no heartbeat, but it is alive: on its own host, the process table decides.
        lock = plant_lock(folder, pid=sleeper.pid, age=400 if "stopped" in holder else 0)
        who = f"process {sleeper.pid} of ana on {socket.gethostname()}"
    elif holder == "fresh heartbeat elsewhere":
        lock = plant_lock(folder, pid=1, host="node-17")
        who = "process 1 of ana on node-17"
    else:
        lock = plant_lock(folder, pid=0, raw=b'{"host": "no')
        who = "a run that is still writing its lock"
    before = lock.read_bytes()
    assert train(folder) == 2
    problems = stderr_problems(capsys)
    assert len(problems) == 1
    assert problems[0].startswith(f"error: config error in job.dump_folder: {folder} is in use by {who}")
    assert lock.read_bytes() == before and not (folder / "checkpoint").exists()


@pytest.mark.parametrize("holder, reason", [
    ("dead process here", "is gone"),
    ("reused pid here", "the pid now belongs to another process"),
    ("silent elsewhere", "has not refreshed the lock for"),
    ("unreadable and old", "the lock file is unreadable"),
])
def test_a_lock_whose_holder_is_gone_is_taken_over_with_a_warning(tmp_path, capsys, sleeper, holder, reason):
    from titanmem.components.run_lock import LOCK_NAME

    folder = tmp_path / "run"
    if holder == "dead process here":
        finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                                  text=True)
        plant_lock(folder, pid=int(finished.stdout), process_start=None)
    elif holder == "reused pid here":
        plant_lock(folder, pid=sleeper.pid, process_start=1)
    elif holder == "silent elsewhere":
        plant_lock(folder, pid=1, host="node-17", age=400)
    else:
        plant_lock(folder, pid=0, raw=b"\x00garbage", age=30)
    assert train(folder) == 0
    err = capsys.readouterr().err
    warning = next(line for line in err.splitlines() if "took over the lock" in line)
    assert reason in warning
    assert (folder / "checkpoint" / "step-2").is_dir()
    assert not (folder / LOCK_NAME).exists()  # released at the end
    assert not list(folder.glob(f"{LOCK_NAME}.stale.*"))


def test_the_lock_is_held_while_training_and_refuses_another_process(tmp_path):
    from helpers import make_config
    from titanmem.components.run_lock import LOCK_NAME
    from titanmem.train import Trainer

    folder = tmp_path / "run"
    trainer = Trainer(make_config(folder, training={"steps": 1, "seq_len": 32, "local_batch_size": 2}))
    try:
        holder = json.loads((folder / LOCK_NAME).read_text())
        assert (holder["pid"], holder["host"]) == (os.getpid(), socket.gethostname())
        other = subprocess.run(
            [sys.executable, "-c", "import sys; from titanmem.components.run_lock import RunLock\n"
             "try:\n    RunLock(sys.argv[1]).acquire()\nexcept Exception as e:\n    print(e)", str(folder)],
            capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
        assert f"is in use by process {os.getpid()}" in other.stdout, other.stdout + other.stderr
    finally:
        trainer.close()
    assert not (folder / LOCK_NAME).exists()


def test_the_heartbeat_keeps_a_held_lock_fresh(tmp_path, monkeypatch):
    from titanmem.components import run_lock

    monkeypatch.setattr(run_lock, "HEARTBEAT_SECONDS", 0.05)
    lock = run_lock.RunLock(tmp_path)
    lock.acquire()
    try:
        os.utime(lock.path, (time.time() - 1000, time.time() - 1000))
        deadline = time.time() + 5
        while time.time() - lock.path.stat().st_mtime > 100 and time.time() < deadline:
            time.sleep(0.05)
        assert time.time() - lock.path.stat().st_mtime < 100
    finally:
        lock.release()
    assert not lock.path.exists()


def test_a_config_error_after_the_lock_gives_it_back(tmp_path, capsys):
    from titanmem.components.run_lock import LOCK_NAME
    from titanmem.train import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    assert main(["--job.dump_folder", str(tmp_path / "run"), "--data.path", str(bad), *TINY]) == 2
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_every_rank_of_a_refused_run_gets_the_same_error(tmp_path, sleeper):
    from helpers import refused_trainer_worker

    folder = tmp_path / "run"
    plant_lock(folder, pid=sleeper.pid)
    sections = dict(training={"steps": 1, "seq_len": 32, "local_batch_size": 2}, parallelism={"dp_shard": 2})
    launch_ranks(refused_trainer_worker, 2, str(folder), sections)
    messages = [(folder / f"rank{r}.txt").read_text() for r in range(2)]
    assert messages[0] == messages[1] and f"is in use by process {sleeper.pid}" in messages[0]


def test_a_lock_path_that_is_not_a_file_is_one_line(tmp_path, capsys):
    from titanmem.components.run_lock import LOCK_NAME

    (tmp_path / "run" / LOCK_NAME).mkdir(parents=True)
    assert train(tmp_path / "run") == 2
    assert stderr_problems(capsys) == [f"error: config error in job.dump_folder: {tmp_path / 'run' / LOCK_NAME} is "
                                       "not a lock file; remove it"]


@pytest.mark.parametrize("same_job", [True, False])
def test_a_relaunch_of_the_same_job_on_another_node_takes_the_lock_at_once(tmp_path, capsys, monkeypatch, same_job):
    from titanmem.components.run_lock import LOCK_NAME

    folder = tmp_path / "run"
    plant_lock(folder, pid=1, host="node-17")
    lock = json.loads((folder / LOCK_NAME).read_text())
    (folder / LOCK_NAME).write_text(json.dumps({**lock, "run_id": "4242"}))
    monkeypatch.setenv("TITANMEM_RUN_ID", "4242" if same_job else "4243")
    code = train(folder)
    err = capsys.readouterr().err
    if same_job:
        assert code == 0 and "earlier attempt of this job (run id 4242) on another node" in err
    else:
        assert code == 2 and "is in use by process 1 of ana on node-17" in err


def test_a_failed_read_does_not_stop_the_heartbeat(tmp_path, monkeypatch):
    from titanmem.components import run_lock

    monkeypatch.setattr(run_lock, "HEARTBEAT_SECONDS", 0.05)
    lock = run_lock.RunLock(tmp_path)
    original, failures = lock._read, []

    def flaky_read():
        if len(failures) < 2:  # the file system hiccups on the first beats
            failures.append(1)
            return None, None, 0.0
        return original()

    lock._read = flaky_read
    lock.acquire()
    try:
        deadline = time.time() + 5
        while len(failures) < 2 and time.time() < deadline:
            time.sleep(0.01)
        # After both failed reads, the heartbeat still refreshes the lock.
        os.utime(lock.path, (time.time() - 1000, time.time() - 1000))
        while time.time() - lock.path.stat().st_mtime > 100 and time.time() < deadline:
            time.sleep(0.05)
        assert len(failures) == 2 and time.time() - lock.path.stat().st_mtime < 100
    finally:
        lock.release()


@pytest.mark.parametrize("folder", ["/tmp/shared_checkpoints", "../elsewhere", ""])
def test_checkpoints_must_stay_inside_the_locked_dump_folder(tmp_path, capsys, folder):
    from titanmem.train import main

    assert main(["--job.dump_folder", str(tmp_path / "run"), "--checkpoint.folder", folder, *TINY]) == 2
    assert stderr_problems(capsys)[0].startswith("error: config error in checkpoint.folder: ")


def test_a_lock_that_cannot_be_written_is_not_left_behind(tmp_path, monkeypatch):
    """On a full disk the lock file is made but its contents cannot be written: the next run must not find an
    unreadable lock there."""
    import errno

    import titanmem.components.run_lock as run_lock
    from titanmem.config import ConfigError

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run_lock.os, "fsync", full)
    with pytest.raises(ConfigError, match=r"cannot write .*\.titanmem\.lock \(No space left on device\)"):
        run_lock.RunLock(tmp_path).acquire()
    assert not (tmp_path / run_lock.LOCK_NAME).exists()
