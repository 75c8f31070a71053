"""The README's train command, run for real: run_train.sh -> torchrun -> titanmem.train, then a relaunch resumes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def launch_two_nodes(dump_folder, steps: int) -> list[str]:
    """launch/run_multinode.sh on two "nodes" of this host: two torchrun agents meeting at one c10d rendezvous, one
    CPU rank each (gloo); returns each node's output."""
    from helpers import free_port

    environment = {**os.environ, "PYTHON": sys.executable, "TITANMEM_NO_INSTALL": "1", "NNODES": "2", "NGPU": "1",
                   "RDZV_ENDPOINT": f"127.0.0.1:{free_port()}", "RDZV_ID": "ci-two-nodes"}
    nodes = [
        subprocess.Popen(
            [str(ROOT / "launch" / "run_multinode.sh"), "--job.dump_folder", str(dump_folder), "--training.seq_len",
             "32", "--training.local_batch_size", "2", "--training.device", "cpu", "--metrics.log_freq", "1",
             "--training.steps", str(steps), "--checkpoint.interval", "2"],
            cwd=ROOT, env={**environment, "NODE_RANK": str(node)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)
        for node in range(2)
    ]
    outputs = []
    for node in nodes:
        output, _ = node.communicate(timeout=400)
        assert node.returncode == 0, output[-4000:]
        outputs.append(output)
    return outputs


def test_two_nodes_train_save_and_resume_through_the_multinode_launcher(tmp_path):
    first = launch_two_nodes(tmp_path, 4)
    # Node 1 holds global rank 1, which does not log steps: the two agents formed one world of two ranks.
    assert "step 4 | loss" in first[0] and "step 4 | loss" not in first[1]
    step = tmp_path / "checkpoint" / "step-4"
    # Each rank wrote its own shard of the sharded model and optimizer.
    assert {p.name for p in step.iterdir()} >= {".metadata", "__0_0.distcp", "__1_0.distcp", "manifest.json"}
    second = launch_two_nodes(tmp_path, 6)
    assert "resumed at step 4 of 6" in second[0] and "step 6 | loss" in second[0]
    assert "step 2 | loss" not in second[0]


def test_the_multinode_launcher_checks_its_settings_and_the_config_before_the_rendezvous(tmp_path):
    script = str(ROOT / "launch" / "run_multinode.sh")
    environment = {**os.environ, "PYTHON": sys.executable, "TITANMEM_NO_INSTALL": "1"}
    no_endpoint = subprocess.run([script], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=120)
    assert no_endpoint.returncode == 2 and "set RDZV_ENDPOINT" in no_endpoint.stderr
    bad = subprocess.run([script, "--training.stepz", "3"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**environment, "RDZV_ENDPOINT": "127.0.0.1:1", "NNODES": "2"})
    assert bad.returncode == 2
    assert bad.stderr.strip() == ("error: config error in training.stepz: unknown key in command line; did you mean "
                                  "'training.steps'?")
    nodes = subprocess.run([script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                           env={**environment, "RDZV_ENDPOINT": "127.0.0.1:1", "NNODES": "two"})
    assert nodes.returncode == 2 and "must be positive integers" in nodes.stderr


@pytest.mark.parametrize("world_size", ["1", "2"])
def test_a_finished_command_leaves_with_its_code_and_every_line_it_wrote(world_size):
    """A rank of several leaves without the interpreter's teardown (where gloo's threads can abort a finished run):
    its exit code and its buffered output must still come out."""
    code = ("import logging, sys; from titanmem.utils import exit_with, setup_logging; setup_logging(); "
            "print('trained', end=''); logging.getLogger('titanmem').info('closed'); sys.stderr.write('last'); "
            "exit_with(3)")
    # Buffered, as a pipe is unless PYTHONUNBUFFERED says otherwise: what a skipped teardown would lose.
    environment = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}
    result = subprocess.run([sys.executable, "-c", code], env={**environment, "WORLD_SIZE": world_size},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 3
    assert result.stdout == "trained" and "INFO closed" in result.stderr and result.stderr.endswith("last")
