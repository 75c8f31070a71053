"""Kill training at chosen or random points and check that a relaunch recovers exactly.

    python -m tools.drills.crash_test                                  # 20 random crash points
    python -m tools.drills.crash_test --random 50 --seed 3
    python -m tools.drills.crash_test --points step:3 save:written:4 save:background:6:async [--steps 8 --interval 2]
    python -m tools.drills.crash_test ... -- --memory.enabled           # after --, overrides for every launch
    python -m tools.drills.crash_test --nproc 2 ... -- --parallelism.value_slice_sharding rows   # gloo ranks (torchrun)
    python -m tools.drills.crash_test --nproc 2 --points step:3@1      # only rank 1 is killed

Each crash is `point:step[:sync|async][@rank]` (points: titanmem/components/faults.py). For each, a fresh run is
launched with TITANMEM_CRASH_AT, which SIGKILLs the process there, and then relaunched with the same command until it
finishes. With `--nproc N` every launch is a torchrun of N gloo CPU ranks (`python -m titanmem.launch`, as
run_train.sh starts them), each of which kills itself at the point (as a node that loses power takes all its ranks),
or with `@rank` only that one (as one process killed by the OOM killer), and the launch must end promptly (the others
do not wait for it). The check, in deterministic mode on CPU:
- the relaunch resumes from the newest complete checkpoint the crash left on disk, and that one is a checkpoint that
  may be complete at that crash (a save killed before its rename is not; an async save becomes complete in the
  background as soon as it is written, so a crash after it finds it complete or not, by how far its thread got);
- every loss the relaunch logs equals the uninterrupted run's bit for bit (TensorBoard's float32 values).
Prints one markdown row per crash and exits 1 if any fails.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from titanmem.components.faults import POINTS

ROOT = Path(__file__).resolve().parents[2]


NPROC = 1
"""Ranks per launch (`--nproc`): one process, or a torchrun of that many gloo ranks."""

LAUNCH_GRACE_SECONDS = 30
"""A killed launch must end within this much more than a whole uninterrupted run took: the ranks left alive must not
wait for the dead one (torch's own timeouts are minutes)."""


def launch(folder: Path, name: str, steps: int, interval: int, mode: str, extra: list[str],
           crash: str | None = None, rank: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    for fault in ("TITANMEM_CRASH_AT", "TITANMEM_FAULT_RANK"):
        env.pop(fault, None)
    if crash:
        env["TITANMEM_CRASH_AT"] = crash
    if rank is not None:
        env["TITANMEM_FAULT_RANK"] = str(rank)
    runner = ([sys.executable, "-m", "titanmem.launch", "--standalone", "--nproc_per_node", str(NPROC)]
              if NPROC > 1 else [sys.executable])
    command = [*runner, "-m", "titanmem.train", "--job.dump_folder", str(folder), "--training.steps",
               str(steps), "--training.deterministic", "--training.device", "cpu", "--checkpoint.interval",
               str(interval), "--checkpoint.keep_latest_k", "0", "--checkpoint.async_mode", mode,
               "--metrics.log_freq", "1", "--metrics.save_tb_folder", name, *extra]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def losses(folder: Path, name: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[int, float] = {}
    for run in sorted((folder / name).iterdir()):
        events = EventAccumulator(str(run), size_guidance={"scalars": 0})
        events.Reload()
        if "loss" in events.Tags()["scalars"]:
            found.update({event.step: event.value for event in events.Scalars("loss")})
    return found


def possible_resumes(point: str, step: int, interval: int, mode: str) -> set[int]:
    """The checkpoints that may be the newest complete one when the process dies at (point, step)."""
    if point in ("save:renamed", "resumed"):
        return {step}
    if point == "save:written":
        return {step - interval}  # this sync save never completed; the one before it did
    if point == "save:background":
        # Its thread may finish the save (a tiny one) before the main thread reaches the crash; the save before it
        # was waited for.
        return {step - interval, step}
    last_save = (step - 1) // interval * interval  # `step`: killed after the step, before its own save
    # The last async save may still be in flight; the one before it was waited for by the last one.
    return {max(last_save - interval, 0), last_save} if mode == "async" else {last_save}


def newest_complete(folder: Path) -> int:
    from titanmem.components.checkpoint import complete_checkpoint_steps

    steps = complete_checkpoint_steps(folder / "checkpoint") if (folder / "checkpoint").is_dir() else []
    return steps[-1] if steps else 0


def parse(crash: str) -> tuple[str, int, str, int | None]:
    """`point:step[:sync|async][@rank]` -> (point, step, mode, rank); a bare save point gets the only mode it exists
    in; no rank kills every rank."""
    crash, _, rank = crash.partition("@")
    if rank and not (rank.isdigit() and int(rank) < NPROC):
        raise SystemExit(f"error: bad rank in {crash}@{rank}: a launch has ranks 0 to {NPROC - 1} (--nproc)")
    parts = crash.split(":")
    take = 2 if parts[0] == "save" else 1
    point, rest = ":".join(parts[:take]), parts[take:]
    if point not in POINTS or not rest or not rest[0].isdigit() or rest[1:] not in ([], ["sync"], ["async"]):
        raise SystemExit(f"error: bad crash {crash!r}; expected point:step[:sync|async] with point one of {POINTS}")
    mode = rest[1] if len(rest) > 1 else ("async" if point == "save:background" else "sync")
    if (point, mode) in (("save:written", "async"), ("save:background", "sync")):
        raise SystemExit(f"error: {point} happens in {'sync' if mode == 'async' else 'async'} saves only")
    return point, int(rest[0]), mode, int(rank) if rank else None


def run_crash(folder: Path, crash: str, steps: int, interval: int, extra: list[str], reference: dict[int, float],
              whole_run_seconds: float):
    point, step, mode, rank = parse(crash)
    dcp_mode = "async" if mode == "async" else "disabled"
    if point == "resumed":  # a run that reached the checkpoint first, then a relaunch killed as it resumes
        first = launch(folder, "tb0", step, interval, dcp_mode, extra)
        if first.returncode != 0:
            return crash, mode, "first run failed", first.stderr[-2000:]
    started = time.monotonic()
    killed = launch(folder, "tb1", steps, interval, dcp_mode, extra, crash=f"{point}:{step}", rank=rank)
    ended_in = time.monotonic() - started
    # torchrun's launch names the rank a signal ended in its last line, and exits 1.
    died = killed.returncode == -9 if NPROC == 1 else killed.returncode != 0 and "SIGKILL" in killed.stderr
    if not died:
        return crash, mode, f"not killed (exit {killed.returncode})", killed.stderr[-2000:]
    if ended_in > whole_run_seconds + LAUNCH_GRACE_SECONDS:
        return crash, mode, f"the killed launch took {ended_in:.0f} s to end", killed.stderr[-2000:]
    on_disk = newest_complete(folder)
    relaunch = launch(folder, "tb2", steps, interval, dcp_mode, extra)
    if relaunch.returncode != 0:
        return crash, mode, f"relaunch failed (exit {relaunch.returncode})", relaunch.stderr[-2000:]
    possible = possible_resumes(point, step, interval, mode)
    said = re.search(r"resumed at step (\d+)|starting at step 0", relaunch.stderr)
    resumed = int(said.group(1)) if said and said.group(1) else 0
    got = losses(folder, "tb2")
    expected_steps = list(range(resumed + 1, steps + 1))
    problems = []
    if on_disk not in possible:
        problems.append(f"the crash left step-{on_disk} the newest complete checkpoint, expected one of "
                        f"{sorted(possible)}")
    if resumed != on_disk:
        problems.append(f"resumed at {resumed}, but step-{on_disk} was the newest complete checkpoint")
    if sorted(got) != expected_steps:
        problems.append(f"logged steps {sorted(got)}")
    unequal = [s for s in expected_steps if got.get(s) != reference[s]]
    if unequal:
        problems.append(f"losses differ at steps {unequal}")
    return crash, mode, f"resumed at {resumed}, {len(expected_steps)} losses bit-identical (the killed launch ended " \
        f"in {ended_in:.0f} s)" if not problems else "; ".join(problems), ""


def random_crashes(count: int, steps: int, interval: int, rng: random.Random) -> list[str]:
    saves = sorted({s for s in range(interval, steps + 1, interval)} | {steps})
    crashes = []
    for _ in range(count):
        point = rng.choice(POINTS)
        mode = rng.choice(("sync", "async"))
        if point == "save:written":
            mode = "sync"
        if point == "save:background":
            mode = "async"
        step = rng.choice(saves[:-1] if point.startswith("save") or point == "resumed" else range(2, steps))
        # With several ranks, half the crashes kill one of them only.
        one = f"@{rng.randrange(NPROC)}" if NPROC > 1 and rng.random() < 0.5 else ""
        crashes.append(f"{point}:{step}:{mode}{one}")
    return crashes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--points", nargs="*", help="crashes as point:step[:sync|async][@rank]")
    parser.add_argument("--random", type=int, default=20, help="random crashes when --points is not given")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--interval", type=int, default=2)
    parser.add_argument("--work", help="folder for the runs (default: a temporary one)")
    parser.add_argument("--nproc", type=int, default=1, help="gloo CPU ranks per launch, under torchrun")
    args, extra = parser.parse_known_args()
    global NPROC
    NPROC = args.nproc
    extra = [a for a in extra if a != "--"]
    crashes = args.points or random_crashes(args.random, args.steps, args.interval, random.Random(args.seed))
    work = Path(args.work or tempfile.mkdtemp(prefix="titanmem-crash-"))
    started = time.monotonic()
    straight = launch(work / "uninterrupted", "tb", args.steps, args.interval, "disabled", extra)
    whole_run_seconds = time.monotonic() - started
    if straight.returncode != 0:
        print(straight.stderr[-3000:], file=sys.stderr)
        return 1
    reference = losses(work / "uninterrupted", "tb")
    print("| crash (point:step) | save mode | result |")
    print("| --- | --- | --- |")
    failed = 0
    for number, crash in enumerate(crashes):
        folder = work / f"{number:02d}-{crash.replace(':', '_')}"  # a random draw may repeat a crash
        name, mode, result, log = run_crash(folder, crash, args.steps, args.interval, extra, reference,
                                            whole_run_seconds)
        ok = "bit-identical" in result
        failed += not ok
        print(f"| {name} | {mode} | {result} |", flush=True)
        if not ok and log:
            print(log, file=sys.stderr)
    print(f"\n{len(crashes) - failed} of {len(crashes)} crashes recovered exactly (work folder {work})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
