"""What checkpoint manifests cost: the checksums of a save and the verification of a resume, on this machine.

For each config: train 2 steps and save; then resume three times from that save (verified, unverified, verified),
each after evicting the checkpoint's files from the page cache, so that every load reads from disk. Prints a table
of save time (and its checksums) and cold load time (and its verification). docs/benchmarks.md has a run.

    python tools/bench_checkpoint.py --work /tmp/ck \
        --run "llama_134m_memory --memory.n_keys 2048" --run "llama_1.3b_memory --training.local_batch_size 2"
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import titanmem.components.checkpoint as checkpoint  # noqa: E402
from titanmem.train import main as train  # noqa: E402

TIMES: dict[str, list[float]] = {}


def timed(name: str, function):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            TIMES.setdefault(name, []).append(time.perf_counter() - start)
    return wrapper


def evict(folder: Path) -> None:
    """Drop the folder's files from the page cache (they are on disk: DCP and the manifest fsync them)."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def measure(config: str, extra: list[str], work: Path) -> tuple[float, float, float, float, float, float]:
    folder = work / config
    shutil.rmtree(folder, ignore_errors=True)
    common = ["--job.config_file", f"train_configs/{config}.toml", "--job.dump_folder", str(folder), *extra,
              "--checkpoint.interval", "2", "--checkpoint.keep_latest_k", "2", "--metrics.enable_tensorboard",
              "false", "--data.num_workers", "0", "--eval.interval", "0"]
    TIMES.clear()
    assert train([*common, "--training.steps", "2"]) == 0
    save, sums = TIMES["save"][0], TIMES["checksums"][0]
    step = folder / "checkpoint" / "step-2"
    size = sum(p.stat().st_size for p in step.iterdir())
    loads: dict[str, list[tuple[float, float]]] = {"true": [], "false": []}
    for verify in ("true", "false", "true"):
        evict(step)
        TIMES.clear()
        assert train([*common, "--training.steps", "3", "--checkpoint.verify_on_load", verify]) == 0
        shutil.rmtree(folder / "checkpoint" / "step-3")
        loads[verify].append((TIMES["load"][0], TIMES.get("verify", [0.0])[0]))
    verified, unverified = min(loads["true"]), loads["false"][0]
    shutil.rmtree(folder, ignore_errors=True)
    return size / 1e9, save, sums, verified[0], verified[1], unverified[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", required=True,
                        help="a train_configs name, then config overrides, as one quoted string; repeatable")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_checkpoint"),
                        help="scratch folder (twice the checkpoint size free)")
    args = parser.parse_args()
    checkpoint.file_digests = timed("checksums", checkpoint.file_digests)
    checkpoint.checkpoint_problems = timed("verify", checkpoint.checkpoint_problems)
    checkpoint.CheckpointManager.save = timed("save", checkpoint.CheckpointManager.save)
    checkpoint.CheckpointManager.load = timed("load", checkpoint.CheckpointManager.load)
    rows = []
    for run in args.run:
        config, *extra = shlex.split(run)
        rows.append((run, *measure(config, extra, args.work)))
    print("| run | checkpoint GB | save s | of which checksums s | cold load, verified s | of which verification s "
          "| cold load, unverified s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for run, gb, save, sums, load, verify, unverified in rows:
        print(f"| {run} | {gb:.1f} | {save:.2f} | {sums:.2f} | {load:.2f} | {verify:.2f} | {unverified:.2f} |")


if __name__ == "__main__":
    main()
