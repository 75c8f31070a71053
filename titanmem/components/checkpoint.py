"""Distributed checkpoints (DCP) in `step-N` folders that are either complete or ignored.

A save writes into `step-N.partial`, and only after every rank has finished is it renamed to `step-N`; a rename is
atomic, so a crash at any moment leaves either the old set of checkpoints or the old set plus one complete new one.
Resume picks the newest `step-N` that holds DCP's `.metadata` file. With `async_mode`, training goes on while a
background thread writes the save, sums its files and, once every rank has done so, makes it complete (the manifest,
then the rename); the next save and the end of training wait for that thread only if it is still busy.

`CheckpointManager` takes a mapping of named Stateful objects (model, optimizers, lr schedule, data loader, RNG,
counters) and knows nothing else about them: adding state to a checkpoint is adding one entry. Every entry must be a
tensor (plain data goes in as a JSON record), and reading goes through `titanmem.components.checkpoint_io`, so a
checkpoint cannot carry code. Entries under an `optional` prefix may be missing from a checkpoint (another value
optimizer, more data-parallel ranks than saved): they start fresh, with a warning. Any other missing entry is an error.

Going back to an older checkpoint (`checkpoint.load_step`) starts a new timeline: the newer checkpoints are renamed
out of its way, kept. Each checkpoint records in `timeline.json` the steps its history went back to, so that a
relaunch of the same command (a requeued job) recognises the timeline it started and goes on from that timeline's
newest checkpoint instead of going back again (`continues_rollback`).

Reading a run without training it (eval, generate) uses `load_model_weights`, which never writes to the run's folder.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Iterable, Protocol

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from titanmem.components.checkpoint_io import error_cause, error_reason, flatten, load_tensors, saved_shapes
from titanmem.components.disk_space import free_bytes
from titanmem.components.export import is_export, load_export
from titanmem.components.hf_checkpoint import is_hf_folder, load_hf_folder
from titanmem.components.faults import crash_point
from titanmem.components.manifest import (
    MANIFEST, TIMELINE, file_digests, files_of_rank, read_manifest, uncovered_files, verify_files, write_json_to_disk,
    write_manifest,
)
from titanmem.components.staging import CpuStager
from titanmem.components.summing_writer import SummingWriter
from titanmem.config.errors import ConfigError
from titanmem.config.sections import Checkpoint as CheckpointConfig

logger = logging.getLogger(__name__)

# Single-process runs save without a process group on purpose; DCP warns about that on every call.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

_STEP_FOLDER = re.compile(r"^step-(\d+)$")
# Debris of a crash: a save that never completed, a delete that never finished (`.deleting`, `.deleting.2`, …).
_DEBRIS = re.compile(r"^step-\d+\.(partial|deleting(\.\d+)?)$")


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def complete_checkpoint_steps(folder: str | Path) -> list[int]:
    """Steps of the complete checkpoints in `folder`, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    steps = []
    for entry in folder.iterdir():
        match = _STEP_FOLDER.match(entry.name)
        if match and (entry / ".metadata").is_file():
            steps.append(int(match.group(1)))
    return sorted(steps)


def checkpoint_folder(config: CheckpointConfig, dump_folder: str) -> Path:
    return Path(dump_folder) / config.folder


def checkpoint_problems(path: str | Path) -> list[str]:
    """What is wrong with the files of the checkpoint at `path` against its manifest (empty when nothing is), the
    same list on every rank. Each rank checks a share of the files."""
    try:
        files = read_manifest(path)
    except ValueError as e:
        return [str(e)]
    if files is None:
        logger.warning("%s has no manifest (saved before titanmem wrote them): loading it unverified", path)
        return []
    uncovered = uncovered_files(path, files)
    if uncovered:
        return [f"{MANIFEST} does not list {', '.join(uncovered[:3])}" + (" …" if len(uncovered) > 3 else "")]
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    problems = verify_files(path, files, sorted(files)[rank::world])
    if world > 1:
        shares: list = [None] * world
        dist.all_gather_object(shares, problems)
        problems = [problem for share in shares for problem in share]
    return problems


def _damage(path: str | Path, problems: list[str]) -> str:
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"{path} is damaged: {problems[0]}{more}"


def load_model_weights(model: torch.nn.Module, path: str | Path, field: str = "checkpoint.folder",
                       verify: bool = True, threads: int = 1) -> None:
    """Only the model's weights from a checkpoint folder, an exported one or a Hugging Face Llama folder, resharded to
    `model`'s plan, read by `threads` threads per rank; reads, never writes. A damaged checkpoint stops with a config
    error in `field`."""
    if is_hf_folder(path):
        load_hf_folder(model, path, field)
        return
    if is_export(path):
        load_export(model, path)
        return
    if not (Path(path) / ".metadata").is_file():
        raise ConfigError(field, f"{path} is not a complete checkpoint (no .metadata file)")
    if verify and (problems := checkpoint_problems(path)):
        raise ConfigError(field, f"{_damage(path, problems)}; read an earlier one (checkpoint.load_step)")
    state = {"model": get_model_state_dict(model)}
    load_tensors(state, path, threads)
    set_model_state_dict(model, state["model"])


def saved_step(path: str | Path) -> int:
    """The training step a `step-N` folder or an exported one holds (-1 when an export does not say)."""
    if is_hf_folder(path):
        return -1
    if is_export(path):
        return int(json.loads((Path(path) / "config.json").read_text()).get("step", -1))
    return int(Path(path).name.removeprefix("step-"))


def rollbacks_of(path: str | Path) -> list[int] | None:
    """The steps that the timeline of the checkpoint at `path` went back to with `checkpoint.load_step`, oldest first;
    [] for a checkpoint saved before titanmem recorded them, None when its record cannot be read."""
    record = Path(path) / TIMELINE
    if not record.exists():
        return []
    try:
        rollbacks = json.loads(record.read_bytes())["rollbacks"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None
    if not isinstance(rollbacks, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in rollbacks):
        return None
    return rollbacks


def continues_rollback(folder: str | Path, steps: list[int], load_step: int) -> int | None:
    """The step of the newest complete checkpoint in `folder` (of `steps`, its complete ones) when it is newer than
    `load_step` and its timeline last went back to `load_step`: the command that went back there is launched again
    (a requeued job), and goes on from that timeline's newest checkpoint. None when `load_step` starts a new timeline
    (never gone back to, or another rollback came after it)."""
    if not steps or steps[-1] <= load_step:
        return None
    newest = Path(folder) / f"step-{steps[-1]}"
    rollbacks = rollbacks_of(newest)
    if rollbacks is None:
        raise ConfigError("checkpoint.load_step", f"{newest / TIMELINE} cannot be read, so it is unknown whether "
                          f"{newest.name} continues the timeline that went back to step-{load_step}; resume from it "
                          f"with checkpoint.load_step -1 (which checks it), or move it aside to go back to "
                          f"step-{load_step}")
    return steps[-1] if rollbacks and rollbacks[-1] == load_step else None


def resume_hint(folder: str | Path) -> str:
    """Where a relaunch of a run that stopped goes on from: its newest complete checkpoint in `folder`, or the start."""
    folder = Path(folder)
    steps = complete_checkpoint_steps(folder) if folder.is_dir() else []
    return (f"the newest complete checkpoint is step-{steps[-1]}, which relaunching the same command resumes from"
            if steps else "there is no complete checkpoint yet: a relaunch starts afresh")


def _free_name(path: Path) -> Path:
    """`path`, or `path.2`, `path.3`, … : the first that does not exist."""
    candidate, number = path, 1
    while os.path.lexists(candidate):
        number += 1
        candidate = path.with_name(f"{path.name}.{number}")
    return candidate


def _set_aside(path: Path, suffix: str) -> Path:
    """Rename `path` to `<path><suffix>`, or the first free `.2`, `.3`, … of it (an earlier one is kept); its new
    path."""
    aside = _free_name(path.with_name(path.name + suffix))
    os.replace(path, aside)
    return aside


def _barrier(group=None) -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier(group=group)


class CheckpointWriteError(RuntimeError):
    """A save failed to write (full disk, quota, permission, a vanished folder); the message is the one line to show.
    Nothing is lost: the partial folder is removed, and the newest complete checkpoint is what a relaunch resumes."""


class CheckpointManager:
    def __init__(self, config: CheckpointConfig, folder: str | Path, states: dict[str, Stateful], *,
                 total_steps: int, rank: int = 0, optional: Iterable[str] = (), comm_timeout_seconds: float = 1800):
        self.config = config
        self.folder = Path(folder)
        self.states = states
        self.total_steps = total_steps
        self.rank = rank
        self.optional = tuple(optional)
        # The background save's own process group waits this long for a rank before failing the save.
        self.comm_timeout_seconds = comm_timeout_seconds
        self.last_saved_step = -1
        # One checkpoint's expected size (`disk_space.checkpoint_bytes`), told in the line of a save that ran out of space.
        self.expected_bytes: int | None = None
        # The steps this run's timeline went back to (`rollbacks_of`), recorded in every checkpoint it saves.
        self.rollbacks: list[int] = []
        # A background save: its step, and its write, checksums and completion.
        self._pending: tuple[int, Future] | None = None
        self._summer: ThreadPoolExecutor | None = None
        self._stager = None
        self._process_group = None
        if config.async_mode != "disabled":
            self._start_async()
        elif config.sync_staging == "pinned":
            self._stager = CpuStager(pinned=True)

    def _start_async(self) -> None:
        if dist.is_available() and dist.is_initialized():
            # The background thread's collectives get a group of their own (gloo: DCP's writes go through the CPU),
            # so that they never interleave with the training step's.
            self._process_group = dist.new_group(backend="gloo",
                                                 timeout=timedelta(seconds=self.comm_timeout_seconds))
        # Kept from save to save, so that pinned buffers are allocated once.
        self._stager = CpuStager(pinned=self.config.async_mode == "async_with_pinned_mem")
        self._summer = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-checksums")

    def _state_dict(self) -> dict:
        state = {name: stateful.state_dict() for name, stateful in self.states.items()}
        for key, value in flatten(state).items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"checkpoint entry {key} is a {type(value).__name__}, not a tensor; encode plain data "
                                "with titanmem.components.records")
        return state

    def save(self, step: int) -> Path:
        """Write the checkpoint of `step` (in the background with `async_mode`); returns its final folder. A write that
        fails (a full disk, a lost permission, a vanished folder) raises `CheckpointWriteError`, its partial folder
        removed; so does a background save's, at the next save or at `wait`."""
        start = time.perf_counter()
        self.wait()
        partial = self.folder / f"step-{step}.partial"
        try:
            if self.rank == 0:
                self.folder.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(partial, ignore_errors=True)
        except OSError as e:
            raise self._write_failure(step, e) from None
        _barrier()
        self.last_saved_step = step
        writer = self._writer(partial)
        if self.config.async_mode == "disabled":
            state = self._state_dict()
            try:
                dcp.save(self._stager.stage(state) if self._stager is not None else state, storage_writer=writer)
                digests = self._own_digests(partial, writer)
                crash_point("save:written", step)
                self._complete(step, digests)
            except (OSError, CheckpointException) as e:
                raise self._write_failure(step, e) from None
            logger.info("saved checkpoint step-%d; training waited %.2f s", step, time.perf_counter() - start)
        else:
            write = dcp.async_save(self._state_dict(), storage_writer=writer, process_group=self._process_group,
                                   async_stager=self._stager)
            self._pending = (step, self._summer.submit(self._finish_in_background, step, write, partial, writer))
            crash_point("save:background", step)
            logger.info("checkpoint step-%d copied for writing in the background; training waited %.2f s", step,
                        time.perf_counter() - start)
        return self.folder / f"step-{step}"

    def _writer(self, partial: Path) -> SummingWriter:
        # Each thread writes a file of its own, summed as it goes; the files are fsynced before the save can complete.
        return SummingWriter(str(partial), thread_count=self.config.io_threads, sync_files=True)

    def _finish_in_background(self, step: int, write: Future, partial: Path, writer: SummingWriter) -> None:
        """The background thread's part of an async save: the write, this rank's checksums, and the completion, which
        waits for every rank's (`_complete` gathers them over the save's own process group, so that training's
        collectives never wait on it). A crash at any point before the rename leaves the previous checkpoint the
        newest complete one."""
        start = time.perf_counter()
        write.result()
        self._complete(step, self._own_digests(partial, writer))
        logger.info("checkpoint step-%d complete: written in the background in %.2f s", step,
                    time.perf_counter() - start)

    def wait(self) -> None:
        """Let a background save finish; it is a complete checkpoint when this returns."""
        if self._pending is None:
            return
        step, finished = self._pending
        self._pending = None
        start = time.perf_counter()
        try:
            finished.result()
        except (OSError, CheckpointException) as e:
            raise self._write_failure(step, e) from None
        waited = time.perf_counter() - start
        if waited > 0.01:
            logger.info("training waited %.2f s for the background save of step-%d to finish", waited, step)

    def _write_failure(self, step: int, error: BaseException) -> "CheckpointWriteError":
        """The one line that ends a run whose save failed, after removing what the save left: what failed, where, the
        space it needed against what is free, and the checkpoint a relaunch resumes from."""
        if self.rank == 0:
            shutil.rmtree(self.folder / f"step-{step}.partial", ignore_errors=True)
        cause = error_cause(error, OSError)
        reason = cause.strerror if cause is not None and cause.strerror else error_reason(error)
        space = ""
        if cause is not None and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            needed = f"about {self.expected_bytes / 1e9:.2f} GB" if self.expected_bytes else "more"
            space = f" (a checkpoint needs {needed}; {free_bytes(self.folder) / 1e9:.2f} GB are free there)"
        return CheckpointWriteError(f"checkpoint step-{step} could not be written to {self.folder}: {reason}{space}; "
                                    f"{resume_hint(self.folder)} once that is fixed")

    def _own_digests(self, partial: Path, writer: SummingWriter) -> dict[str, dict]:
        """Checksums of the files this rank wrote into `partial`: those the writer summed as it wrote them, where the
        file on disk has the size it wrote; the others summed by reading them."""
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        names = files_of_rank(partial, rank)
        summed = {name: digest for name in names if (digest := writer.digests.get(name)) is not None
                  and digest["size"] == (partial / name).stat().st_size}
        return {**summed, **file_digests(partial, [name for name in names if name not in summed])}

    def _complete(self, step: int, digests: dict[str, dict]) -> None:
        """Rank 0 gathers every rank's checksums into the manifest, renames the finished `step-N.partial` to
        `step-N`, and drops what is beyond keep_latest_k."""
        final, partial = self.folder / f"step-{step}", self.folder / f"step-{step}.partial"
        gathered = [digests]
        if dist.is_available() and dist.is_initialized():
            gathered = [None] * dist.get_world_size() if self.rank == 0 else None
            # Also the barrier after every rank's write: no rank's checksums exist before its write is done.
            dist.gather_object(digests, gathered, dst=0, group=self._process_group)
        if self.rank == 0:
            write_json_to_disk(partial / TIMELINE, {"rollbacks": self.rollbacks})
            write_manifest(partial, {name: d for share in gathered for name, d in share.items()})
            if final.exists():
                # Not a complete checkpoint of this timeline (those newer than the resumed step were set aside): a
                # folder left by hand, say. Kept, out of the way.
                aside = _set_aside(final, ".replaced")
                logger.warning("set aside %s as %s to save step %d", final, aside.name, step)
            os.replace(partial, final)
            self._fsync_folder()
            crash_point("save:renamed", step)
            self._purge_old()
        _barrier(self._process_group)

    def close(self) -> None:
        """Finish a background save and release the staging buffers (also when that save failed)."""
        try:
            self.wait()
        finally:
            if self._stager is not None:
                self._stager.close()
                self._stager = None
            if self._summer is not None:
                self._summer.shutdown()
            self._summer = None

    def due(self, step: int) -> bool:
        """Whether step `step` is one to save."""
        return (self.config.enable and step != self.last_saved_step
                and (step % self.config.interval == 0 or step == self.total_steps))

    def load(self, path: Path | None, fall_back: bool = True, load_step: int = -1) -> int | None:
        """Restore every state from the complete checkpoint at `path` (the run plan's choice); returns its step, or
        None for a fresh start. A damaged checkpoint is set aside as `step-N.damaged` and, with `fall_back`, the
        complete one before it is loaded instead.

        `load_step` (training's `checkpoint.load_step`; -1 for none) is the step this run's timeline goes back to.
        When `path` is its checkpoint, this launch goes back there: the newer checkpoints are set aside, and a damaged
        one is an error (the user named it). Otherwise `path` is newer, saved after an earlier launch of the same
        command went back there, and a fall back stops at `load_step`. Either way the saves to come record it."""
        if path is None:
            return None
        start = time.perf_counter()
        path = Path(path)
        goes_back = load_step != -1 and saved_step(path) == load_step
        self._agree_across_ranks(path, fall_back, load_step)
        if self.config.verify_on_load:
            path = self._intact(path, fall_back and not goes_back, floor=max(load_step, 0))
        step = saved_step(path)
        state = self._state_dict()
        self._match_saved(state, saved_shapes(path), path)
        load_tensors(state, path, self.config.io_threads)
        for name, stateful in self.states.items():
            if name in state:
                stateful.load_state_dict(state[name])
        # Another run's checkpoint (`initial_load_path`) starts this run's timeline afresh.
        rollbacks = rollbacks_of(path) if path.parent.resolve() == self.folder.resolve() else []
        if rollbacks is None:
            logger.warning("%s cannot be read: the steps this timeline went back to before are forgotten", path /
                           TIMELINE)
        self.rollbacks = rollbacks or []
        # Loaded at load_step itself (going back, or falling back to it), the record is the one from before going
        # back there; every checkpoint newer than load_step in this timeline already ends with it.
        if load_step != -1 and self.rollbacks[-1:] != [load_step]:
            self.rollbacks.append(load_step)
        if goes_back and self.rank == 0:
            self._set_aside_newer_than(step)
        self.last_saved_step = step
        logger.info("resumed from %s in %.2f s", path, time.perf_counter() - start)
        return step

    def _agree_across_ranks(self, path: Path, fall_back: bool, load_step: int) -> None:
        """Every rank planned its load from its own view of the folder: they must have planned the same."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        planned = (str(path), fall_back, load_step)
        views: list = [None] * dist.get_world_size()
        dist.all_gather_object(views, planned)
        if any(view != planned for view in views):
            others = sorted({view[0] for view in views})
            raise ConfigError("checkpoint.folder", f"the ranks would load different checkpoints ({', '.join(others)}): "
                              f"their nodes see {self.folder} differently; make it one shared folder that every "
                              "node sees the same")

    def _intact(self, path: Path, fall_back: bool, floor: int = 0) -> Path:
        """`path`, or with `fall_back` the newest intact complete checkpoint of this run before it, from `floor` on."""
        # Listed before anything is set aside, so that every rank walks the same list.
        earlier = [self.folder / f"step-{s}" for s in reversed(complete_checkpoint_steps(self.folder))
                   if floor <= s < saved_step(path)] if fall_back and path.parent == self.folder else []
        for candidate in [path, *earlier]:
            # Named before the ranks compare their checks, so that rank 0's rename cannot change another rank's name.
            aside = _free_name(candidate.with_name(candidate.name + ".damaged"))
            problems = checkpoint_problems(candidate)
            if not problems:
                return candidate
            damage = _damage(candidate, problems)
            if not fall_back:
                raise ConfigError("checkpoint.folder", damage)
            # Out of the way of the next resume, and kept for a look (beside any earlier damaged copy of the step).
            if self.rank == 0:
                os.replace(candidate, aside)
            damage += f"; set aside as {aside.name}"
            logger.warning("%s", damage)
        raise ConfigError("checkpoint.folder", f"no intact checkpoint is left to resume from ({damage}); restore one, "
                          "or start afresh in a new job.dump_folder")

    def _match_saved(self, state: dict, saved: dict, path: Path) -> None:
        """Fit the load template to the checkpoint: optional entries it lacks are dropped (they start fresh), and
        records take their saved length. (`load_tensors` then refuses any other difference.)"""
        fresh: set[str] = set()
        for key in flatten(state):
            prefix = next((p for p in self.optional if key == p or key.startswith(p + ".")), None)
            if key in saved or prefix is None:
                continue
            what = key[len(prefix) + 1 :].split(".", 1)[0]
            fresh.add(f"{prefix} state for {what}" if what else prefix)
            _pop(state, key)
        for what in sorted(fresh):
            logger.warning("%s has no %s; it starts fresh", path, what)
        for key, value in flatten(state).items():
            shape = saved.get(key)
            if shape is None:
                continue  # missing, or a pickled entry: the loader refuses both
            if value.dtype == torch.uint8 and value.ndim == 1 and tuple(shape) != tuple(value.shape):
                _set(state, key, torch.empty(tuple(shape), dtype=torch.uint8))

    def _set_aside_newer_than(self, step: int) -> None:
        """Resuming training from an older checkpoint (`load_step`) starts a new timeline: the newer checkpoints are
        renamed out of the way (kept, not deleted), so that a plain relaunch later continues this timeline and not the
        abandoned one. Going back to the same step twice keeps both abandoned timelines (`.abandoned-at-N.2`)."""
        for newer in [s for s in complete_checkpoint_steps(self.folder) if s > step]:
            source = self.folder / f"step-{newer}"
            target = _set_aside(source, f".abandoned-at-{step}")
            logger.warning("set aside %s as %s: this run resumes from step-%d", source.name, target.name, step)

    def _purge_old(self) -> None:
        """Drop checkpoints beyond keep_latest_k, and debris of earlier crashes (partial saves, interrupted deletes)."""
        for debris in self.folder.iterdir():
            if _DEBRIS.match(debris.name):
                shutil.rmtree(debris, ignore_errors=True)
        if self.config.keep_latest_k <= 0:
            return
        for step in complete_checkpoint_steps(self.folder)[: -self.config.keep_latest_k]:
            self._remove(self.folder / f"step-{step}")

    @staticmethod
    def _remove(path: Path) -> None:
        # Rename first, so a crash mid-delete never leaves a half-deleted folder that still looks complete. (An
        # earlier delete that could not finish keeps its name; the next purge tries it again.)
        shutil.rmtree(_set_aside(path, ".deleting"), ignore_errors=True)

    def _fsync_folder(self) -> None:
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _walk(state: dict, key: str) -> tuple[dict, str]:
    """The dict that holds the leaf of dotted `key`, and the leaf's own key (leaf keys may contain dots)."""
    node = state
    while key not in node:
        head = next(k for k in node if isinstance(node[k], dict) and key.startswith(k + "."))
        node, key = node[head], key[len(head) + 1 :]
    return node, key


def _pop(state: dict, key: str) -> None:
    node, leaf = _walk(state, key)
    del node[leaf]


def _set(state: dict, key: str, value: torch.Tensor) -> None:
    node, leaf = _walk(state, key)
    node[leaf] = value
