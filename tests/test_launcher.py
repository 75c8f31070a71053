"""The README's train command, run for real: run_train.sh -> torchrun -> titanmem.train, then a relaunch resumes."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def launch(dump_folder, *overrides, **env):
    environment = {**os.environ, "PYTHON": sys.executable, "TITANMEM_NO_INSTALL": "1", **env}
    return subprocess.run(
        [str(ROOT / "run_train.sh"), "--job.dump_folder", str(dump_folder), "--training.seq_len", "32",
         "--training.local_batch_size", "2", "--training.device", "cpu", "--metrics.log_freq", "2", *overrides],
        cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300,
    )


def test_run_train_trains_then_a_relaunch_resumes(tmp_path):
    first = launch(tmp_path, "--training.steps", "4", "--checkpoint.interval", "2")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "step 4 | loss" in first.stdout + first.stderr
    assert (tmp_path / "checkpoint" / "step-4" / ".metadata").is_file()
    assert (tmp_path / "config.toml").is_file()

    second = launch(tmp_path, "--training.steps", "6", "--checkpoint.interval", "2")
    output = second.stdout + second.stderr
    assert second.returncode == 0, output
    assert "resumed at step 4 of 6" in output
    assert "step 6 | loss" in output and "step 2 | loss" not in output


def test_run_train_reports_config_errors_and_refuses_missing_gpus(tmp_path):
    bad = launch(tmp_path, "--training.stepz", "3")
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: config error in training.stepz: unknown key in command line; did you mean 'training.steps'?"
    if not __import__("torch").cuda.is_available():
        no_gpu = launch(tmp_path, NGPU="2")
        assert no_gpu.returncode != 0 and "no GPU is visible" in no_gpu.stderr
