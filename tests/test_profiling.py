"""[profiling]: traces written where and when the schedule says and readable as JSON, nothing when off, memory
snapshots at their steps and on running out of memory (with the CUDA allocator's calls stood in for on CPU), the
one-line error of an out-of-memory stop, and eval progress lines."""

from __future__ import annotations

import json
import logging
import pickle

import pytest
import torch

from helpers import make_config
from titanmem.components import profiling
from titanmem.config import ConfigError, build_config
from titanmem.train import Trainer


def train(folder, steps: int, **sections) -> Trainer:
    trainer = Trainer(make_config(folder, training={"steps": steps, "seq_len": 32, "local_batch_size": 2}, **sections))
    try:
        trainer.train()
    finally:
        trainer.close()
    return trainer


def test_traces_are_written_at_each_multiple_of_the_frequency_and_parse_as_json(tmp_path):
    train(tmp_path, 4, profiling={"enable_profiling": True, "profile_freq": 2, "profiler_warmup": 0,
                                  "profiler_active": 1})
    traces = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "profile_traces").rglob("*.json"))
    assert traces == ["profile_traces/iteration_2/rank0.pt.trace.json",
                      "profile_traces/iteration_4/rank0.pt.trace.json"]
    trace = json.loads((tmp_path / traces[-1]).read_text())
    names = {event.get("name", "") for event in trace["traceEvents"]}
    assert any("aten::mm" in name or "aten::addmm" in name for name in names), "the trace holds no matmul"


def test_off_by_default_nothing_is_recorded(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.profiler started while profiling is off")

    monkeypatch.setattr(torch.profiler, "profile", refuse)
    train(tmp_path, 2)
    assert not (tmp_path / "profile_traces").exists() and not (tmp_path / "memory_snapshot").exists()
    assert isinstance(profiling.step_profiler(make_config(tmp_path).profiling, str(tmp_path), 0, 0),
                      profiling.NoProfiler)


def test_a_schedule_longer_than_its_frequency_is_refused_naming_the_field():
    with pytest.raises(ConfigError) as info:
        build_config(["--profiling.enable_profiling", "--profiling.profile_freq", "3", "--profiling.profiler_warmup",
                      "3"])
    assert info.value.field == "profiling.profile_freq"
    # Off, the same numbers are not checked: they do nothing.
    build_config(["--profiling.profile_freq", "3", "--profiling.profiler_warmup", "3"])


class FakeAllocator:
    """Stands in for torch.cuda.memory's history recording and snapshots."""

    def __init__(self):
        self.calls, self.snapshots = [], 0

    def record(self, **kwargs):
        self.calls.append(kwargs)

    def snapshot(self):
        self.snapshots += 1
        return {"segments": [], "number": self.snapshots}


def test_memory_snapshots_at_the_frequency_and_on_running_out_of_memory(tmp_path, monkeypatch, caplog):
    allocator = FakeAllocator()
    monkeypatch.setattr(profiling, "_cuda_memory_backend", lambda device: (allocator.record, allocator.snapshot))
    sections = {"profiling": {"enable_memory_snapshot": True, "profile_freq": 2}}
    train(tmp_path / "fine", 4, **sections)
    found = sorted(p.relative_to(tmp_path / "fine").as_posix() for p in (tmp_path / "fine").rglob("*.pickle"))
    assert found == ["memory_snapshot/iteration_2/rank0_memory_snapshot.pickle",
                     "memory_snapshot/iteration_4/rank0_memory_snapshot.pickle"]
    assert pickle.loads((tmp_path / "fine" / found[1]).read_bytes())["number"] == 2
    assert allocator.calls[0] == {"max_entries": profiling.MEMORY_HISTORY_ENTRIES}
    assert allocator.calls[-1] == {"enabled": None}  # recording stops with the run

    # A step that runs out of memory: a snapshot, then one clear error naming the step and the file.
    original = Trainer.train_step

    def failing_step(self, batches):
        if self.train_state.step == 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
        return original(self, batches)

    monkeypatch.setattr(Trainer, "train_step", failing_step)
    with pytest.raises(profiling.RunOutOfMemory) as info:
        train(tmp_path / "oom", 5, **sections)
    oom = tmp_path / "oom" / "memory_snapshot" / "iteration_3_oom" / "rank0_memory_snapshot.pickle"
    assert oom.is_file()
    message = str(info.value)
    assert "\n" not in message and "step 3" in message and str(oom) in message and "Tried to allocate" in message


def test_out_of_memory_without_snapshots_says_how_to_get_one(tmp_path, monkeypatch, capsys):
    from titanmem.train import main

    def failing_step(self, batches):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory.")

    monkeypatch.setattr(Trainer, "train_step", failing_step)
    code = main(["--training.device", "cpu", "--job.dump_folder", str(tmp_path), "--training.steps", "2",
                 "--training.seq_len", "32", "--training.local_batch_size", "2", "--checkpoint.enable", "false",
                 "--metrics.enable_tensorboard", "false"])
    assert code == 1
    error = capsys.readouterr().err
    assert "out of device memory at step 1" in error and "profiling.enable_memory_snapshot" in error
    assert "Traceback" not in error


def test_memory_snapshot_off_cuda_is_ignored_with_a_warning(tmp_path, caplog):
    config = make_config(tmp_path, profiling={"enable_memory_snapshot": True}).profiling
    with caplog.at_level(logging.WARNING):
        snapshot = profiling.memory_snapshot(config, str(tmp_path), 0, torch.device("cpu"))
    assert isinstance(snapshot, profiling.NoMemorySnapshot) and "needs a CUDA device" in caplog.text


def test_eval_progress_reports_what_is_done_and_the_time_left(caplog):
    from titanmem.eval.runner import Progress

    now = [0.0]
    progress = Progress("eval step 7: recall", "prompts", True, interval=30.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO):
        for done, time in ((100, 10.0), (400, 40.0), (500, 50.0), (900, 80.0), (1000, 95.0)):
            now[0] = time
            progress(done, 1000)
    lines = [r.getMessage() for r in caplog.records]
    # At 40 s (400 done: 60 s left) and at 80 s (900 done: 80 × 100 / 900 ≈ 9 s left); never at the end.
    assert lines == ["eval step 7: recall: 400 / 1,000 prompts, 0:01:00 left",
                     "eval step 7: recall: 900 / 1,000 prompts, 0:00:09 left"]
    quiet = Progress("x", "prompts", False, interval=0.0, clock=lambda: now[0])
    caplog.clear()
    quiet(1, 2)
    assert not caplog.records


@pytest.mark.parametrize("freq, warmup, active, start, end", [(3, 2, 1, 2, 12), (4, 1, 2, 6, 12), (4, 1, 1, 0, 7)])
def test_a_resumed_run_traces_the_same_steps_and_a_cut_window_leaves_no_trace(tmp_path, freq, warmup, active, start,
                                                                              end):
    """The profiler driven as the training loop drives it, from step `start` (a resume) to `end`: each trace holds
    the `active` steps that end at a multiple of freq, as an uninterrupted run's would, and a window the run does not
    finish is not saved."""
    config = make_config(tmp_path, profiling={"enable_profiling": True, "profile_freq": freq,
                                              "profiler_warmup": warmup, "profiler_active": active}).profiling
    with profiling.step_profiler(config, str(tmp_path), 0, start) as profiler:
        for step in range(start + 1, end + 1):
            with torch.profiler.record_function(f"titanmem_step_{step}"):
                torch.ones(8, 8) @ torch.ones(8, 8)
            profiler.step()
    expected = {s: [f"titanmem_step_{t}" for t in range(s - active + 1, s + 1)]
                for s in range(freq, end + 1, freq) if s - active >= start}
    found = {}
    for path in (tmp_path / "profile_traces").glob("iteration_*/rank0.pt.trace.json"):
        events = json.loads(path.read_text())["traceEvents"]
        found[int(path.parent.name.split("_")[1])] = sorted(
            {e["name"] for e in events if e.get("name", "").startswith("titanmem_step_")}, key=lambda n: int(n[14:]))
    assert found == expected


def test_running_out_of_memory_in_the_eval_names_the_eval_batch(tmp_path, monkeypatch):
    from titanmem.eval.runner import Evaluator

    def failing_eval(self, model, step):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory.")

    monkeypatch.setattr(Evaluator, "run", failing_eval)
    with pytest.raises(profiling.RunOutOfMemory, match="in the eval at step 2 .*eval.batch_size"):
        train(tmp_path, 3, eval={"interval": 2})
