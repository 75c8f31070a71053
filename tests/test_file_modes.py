"""Every file and folder titanmem writes gets the mode the user's umask gives: on a shared cluster folder, the group
reads the weights, checkpoints and logs that a plain `open()` would let it read."""

import os
import stat
from pathlib import Path

import pytest

from helpers import reader_argv, train_tiny_run

# Group may read but not write, others get nothing: unlike both the usual 022 and a private temporary file's 0600.
UMASK = 0o027


@pytest.fixture
def umask():
    previous = os.umask(UMASK)
    yield UMASK
    os.umask(previous)


def wrong_modes(folder: Path) -> list[str]:
    """The entries under `folder` whose permission bits are not what a plain open() or mkdir() gives under UMASK."""
    wrong = []
    for path in sorted(folder.rglob("*")):
        mode = stat.S_IMODE(path.lstat().st_mode)
        expected = (0o777 if path.is_dir() else 0o666) & ~UMASK
        if not path.is_symlink() and mode != expected:
            wrong.append(f"{path.relative_to(folder)}: {oct(mode)}, not {oct(expected)}")
    return wrong


def test_training_eval_export_and_read_counts_follow_the_umask(tmp_path, umask, monkeypatch, capsys):
    from titanmem.eval.__main__ import main as eval_main
    from titanmem.export import main as export_main

    from titanmem import count_memory_reads

    run = tmp_path / "run"
    train_tiny_run(run, checkpoint={"enable": True, "interval": 1, "keep_latest_k": 2},
                   metrics={"enable_tensorboard": True})
    # The results of a reader go outside the run (it never writes into it).
    assert eval_main(reader_argv(run, "--eval.facts_limit", "2", "--eval.perplexity_tokens", "64",
                                 "--eval.max_new_tokens", "1", "--eval.results_folder", str(tmp_path / "eval"))) == 0
    assert export_main(reader_argv(run, "--export.folder", str(tmp_path / "export"), "--export.max_shard_gb",
                                   "0.01")) == 0
    assert count_memory_reads.main(["--out", str(tmp_path / "counts.safetensors"), "--batches", "1",
                                    *reader_argv(run, "--data.num_workers", "0")]) == 0, capsys.readouterr().err
    written = {path.relative_to(tmp_path).parts[0] for path in tmp_path.rglob("*")}
    assert written >= {"run", "eval", "export", "counts.safetensors"}
    assert any(tmp_path.glob("export/*.safetensors")) and any(tmp_path.glob("run/tb/*/*"))
    assert wrong_modes(tmp_path) == []


def test_the_check_catches_a_private_file(tmp_path, umask):
    """A file made the way a private temporary file is (mode 0600, as safetensors writes) is caught."""
    os.close(os.open(tmp_path / "private", os.O_CREAT | os.O_WRONLY, 0o600))
    (tmp_path / "plain").write_text("x")
    assert wrong_modes(tmp_path) == [f"private: 0o600, not {oct(0o666 & ~UMASK)}"]
