"""Reading a run (eval, generate) never changes its folder, and a checkpoint folder cannot run code when read."""

import hashlib
import os
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp

from helpers import reader_argv as argv, train_tiny_run


def snapshot(folder) -> dict[str, str]:
    """Every file and folder under `folder`: its relative name, and its bytes' hash (folders: empty)."""
    entries = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            entries[os.path.relpath(os.path.join(root, name), folder) + "/"] = ""
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as handle:
                entries[os.path.relpath(path, folder)] = hashlib.sha256(handle.read()).hexdigest()
    return entries


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    train_tiny_run(folder, checkpoint={"enable": True, "interval": 1, "keep_latest_k": 0},
                   metrics={"enable_tensorboard": True})
    return folder


def test_eval_and_generate_leave_the_run_untouched_and_training_resumes_from_the_newest(run_folder, capsys):
    from titanmem.eval.__main__ import main as eval_main
    from titanmem.generate import main as generate_main
    from titanmem.train import main as train_main

    before = snapshot(run_folder)
    assert {"checkpoint/step-1/", "checkpoint/step-2/", "checkpoint/step-3/", "config.toml"} <= set(before)
    assert any(name.startswith("tb/") for name in before)
    # An older step, as a user re-evaluating the run would ask for it: training's resume path would set step-3 aside.
    assert eval_main(argv(run_folder, "--checkpoint.load_step", "2", "--eval.facts_limit", "4",
                          "--eval.perplexity_tokens", "64", "--eval.max_new_tokens", "2")) == 0
    assert '"step": 2' in capsys.readouterr().out
    assert generate_main(argv(run_folder, "--generate.prompts", '["The capital of France is"]',
                              "--generate.max_new_tokens", "3")) == 0
    assert generate_main(argv(run_folder, "--generate.prompts", '["Hydrogen"]', "--generate.max_new_tokens", "2",
                              "--checkpoint.load_step", "1")) == 0
    assert snapshot(run_folder) == before

    assert train_main(argv(run_folder, "--training.steps", "4", "--training.local_batch_size", "2",
                           "--metrics.enable_tensorboard", "false")) == 0
    assert "resumed at step 3 of 4" in capsys.readouterr().err
    assert (run_folder / "checkpoint" / "step-4" / ".metadata").is_file()


def test_eval_refuses_to_write_its_results_into_the_run(run_folder, capsys):
    from titanmem.eval.__main__ import main as eval_main

    before = snapshot(run_folder)
    assert eval_main(argv(run_folder, "--eval.results_folder", str(run_folder / "eval"))) == 2
    assert "eval.results_folder" in capsys.readouterr().err
    assert eval_main(argv(run_folder, "--eval.dump_memory")) == 2
    assert "eval.dump_memory" in capsys.readouterr().err
    assert snapshot(run_folder) == before


def test_reading_a_run_without_a_checkpoint_is_one_clear_line(tmp_path, capsys):
    from titanmem.eval.__main__ import main as eval_main
    from titanmem.generate import main as generate_main

    assert eval_main(argv(tmp_path)) == 2
    assert "config error in checkpoint.folder: no complete checkpoint" in capsys.readouterr().err
    assert generate_main(argv(tmp_path, "--generate.prompts", '["x"]')) == 2
    assert "config error in generate.checkpoint: no complete checkpoint" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_reading_with_another_model_config_is_one_clear_line(run_folder, capsys):
    from titanmem.eval.__main__ import main as eval_main
    from titanmem.generate import main as generate_main

    dense = [a for a in argv(run_folder) if a != "--memory.enabled"]
    assert generate_main([*dense, "--generate.prompts", '["x"]']) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: config error in checkpoint.folder: ") and "shape" in error and "\n" not in error
    assert eval_main([*argv(run_folder), "--memory.n_keys", "32"]) == 2
    assert "memory_values.weight of shape [4096, 256], but this run's is [1024, 256]" in capsys.readouterr().err


class _Planted:
    """Unpickling this writes a file: the proof that a checkpoint ran code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def test_a_planted_checkpoint_index_is_refused_without_running_code(run_folder, tmp_path, capsys):
    import shutil

    from titanmem.components.checkpoint import load_model_weights
    from titanmem.components.manifest import write_manifest
    from titanmem.config import ConfigError
    from titanmem.generate import main as generate_main

    planted = tmp_path / "step-9"
    shutil.copytree(run_folder / "checkpoint" / "step-3", planted)
    marker = tmp_path / "marker"
    (planted / ".metadata").write_bytes(pickle.dumps(_Planted(marker)))
    # Checksums catch damage, not an attacker, who can write a manifest that matches the planted file.
    write_manifest(planted, {})
    code = generate_main(argv(run_folder, "--generate.prompts", '["x"]', "--generate.checkpoint", str(planted)))
    assert code == 2 and "builtins.exec" in capsys.readouterr().err
    assert not marker.exists()
    with pytest.raises(ConfigError, match="not checkpoint metadata"):
        load_model_weights(torch.nn.Linear(1, 1), planted)
    assert not marker.exists()


def test_a_pickled_checkpoint_entry_is_refused_without_running_code(tmp_path):
    from titanmem.components.checkpoint_io import UnsafeCheckpointError, load_tensors

    marker = tmp_path / "marker"
    # DCP itself saves a non-tensor value as a pickle, and would unpickle it on load.
    dcp.save({"train_state": {"step": _Planted(marker)}}, checkpoint_id=str(tmp_path / "ckpt"))
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError, match="train_state.step"):
        load_tensors({"train_state": {"step": torch.tensor(0)}}, tmp_path / "ckpt")
    assert not marker.exists()


def test_training_checkpoints_hold_tensors_only(run_folder):
    from titanmem.components.checkpoint import complete_checkpoint_steps
    from titanmem.components.checkpoint_io import read_metadata

    newest = complete_checkpoint_steps(run_folder / "checkpoint")[-1]
    entries = read_metadata(run_folder / "checkpoint" / f"step-{newest}").state_dict_metadata
    pickled = [key for key, entry in entries.items() if not hasattr(entry, "size")]
    assert not pickled, pickled
    assert {"train_state.step", "lr_scheduler.last_epoch", "dataloader.dp_rank_0", "rng.rank_0.python"} <= set(entries)
