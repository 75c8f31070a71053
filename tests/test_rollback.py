"""Going back to an older checkpoint with `checkpoint.load_step`, and launching that command again: a requeued job
repeats its command line as it was, so the second launch must go on from the timeline the first one started instead
of going back again, and no launch may lose a checkpoint or stop on a name that is taken."""

import json
from pathlib import Path

import pytest

from helpers import check_command_line, train_run
from titanmem.components.checkpoint import TIMELINE, complete_checkpoint_steps
from titanmem.config import ConfigError


def run(config, crash_after_step=None):
    return train_run(config, crash_after_step)[0]


def entries(folder):
    return sorted(p.name for p in folder.iterdir())


def test_a_repeated_load_step_goes_on_from_the_timeline_it_started(small_config, caplog):
    config = small_config(training={"steps": 8, "deterministic": True},
                          checkpoint={"enable": True, "interval": 2, "keep_latest_k": 0})
    first = run(config)
    folder = Path(config.job.dump_folder) / "checkpoint"
    assert complete_checkpoint_steps(folder) == [2, 4, 6, 8]

    # Back to step 4; the job dies in step 7, after saving step 6 anew.
    config.checkpoint.load_step = 4
    with pytest.raises(KeyboardInterrupt):
        run(config, crash_after_step=6)
    assert entries(folder) == ["step-2", "step-4", "step-6", "step-6.abandoned-at-4", "step-8.abandoned-at-4"]
    assert json.loads((folder / "step-6" / TIMELINE).read_text()) == {"rollbacks": [4]}

    # The requeue: the same command line again. It goes on from step 6 of the new timeline.
    caplog.set_level("WARNING")
    plan = check_command_line(["--job.dump_folder", config.job.dump_folder, "--checkpoint.load_step", "4"])
    assert plan.checkpoint_to_load == folder / "step-6"
    again = run(config)
    assert sorted(again) == [7, 8]
    assert "resuming from step-6 instead of going back again" in caplog.text
    assert entries(folder) == ["step-2", "step-4", "step-6", "step-6.abandoned-at-4", "step-8",
                               "step-8.abandoned-at-4"]
    # Deterministic: the new timeline is the old one's from step 4 on, so the losses repeat.
    assert again[8] == first[8]

    # Once more, when the run is done: nothing trains and nothing moves.
    assert run(config) == {}
    assert entries(folder) == ["step-2", "step-4", "step-6", "step-6.abandoned-at-4", "step-8",
                               "step-8.abandoned-at-4"]


def test_a_relaunch_that_falls_back_to_the_step_it_went_back_to_still_knows_it(small_config):
    """The requeued launch finds the new timeline's only newer checkpoint damaged and falls back to step 4 itself,
    whose own record predates going back there: the saves to come must still record it, or the next launch would
    go back again."""
    config = small_config(training={"steps": 8}, checkpoint={"enable": True, "interval": 2, "keep_latest_k": 0})
    run(config)
    folder = Path(config.job.dump_folder) / "checkpoint"
    config.checkpoint.load_step = 4
    with pytest.raises(KeyboardInterrupt):
        run(config, crash_after_step=6)
    shard = folder / "step-6" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-100])
    assert sorted(run(config)) == [5, 6, 7, 8]  # fell back to step 4
    assert json.loads((folder / "step-8" / TIMELINE).read_text()) == {"rollbacks": [4]}
    assert run(config) == {}
    assert entries(folder) == ["step-2", "step-4", "step-6", "step-6.abandoned-at-4", "step-6.damaged", "step-8",
                               "step-8.abandoned-at-4"]


def test_going_back_to_a_step_again_keeps_every_abandoned_timeline(small_config):
    """A timeline that never went back to step 4 (saved before titanmem recorded timelines) goes back to it while an
    earlier abandoned copy holds the name: both are kept."""
    config = small_config(training={"steps": 6}, checkpoint={"enable": True, "interval": 2, "keep_latest_k": 0})
    run(config)
    folder = Path(config.job.dump_folder) / "checkpoint"
    earlier = folder / "step-6.abandoned-at-4"
    earlier.mkdir()
    (earlier / "kept").write_text("an earlier timeline")
    config.checkpoint.load_step = 4
    assert sorted(run(config)) == [5, 6]
    assert (earlier / "kept").read_text() == "an earlier timeline"
    assert (folder / "step-6.abandoned-at-4.2" / ".metadata").is_file()
    assert complete_checkpoint_steps(folder) == [2, 4, 6]


def fake_checkpoint(folder, step, record):
    """A folder that the plan takes for a complete checkpoint (the plan reads names and timelines, not tensors)."""
    path = folder / f"step-{step}"
    path.mkdir(parents=True)
    (path / ".metadata").write_bytes(b"")
    (path / TIMELINE).write_text(record if isinstance(record, str) else json.dumps({"rollbacks": record}))


@pytest.mark.parametrize("checkpoints, load_step, expected", [
    ({4: [], 6: [4], 8: [4]}, 4, 8),  # a relaunch: go on from the timeline's newest
    ({8: [4], 10: [4]}, 4, 10),  # step-4 itself purged since (keep_latest_k): still a relaunch
    ({4: [], 6: [], 8: []}, 4, 4),  # never went back to 4: go back
    ({2: [], 4: [], 6: [2], 8: [2]}, 4, 4),  # went back to 2 later, leaving the timeline of 4: go back
    ({4: [], 6: [2, 4]}, 4, 6),  # went back to 2, then to 4
    ({4: [], 8: [4, 6]}, 4, 4),  # went back to 4, then to 6: a launch for 4 now is a new decision, not a relaunch
    ({4: [], 6: [4]}, 6, 6),  # the newest itself: nothing to set aside
])
def test_the_plan_tells_a_relaunch_from_a_new_rollback(tmp_path, checkpoints, load_step, expected):
    folder = tmp_path / "run" / "checkpoint"
    for step, record in checkpoints.items():
        fake_checkpoint(folder, step, record)
    argv = ["--job.dump_folder", str(tmp_path / "run"), "--checkpoint.load_step", str(load_step)]
    assert check_command_line(argv).checkpoint_to_load == folder / f"step-{expected}"
    # Readers of a run read the step asked for, whatever the timeline.
    if load_step in checkpoints:
        assert check_command_line(argv, "eval").checkpoint_to_load == folder / f"step-{load_step}"


@pytest.mark.parametrize("record", ["not json", '{"rollbacks": [true]}', '{"rollbacks": 4}', "[" * 100_000])
def test_an_unreadable_timeline_stops_the_plan_with_one_line_naming_it(tmp_path, record):
    """Going back would set aside a timeline that may be the one asked for; going on may skip a rollback asked for."""
    fake_checkpoint(tmp_path / "run" / "checkpoint", 4, [])
    fake_checkpoint(tmp_path / "run" / "checkpoint", 6, record)
    with pytest.raises(ConfigError) as info:
        check_command_line(["--job.dump_folder", str(tmp_path / "run"), "--checkpoint.load_step", "4"])
    assert info.value.field == "checkpoint.load_step"
    assert f"step-6/{TIMELINE} cannot be read" in str(info.value) and "checkpoint.load_step -1" in str(info.value)


def test_a_load_step_that_is_neither_there_nor_gone_back_to_is_a_config_error(tmp_path):
    fake_checkpoint(tmp_path / "run" / "checkpoint", 8, [4])
    with pytest.raises(ConfigError) as info:
        check_command_line(["--job.dump_folder", str(tmp_path / "run"), "--checkpoint.load_step", "6"])
    assert info.value.field == "checkpoint.load_step" and "complete steps: [8]" in str(info.value)
