"""The start-of-run check that the checkpoints fit: its estimate of one checkpoint against what a save writes, a
folder too small for one (one line, before the first step), and one too small for keep_latest_k (a warning)."""

import contextlib
import errno
import io
import logging
import os
import threading

import pytest
from helpers import make_config

import titanmem.components.disk_space as disk_space
from titanmem.components.disk_space import checkpoint_bytes, free_bytes

@pytest.fixture(autouse=True)
def logging_to_this_tests_stderr():
    """Each main() points the log at the stderr of its time; a test that logs before calling main must not write to
    an earlier test's closed capture."""
    from titanmem.utils import setup_logging

    setup_logging()


@pytest.fixture
def thread_errors(monkeypatch) -> list:
    """Errors that leave a thread: pytest would only warn of them, where a user sees a traceback."""
    escaped = []
    monkeypatch.setattr(threading, "excepthook", escaped.append)
    return escaped


ARGV = ["--training.device", "cpu", "--training.steps", "3", "--training.seq_len", "32", "--training.local_batch_size",
        "2", "--memory.enabled", "--checkpoint.enable", "--checkpoint.interval", "3", "--metrics.enable_tensorboard",
        "false"]


@pytest.mark.parametrize("value_optimizer", ["adamw", "adagrad"])
def test_the_estimate_is_what_a_save_writes(tmp_path, value_optimizer):
    from titanmem.train import Trainer

    trainer = Trainer(make_config(tmp_path, training={"steps": 3, "seq_len": 32, "local_batch_size": 2},
                                  memory={"enabled": True, "value_optimizer": value_optimizer},
                                  checkpoint={"enable": True, "interval": 3}))
    try:
        estimate = checkpoint_bytes(trainer.model, trainer.optimizers)
        trainer.train()
    finally:
        trainer.close()
    written = sum(p.stat().st_size for p in (tmp_path / "checkpoint" / "step-3").rglob("*") if p.is_file())
    # The estimate leaves out the loader, RNG and schedule states, DCP's index and the manifest: a few hundred KB.
    assert estimate <= written <= estimate * 1.05 + 2e6, (estimate, written)


def test_a_folder_too_small_for_one_checkpoint_stops_the_run_in_one_line(tmp_path, monkeypatch, capsys):
    from titanmem.train import main

    monkeypatch.setattr(disk_space, "free_bytes", lambda folder: 10_000_000)
    assert main(["--job.dump_folder", str(tmp_path / "run"), *ARGV]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: config error in checkpoint.folder") and error.count("\n") == 1, error
    assert "0.01 GB free, but one checkpoint of this run takes about 0.0" in error and "larger filesystem" in error
    assert not (tmp_path / "run" / "checkpoint").exists() or not list((tmp_path / "run" / "checkpoint").iterdir())
    # The refused run left nothing behind that stops the next one (its lock included).
    monkeypatch.setattr(disk_space, "free_bytes", lambda folder: 10**12)
    assert main(["--job.dump_folder", str(tmp_path / "run"), *ARGV]) == 0


def test_a_folder_too_small_for_keep_latest_k_warns_with_the_numbers(tmp_path, monkeypatch, caplog):
    from titanmem.train import Trainer

    config = make_config(tmp_path, training={"steps": 1, "seq_len": 32}, memory={"enabled": True},
                         checkpoint={"enable": True, "keep_latest_k": 3})
    probe = Trainer(make_config(tmp_path / "probe", training={"steps": 1, "seq_len": 32}, memory={"enabled": True}))
    one = checkpoint_bytes(probe.model, probe.optimizers)
    probe.close()
    monkeypatch.setattr(disk_space, "free_bytes", lambda folder: int(2.5 * one))
    with caplog.at_level(logging.WARNING, logger="titanmem.components.disk_space"):
        Trainer(config).close()
    message = " ".join(record.getMessage() for record in caplog.records)
    assert "keep_latest_k = 3 with a save in flight needs" in message and f"{4 * one / 1e9:.2f} GB more" in message
    caplog.clear()
    monkeypatch.setattr(disk_space, "free_bytes", lambda folder: 5 * one)
    with caplog.at_level(logging.WARNING, logger="titanmem.components.disk_space"):
        Trainer(config).close()
    assert not caplog.records


def test_free_space_is_read_where_the_folder_will_be(tmp_path):
    assert free_bytes(tmp_path / "not" / "yet" / "made") == free_bytes(tmp_path) > 0


def one_checkpoint_bytes(tmp_path) -> int:
    from titanmem.train import Trainer

    probe = Trainer(make_config(tmp_path / "probe", training={"steps": 1, "seq_len": 32}, memory={"enabled": True}))
    try:
        return checkpoint_bytes(probe.model, probe.optimizers)
    finally:
        probe.close()


@pytest.mark.parametrize("async_mode", ["disabled", "async"])
def test_a_disk_that_fills_mid_save_ends_the_run_in_one_line_and_the_relaunch_resumes(tmp_path, monkeypatch, capsys,
                                                                                      async_mode):
    import titanmem.components.faults as faults
    from titanmem.train import main

    one = one_checkpoint_bytes(tmp_path)
    argv = ["--job.dump_folder", str(tmp_path / "run"), *ARGV, "--training.steps", "6", "--checkpoint.async_mode",
            async_mode, "--checkpoint.keep_latest_k", "2"]
    # Room for step-3's checkpoint and half of step-6's.
    monkeypatch.setattr(faults, "_DISK_FULL_AFTER", int(1.5 * one))
    monkeypatch.setattr(faults, "_written", 0)
    assert main(argv) == 1
    printed = capsys.readouterr().err
    error = [line for line in printed.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "Traceback" not in printed, printed
    assert error[0].startswith(f"error: checkpoint step-6 could not be written to {tmp_path / 'run' / 'checkpoint'}: "
                               "No space left on device (a checkpoint needs about 0.0")
    assert "the newest complete checkpoint is step-3, which relaunching the same command resumes from" in error[0]
    folder = tmp_path / "run" / "checkpoint"
    assert sorted(p.name for p in folder.iterdir()) == ["step-3"]  # the partial folder is gone
    # Space is freed: the same command resumes from step-3 and finishes.
    monkeypatch.setattr(faults, "_DISK_FULL_AFTER", 0)
    assert main(argv) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["step-3", "step-6"]
    assert "resum" in capsys.readouterr().err.lower()


class FullDisk(io.RawIOBase):
    """A file on a disk that holds `room[0]` more bytes, under a buffered writer as Python opens files: a write past
    the room is cut short and the next fails with ENOSPC, and so does the close that flushes what the buffer kept."""

    def __init__(self, file, room: list[int], lock: threading.Lock):
        super().__init__()
        self._file, self._room, self._lock = file, room, lock

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file.seek(offset, whence)

    def fileno(self) -> int:
        return self._file.fileno()

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        with self._lock:  # as write(2) does: what fits is written (a short count), and then ENOSPC
            if self._room[0] == 0 and len(view):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            view = view[:self._room[0]]
            self._room[0] -= len(view)
        return self._file.write(view)

    def close(self) -> None:
        self._file.close()
        super().close()


@pytest.mark.parametrize("io_threads,fails_at", [(1, "a write"), (3, "a write"), (3, "the opening")])
def test_a_real_full_disk_fails_the_buffered_close_too_and_still_ends_in_one_line(tmp_path, monkeypatch, capsys,
                                                                                  thread_errors, io_threads, fails_at):
    """On a full disk the failed write is not the last error: torch.save's zip writer fails again as it ends, and
    the close of the buffered file fails flushing what it holds; none of them may escape a writer thread."""
    from torch.distributed.checkpoint.filesystem import FileSystem

    from titanmem.train import main

    room, lock, full = [int(1.5 * one_checkpoint_bytes(tmp_path))], threading.Lock(), [True]
    opened_by_dcp = FileSystem.create_stream

    @contextlib.contextmanager
    def on_a_full_disk(self, path, mode):
        if mode != "wb" or not str(path).endswith(".distcp"):
            with opened_by_dcp(self, path, mode) as stream:
                yield stream
            return
        if room[0] == 0 or (fails_at == "the opening" and full[0] and "step-6" in str(path)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        with io.BufferedWriter(FullDisk(open(path, "wb", buffering=0), room, lock), buffer_size=4096) as stream:
            yield stream

    monkeypatch.setattr(FileSystem, "create_stream", on_a_full_disk)
    argv = ["--job.dump_folder", str(tmp_path / "run"), *ARGV, "--training.steps", "9", "--checkpoint.keep_latest_k",
            "3", "--checkpoint.io_threads", str(io_threads)]
    assert main(argv) == 1
    printed = capsys.readouterr().err
    error = [line for line in printed.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "Traceback" not in printed and not thread_errors, (printed, thread_errors)
    assert error[0].startswith("error: checkpoint step-6 could not be written") and "No space left" in error[0]
    folder = tmp_path / "run" / "checkpoint"
    assert sorted(p.name for p in folder.iterdir()) == ["step-3"]
    # Freed, the same command resumes from step-3.
    room[0], full[0] = 10**12, False
    assert main(argv) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["step-3", "step-6", "step-9"]


def test_another_write_error_ends_the_run_the_same_way(tmp_path, monkeypatch, capsys):
    import errno

    import titanmem.components.summing_writer as summing_writer
    from titanmem.train import main

    def refused(nbytes):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(summing_writer, "disk_write_point", refused)
    assert main(["--job.dump_folder", str(tmp_path / "run"), *ARGV]) == 1
    printed = capsys.readouterr().err
    error = [line for line in printed.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "Traceback" not in printed and "checkpoint step-3 could not be written" in error[0]
    assert "Permission denied; there is no complete checkpoint yet: a relaunch starts afresh" in error[0]
    assert not list((tmp_path / "run" / "checkpoint").iterdir())


def test_a_write_error_in_one_writer_thread_fails_the_whole_save(tmp_path, monkeypatch, capsys):
    """DCP writes a rank's files from several threads; an error in one of them alone must not let the save complete
    without that thread's file."""
    import errno
    import threading

    import titanmem.components.summing_writer as summing_writer
    from titanmem.train import main

    def full_in_other_threads(nbytes):
        if threading.current_thread() is not threading.main_thread():
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(summing_writer, "disk_write_point", full_in_other_threads)
    assert main(["--job.dump_folder", str(tmp_path / "run"), *ARGV, "--checkpoint.io_threads", "3"]) == 1
    printed = capsys.readouterr().err
    assert "Traceback" not in printed and "error: checkpoint step-3 could not be written" in printed
    assert not list((tmp_path / "run" / "checkpoint").iterdir())


@pytest.mark.parametrize("fails_at", ["the opening", "the first step", "step 2"])
def test_a_full_disk_under_tensorboard_stops_tensorboard_once_and_training_goes_on(tmp_path, monkeypatch, capsys,
                                                                                 thread_errors, fails_at):
    """TensorBoard is written in the logging thread: a failed write is one warning, not a traceback from a writer
    thread and another from the training loop."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import titanmem.components.event_file as event_file
    from titanmem.train import main

    written = event_file.EventFile.add_scalar
    first_failing_step = {"the opening": 0, "the first step": 1, "step 2": 2}[fails_at]

    def add_scalar(self, tag, value, step):
        if step >= first_failing_step:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written(self, tag, value, step)

    monkeypatch.setattr(event_file.EventFile, "add_scalar", add_scalar)
    if fails_at == "the opening":  # the TensorBoard folder cannot be made: a file stands where it goes
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "tb").write_text("")
    argv = ["--job.dump_folder", str(tmp_path / "run"), *ARGV, "--metrics.enable_tensorboard", "true",
            "--metrics.log_freq", "1"]
    assert main(argv) == 0
    printed = capsys.readouterr().err
    stopped = [line for line in printed.splitlines() if "TensorBoard logging stopped" in line]
    assert len(stopped) == 1 and "Traceback" not in printed and not thread_errors, printed
    assert ("Not a directory" if fails_at == "the opening" else "No space left on device") in stopped[0]
    assert "step 3 | loss" in printed
    if fails_at != "the opening":
        (folder,) = {p.parent for p in (tmp_path / "run").rglob("events.out.tfevents.*")}
        events = EventAccumulator(str(folder))
        events.Reload()
        logged = [e.step for e in events.Scalars("loss")] if "loss" in events.Tags()["scalars"] else []
        assert logged == list(range(1, first_failing_step))


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   OSError(errno.EROFS, "Read-only file system", "/mnt/ro/run/config.toml")])
def test_any_other_write_of_the_run_on_a_failing_disk_ends_it_in_one_line(tmp_path, monkeypatch, capsys, error):
    """Not only checkpoints: the run's lock, config, events and traces share the disk; a write among them that fails
    for space or permission ends the run with the same kind of line, and gives the folder's lock back."""
    import titanmem.train as train
    from titanmem.components.run_lock import LOCK_NAME

    def fails(*args, **kwargs):
        raise error

    monkeypatch.setattr(train, "write_config", fails)
    assert train.main(["--job.dump_folder", str(tmp_path / "run"), *ARGV]) == 1
    printed = capsys.readouterr().err
    error_lines = [line for line in printed.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "Traceback" not in printed, printed
    subject = error.filename or tmp_path / "run"
    assert error_lines[0].startswith(f"error: {subject}: {error.strerror} in ") and "(train.py:" in error_lines[0]
    fix = "free space on that filesystem" if error.errno == errno.ENOSPC else "mounted read-only"
    assert fix in error_lines[0] and error_lines[0].endswith("there is no complete checkpoint yet: a relaunch starts "
                                                             "afresh")
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_other_os_errors_are_not_taken_for_a_failing_disk():
    from titanmem.utils import storage_failure

    assert storage_failure(ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")) is None
    assert storage_failure(FileNotFoundError(errno.ENOENT, "No such file or directory", "x")) is None
    assert storage_failure(ValueError("not an OSError")) is None
    assert storage_failure(OSError(errno.EDQUOT, "Disk quota exceeded"), "/runs/a") == (
        "/runs/a: Disk quota exceeded; free space within your quota there, or raise it")
