"""Traces and memory snapshots on demand (`[profiling]`), as torchtitan users know them.

- Traces: torch.profiler records `profiler_active` steps (after `profiler_warmup` thrown-away ones) ending at every
  multiple of `profile_freq`, and each rank writes `<dump>/<save_traces_folder>/iteration_<step>/rank<r>.pt.trace.json`
  (Chrome trace JSON: Perfetto, chrome://tracing, TensorBoard's profiler plugin). A recorded step includes what the
  loop does after it: an eval or a checkpoint save at that step shows in its trace.
- Memory snapshots (CUDA): the caching allocator records its history from the start, and each rank pickles a
  snapshot every `profile_freq` steps and when the run runs out of memory, into
  `<dump>/<save_memory_snapshot_folder>/iteration_<step>[_oom]/rank<r>_memory_snapshot.pickle`
  (https://pytorch.org/memory_viz reads them).

Both are off by default, and then the training loop calls only no-op methods.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import torch

from titanmem.config.sections import Profiling

logger = logging.getLogger(__name__)

# Allocation events the allocator keeps; torchtitan's default, enough for many steps of a large model.
MEMORY_HISTORY_ENTRIES = 100_000


class RunOutOfMemory(RuntimeError):
    """The device ran out of memory; the message names the step, the snapshot (if one was taken) and what to try."""


class NoProfiler:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def step(self) -> None:
        return None


class StepProfiler:
    """torch.profiler over the training loop, its schedule aligned with the global step (also after a resume)."""

    def __init__(self, config: Profiling, dump_folder: str, rank: int, start_step: int):
        self.folder = Path(dump_folder) / config.save_traces_folder
        self.rank = rank
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        wait = config.profile_freq - config.profiler_warmup - config.profiler_active
        cycle = torch.profiler.schedule(wait=wait, warmup=config.profiler_warmup, active=config.profiler_active)
        self.freq, self.start_step = config.profile_freq, start_step
        # The profiler counts the steps it has seen; the schedule is read at the global step (that count plus the
        # step resumed from), so that a resumed run traces the same steps as an uninterrupted one.
        self.profiler = torch.profiler.profile(
            activities=activities,
            schedule=lambda seen: cycle(seen + start_step),
            on_trace_ready=self._save,
            record_shapes=True,
        )

    def __enter__(self):
        self.profiler.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.profiler.__exit__(*exc)

    def step(self) -> None:
        self.profiler.step()

    def _save(self, profiler) -> None:
        step = profiler.step_num + self.start_step
        if step % self.freq:
            # The run ended (or failed) inside a warm-up or recording window: a partial trace would mislead.
            if self.rank == 0:
                logger.info("profiler: the partial trace of the window ending at step %d is not saved", step)
            return
        folder = self.folder / f"iteration_{step}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"rank{self.rank}.pt.trace.json"
        profiler.export_chrome_trace(str(path))
        if self.rank == 0:
            logger.info("profile trace of step %d written to %s", step, path)


def step_profiler(config: Profiling, dump_folder: str, rank: int, start_step: int) -> StepProfiler | NoProfiler:
    return StepProfiler(config, dump_folder, rank, start_step) if config.enable_profiling else NoProfiler()


class NoMemorySnapshot:
    def step(self, step: int) -> None:
        return None

    def dump_oom(self, step: int) -> Path | None:
        return None

    def close(self) -> None:
        return None


def _cuda_memory_backend(device: torch.device):
    """(record history, take snapshot) of the CUDA caching allocator, or None off CUDA."""
    if device.type != "cuda":
        return None
    return torch.cuda.memory._record_memory_history, torch.cuda.memory._snapshot


class MemorySnapshot:
    def __init__(self, config: Profiling, dump_folder: str, rank: int, backend):
        self.folder = Path(dump_folder) / config.save_memory_snapshot_folder
        self.freq, self.rank = config.profile_freq, rank
        self.record, self.snapshot = backend
        self.record(max_entries=MEMORY_HISTORY_ENTRIES)

    def step(self, step: int) -> None:
        if step % self.freq == 0:
            self._dump(f"iteration_{step}")

    def dump_oom(self, step: int) -> Path:
        return self._dump(f"iteration_{step}_oom")

    def close(self) -> None:
        self.record(enabled=None)

    def _dump(self, name: str) -> Path:
        folder = self.folder / name
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"rank{self.rank}_memory_snapshot.pickle"
        with open(path, "wb") as handle:
            pickle.dump(self.snapshot(), handle)
        if self.rank == 0:
            logger.info("memory snapshot written to %s", path)
        return path


def memory_snapshot(config: Profiling, dump_folder: str, rank: int,
                    device: torch.device) -> MemorySnapshot | NoMemorySnapshot:
    if not config.enable_memory_snapshot:
        return NoMemorySnapshot()
    backend = _cuda_memory_backend(device)
    if backend is None:
        if rank == 0:
            logger.warning("profiling.enable_memory_snapshot needs a CUDA device; this run on %s takes none", device)
        return NoMemorySnapshot()
    return MemorySnapshot(config, dump_folder, rank, backend)


def out_of_memory(step: int, error: BaseException, snapshot_path: Path | None,
                  in_eval: bool = False) -> RunOutOfMemory:
    """The one-line error a run that ran out of device memory stops with."""
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    where = (f"memory snapshot in {snapshot_path} (open it at https://pytorch.org/memory_viz)" if snapshot_path
             else "set profiling.enable_memory_snapshot = true to record where the memory went")
    if in_eval:
        return RunOutOfMemory(f"out of device memory in the eval at step {step} ({first_line}); {where}. Lower "
                              "eval.batch_size")
    return RunOutOfMemory(
        f"out of device memory at step {step} ({first_line}); {where}. Lower training.local_batch_size, set "
        "activation_checkpoint.mode, or check the plan's memory with titanmem-plan")
