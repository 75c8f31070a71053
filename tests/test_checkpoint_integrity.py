"""Damaged checkpoint folders: every save writes a manifest of sizes and checksums; a resume that finds its newest
checkpoint damaged names it, sets it aside and resumes from the one before; with none left, or for a reader, the
damage is one config-error line."""

import os
import random
import shutil
import zlib

import pytest
import torch
from helpers import launch_ranks

TINY = ["--memory.enabled", "--training.device", "cpu", "--training.seq_len", "32", "--training.local_batch_size",
        "2", "--checkpoint.interval", "2", "--metrics.enable_tensorboard", "false", "--metrics.log_freq", "1"]


def train(folder, steps: int, *extra) -> int:
    from titanmem.train import main

    return main(["--job.dump_folder", str(folder), "--training.steps", str(steps), *TINY, *extra])


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A run with complete checkpoints at steps 2 and 4."""
    folder = tmp_path_factory.mktemp("integrity") / "run"
    assert train(folder, 4) == 0
    return folder


@pytest.fixture
def run(saved_run, tmp_path):
    """A private copy of the saved run, free to damage."""
    copy = tmp_path / "run"
    shutil.copytree(saved_run, copy)
    return copy


def problem_lines(capsys) -> list[str]:
    """The lines of stderr that are not progress logs; a traceback would show here."""
    return [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("[titanmem] ")]


def truncate(path):
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate(size // 2)


def flip_64k(path):
    data = bytearray(path.read_bytes())
    start = len(data) // 3
    end = min(len(data), start + 64 * 1024)
    data[start:end] = bytes(b ^ 0xFF for b in data[start:end])
    path.write_bytes(bytes(data))


def garbage_same_size(path):
    path.write_bytes(random.Random(1).randbytes(path.stat().st_size))


# name -> (damage of one step folder, words of the reported problem)
DAMAGE = {
    "a truncated shard": (lambda step: truncate(step / "__0_0.distcp"), "__0_0.distcp has "),
    "a deleted shard": (lambda step: (step / "__0_0.distcp").unlink(), "__0_0.distcp is missing"),
    "an empty .metadata": (lambda step: (step / ".metadata").write_bytes(b""), ".metadata has 0 bytes"),
    "a garbage .metadata": (lambda step: garbage_same_size(step / ".metadata"), ".metadata is corrupted"),
    "64 KiB of flipped bytes in a shard": (lambda step: flip_64k(step / "__0_0.distcp"),
                                           "__0_0.distcp is corrupted (checksum mismatch from byte 0)"),
    "a garbage manifest": (lambda step: (step / "manifest.json").write_text("{not json"), "manifest.json is damaged"),
    "a manifest that leaves out a shard": (lambda step: edit_manifest(step, lambda files: files.pop("__0_0.distcp")),
                                           "manifest.json does not list __0_0.distcp"),
    "a manifest with too few checksums": (lambda step: edit_manifest(step, lambda files: files[".metadata"].update(
        crc32=[])), "a checksum list that does not match its file's size"),
}


def edit_manifest(step, change):
    import json

    manifest = json.loads((step / "manifest.json").read_text())
    change(manifest["files"])
    (step / "manifest.json").write_text(json.dumps(manifest))


def test_every_save_writes_a_manifest_of_its_files(saved_run):
    from titanmem.components.manifest import CHUNK_BYTES, read_manifest

    for step in ("step-2", "step-4"):
        folder = saved_run / "checkpoint" / step
        files = read_manifest(folder)
        on_disk = sorted(p.name for p in folder.iterdir() if p.name != "manifest.json")
        assert sorted(files) == on_disk and ".metadata" in files
        for name, digest in files.items():
            data = (folder / name).read_bytes()
            assert digest["size"] == len(data)
            chunks = [data[i:i + CHUNK_BYTES] for i in range(0, max(len(data), 1), CHUNK_BYTES)]
            assert digest["crc32"] == [f"{zlib.crc32(c):08x}" for c in chunks]


@pytest.mark.parametrize("size", [0, 1, 999, 1000, 4097])
def test_chunked_checksums_match_a_plain_reference(tmp_path, monkeypatch, size):
    from titanmem.components import manifest

    monkeypatch.setattr(manifest, "CHUNK_BYTES", 1000)
    data = os.urandom(size)
    (tmp_path / "f").write_bytes(data)
    digest = manifest.file_digests(tmp_path, ["f"])["f"]
    chunks = [data[i:i + 1000] for i in range(0, max(size, 1), 1000)]
    assert digest == {"size": size, "crc32": [f"{zlib.crc32(c):08x}" for c in chunks]}
    assert manifest.verify_files(tmp_path, {"f": digest}, ["f"]) == []
    if size > 1000:
        flipped = bytearray(data)
        flipped[1500] ^= 1
        (tmp_path / "f").write_bytes(bytes(flipped))
        assert manifest.verify_files(tmp_path, {"f": digest}, ["f"]) == [
            "f is corrupted (checksum mismatch from byte 1,000)"]


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_gives_way_to_the_one_before(run, capsys, case):
    damage, problem = DAMAGE[case]
    damage(run / "checkpoint" / "step-4")
    assert train(run, 6) == 0
    messages = capsys.readouterr().err.splitlines()
    warning = next(m for m in messages if "is damaged" in m)
    assert "step-4 is damaged: " in warning and problem in warning and "set aside as step-4.damaged" in warning
    assert any("resumed at step 2 of 6" in m for m in messages)
    assert (run / "checkpoint" / "step-4.damaged").is_dir()
    # The run went on from step 2 and saved again: step-4 anew, then step-6.
    from titanmem.components.checkpoint import checkpoint_problems, complete_checkpoint_steps

    assert complete_checkpoint_steps(run / "checkpoint")[-2:] == [4, 6]
    assert checkpoint_problems(run / "checkpoint" / "step-4") == []


@pytest.mark.parametrize("case", ["a truncated shard", "a garbage .metadata"])
def test_with_no_intact_checkpoint_left_the_error_names_the_damage(run, capsys, case):
    damage, problem = DAMAGE[case]
    for step in ("step-2", "step-4"):
        damage(run / "checkpoint" / step)
    assert train(run, 6) == 2
    err = problem_lines(capsys)
    assert len(err) == 1 and err[0].startswith("error: config error in checkpoint.folder: no intact checkpoint")
    assert "step-2 is damaged: " in err[0] and problem in err[0]


def test_a_damaged_step_asked_for_by_number_is_an_error_not_a_fall_back(run, capsys):
    DAMAGE["a deleted shard"][0](run / "checkpoint" / "step-4")
    assert train(run, 6, "--checkpoint.load_step", "4") == 2
    err = problem_lines(capsys)
    assert len(err) == 1 and err[0].startswith("error: config error in checkpoint.folder: ")
    assert "step-4 is damaged" in err[0]
    assert (run / "checkpoint" / "step-4").is_dir()  # not set aside: the user named it


@pytest.mark.parametrize("reader", ["eval", "generate", "export"])
def test_a_reader_of_a_damaged_checkpoint_stops_with_one_line_and_changes_nothing(run, tmp_path, capsys, reader):
    from helpers import reader_argv

    DAMAGE["64 KiB of flipped bytes in a shard"][0](run / "checkpoint" / "step-4")
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    argv = reader_argv(run)
    if reader == "eval":
        from titanmem.eval.__main__ import main
    elif reader == "generate":
        from titanmem.generate import main

        argv += ["--generate.prompts", '["x"]']
    else:
        from titanmem.export import main

        argv += ["--export.folder", str(tmp_path / "exported")]
    assert main(argv) == 2
    err = problem_lines(capsys)
    assert len(err) == 1 and "step-4 is damaged: __0_0.distcp is corrupted" in err[0]
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before


@pytest.mark.parametrize("case", ["a truncated shard", "a garbage .metadata", "an empty .metadata"])
def test_without_a_manifest_a_damaged_checkpoint_is_still_one_line(run, capsys, case):
    """Checkpoints saved before manifests existed (or with verify_on_load off) are loaded unverified, and what the
    loader trips on is reported as damage, not as a traceback."""
    step = run / "checkpoint" / "step-4"
    (step / "manifest.json").unlink()
    DAMAGE[case][0](step)
    assert train(run, 6) == 2
    err = problem_lines(capsys)
    assert len(err) == 1 and err[0].startswith("error: config error in checkpoint.folder: ")
    assert "cannot be read" in err[0] and "the checkpoint is damaged" in err[0]


def test_verification_is_spread_over_ranks_and_every_rank_falls_back(tmp_path):
    from helpers import train_worker

    def launch(steps, name):
        sections = dict(training={"steps": steps, "seq_len": 32, "local_batch_size": 2},
                        memory={"enabled": True}, checkpoint={"enable": True, "interval": 2, "io_threads": 1},
                        parallelism={"dp_shard": 2})
        launch_ranks(train_worker, 2, str(tmp_path), sections, name)
        return torch.load(tmp_path / name)

    launch(4, "first.pt")
    from titanmem.components.manifest import read_manifest

    step4 = tmp_path / "checkpoint" / "step-4"
    assert sorted(read_manifest(step4)) == [".metadata", "__0_0.distcp", "__1_0.distcp", "timeline.json"]
    # Rank 1 checks the second of the sorted files: only it sees this damage, and both ranks must act on it.
    flip_64k(step4 / "__0_0.distcp")
    resumed = launch(6, "second.pt")
    assert sorted(resumed) == [3, 4, 5, 6]
    assert (tmp_path / "checkpoint" / "step-4.damaged").is_dir()


def test_ranks_that_would_load_different_checkpoints_stop_with_one_line_and_move_nothing(run):
    """Nodes that see the checkpoint folder differently (a stale network file system) plan different loads."""
    from helpers import disagreeing_load_worker

    before = sorted(p.name for p in (run / "checkpoint").iterdir())
    launch_ranks(disagreeing_load_worker, 2, str(run))
    for rank in range(2):
        message = (run / f"rank{rank}.txt").read_text()
        assert message.startswith("config error in checkpoint.folder: the ranks would load different checkpoints"), message
        assert "step-2" in message and "step-4" in message
    assert sorted(p.name for p in (run / "checkpoint").iterdir()) == before


def test_a_manifest_naming_files_outside_its_folder_is_damage_not_a_read_elsewhere(run, capsys):
    import json

    manifest = run / "checkpoint" / "step-4" / "manifest.json"
    table = json.loads(manifest.read_text())
    table["files"]["../../../../etc/hostname"] = {"size": 1, "crc32": ["00000000"]}
    manifest.write_text(json.dumps(table))
    assert train(run, 6) == 0
    warning = next(m for m in capsys.readouterr().err.splitlines() if "is damaged" in m)
    assert "manifest.json is damaged" in warning and "outside the folder" in warning


def test_a_step_damaged_twice_is_set_aside_beside_the_first(run, capsys):
    (run / "checkpoint" / "step-4.damaged").mkdir()
    DAMAGE["a truncated shard"][0](run / "checkpoint" / "step-4")
    assert train(run, 6) == 0
    assert "set aside as step-4.damaged.2" in capsys.readouterr().err
    assert (run / "checkpoint" / "step-4.damaged").is_dir() and (run / "checkpoint" / "step-4.damaged.2").is_dir()


def test_a_relaunch_after_every_checkpoint_was_damaged_does_not_start_afresh(run, capsys):
    for step in ("step-2", "step-4"):
        DAMAGE["a truncated shard"][0](run / "checkpoint" / step)
    assert train(run, 6) == 2
    capsys.readouterr()
    assert train(run, 6) == 2
    err = problem_lines(capsys)
    assert len(err) == 1 and "holds only damaged checkpoints (step-2.damaged, step-4.damaged)" in err[0]
    assert not (run / "checkpoint" / "step-6").exists()
