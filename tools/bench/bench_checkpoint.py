"""Checkpoint I/O on this machine: the disk's sequential rates, and what a save and a resume take against them.

With `--disk GB`, first the disk under `--work`: GB written in 1 and in 8 files at once (buffered, then fsynced) and
read back cold. Then for each config: train 2 steps and save; then resume three times from that save (verified,
unverified, verified), each after evicting the checkpoint's files from the page cache, so that every load reads from
disk. Prints a table of save time (and the checksums it read back), cold load time (and its verification), and the
rates. Thread counts and async modes are config overrides of the run. `--state GB` saves and cold-loads a synthetic
state of that size shaped like a 1.3b Memory+ run's, with each of `--threads` writer and reader threads, copied off
the GPU by the writer threads or staged into pinned buffers first. docs/benchmarks.md has runs.

    python -m tools.bench.bench_checkpoint --work /tmp/ck --disk 6 --state 25 --threads 1 8 16
    python -m tools.bench.bench_checkpoint --work /tmp/ck --disk 16 \
        --run "llama_1.3b_memory --checkpoint.io_threads 1" --run "llama_1.3b_memory --checkpoint.io_threads 8"
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import time
from pathlib import Path

import torch

import titanmem.components.checkpoint as checkpoint
from titanmem.train import main as train

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
            evict_file(path)


def evict_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def disk_rates(work: Path, gigabytes: float, files: int) -> tuple[float, float]:
    """GB/s writing `gigabytes` of random bytes into `files` files at once (each by its thread, then fsynced), and
    reading them back after evicting them from the page cache."""
    import mmap
    import threading

    block = 64 << 20
    blocks = max(1, int(gigabytes * 1e9 / files / block))
    buffer = mmap.mmap(-1, block)
    buffer.write(os.urandom(block))
    paths = [work / f"disk-{i}.bin" for i in range(files)]

    def write(path: Path) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            for _ in range(blocks):
                os.write(fd, buffer)
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(path: Path) -> None:
        with open(path, "rb", buffering=0) as handle:
            while handle.read(block):
                pass

    def timed_threads(function) -> float:
        threads = [threading.Thread(target=function, args=(path,)) for path in paths]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return time.perf_counter() - start

    work.mkdir(parents=True, exist_ok=True)
    try:
        written = timed_threads(write)
        for path in paths:
            evict_file(path)
        read_back = timed_threads(read)
    finally:
        for path in paths:
            path.unlink(missing_ok=True)
    total = blocks * block * files / 1e9
    return total / written, total / read_back


def synthetic_state(gigabytes: float, device: str) -> dict:
    """About `gigabytes` of fp32 tensors shaped like a 1.3b Memory+ run's state: a 1M-row table, its per-row state, and
    24 blocks of weights with two moments each, scaled to the size asked."""
    generator = torch.Generator(device=device).manual_seed(0)
    rows = max(1, int(gigabytes * 1e9 * 0.35 / 4 / 2048))
    layer = [(2048, 2048)] * 4 + [(5632, 2048)] * 3 + [(2048,)] * 2
    layers = int(gigabytes * 1e9 * 0.65 / 4 / 3 / sum(torch.Size(s).numel() for s in layer))

    def block(prefix: str) -> dict:
        return {f"{prefix}.{i}.{j}": torch.randn(shape, generator=generator, device=device)
                for i in range(layers) for j, shape in enumerate(layer)}

    return {"model": {**block("w"), "values": torch.randn(rows, 2048, generator=generator, device=device)},
            "optimizer": {**block("m"), **block("v"), "rows": torch.rand(rows, generator=generator, device=device)}}


def state_io(work: Path, gigabytes: float, thread_counts: list[int]) -> None:
    """Save and cold-load a synthetic state with each thread count: pageable (DCP's writer threads copy off the GPU)
    and staged into pinned buffers first; prints a table."""
    import torch.distributed.checkpoint as dcp

    from titanmem.components.checkpoint_io import load_tensors
    from titanmem.components.staging import CpuStager
    from titanmem.components.summing_writer import SummingWriter

    device = "cuda" if torch.cuda.is_available() else "cpu"
    state = synthetic_state(gigabytes, device)
    size = sum(t.numel() * t.element_size() for t in checkpoint.flatten(state).values()) / 1e9
    stager = CpuStager(pinned=True)
    stager.stage(state)  # allocate the pinned buffers outside the timing
    print(f"| synthetic state, {size:.1f} GB on {device} | threads | staging s | write s | write GB/s | files summed as "
          "written | cold load s | load GB/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for threads in thread_counts:
        for staging in ("pageable", "pinned"):
            folder = work / f"state-{threads}-{staging}"
            shutil.rmtree(folder, ignore_errors=True)
            start = time.perf_counter()
            source = stager.stage(state) if staging == "pinned" else state
            staged = time.perf_counter() - start
            writer = SummingWriter(str(folder), thread_count=threads, sync_files=True)
            dcp.save(source, storage_writer=writer)
            written = time.perf_counter() - start
            summed = sum(digest is not None for digest in writer.digests.values())
            evict(folder)
            start = time.perf_counter()
            load_tensors(state, folder, threads)
            if device == "cuda":
                torch.cuda.synchronize()
            loaded = time.perf_counter() - start
            shutil.rmtree(folder)
            print(f"| {staging} | {threads} | {staged:.2f} | {written:.2f} | {size / written:.2f} | "
                  f"{summed} of {len(writer.digests)} | {loaded:.2f} | {size / loaded:.2f} |", flush=True)
    stager.close()


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
    parser.add_argument("--run", action="append", default=[],
                        help="a train_configs name, then config overrides, as one quoted string; repeatable")
    parser.add_argument("--state", type=float, default=0.0, metavar="GB",
                        help="also save and cold-load a synthetic state of this many GB (on the GPU if there is one)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 8],
                        help="the writer and reader thread counts of --state")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_checkpoint"),
                        help="scratch folder (twice the checkpoint size free)")
    parser.add_argument("--disk", type=float, default=0.0, metavar="GB",
                        help="first measure the disk's sequential rates with this many GB (0: skip)")
    args = parser.parse_args()
    if args.disk < 0 or args.state < 0 or min(args.threads) < 1:
        parser.error("--disk and --state take GB >= 0, --threads counts >= 1")
    if not args.run and not args.disk and not args.state:
        parser.error("nothing to measure: give --run, --disk or --state")
    if args.disk > 0:
        print("| disk under --work | GB | write GB/s (fsynced) | cold read GB/s |")
        print("| --- | ---: | ---: | ---: |")
        for files in (1, 8):
            write, read = disk_rates(args.work, args.disk, files)
            print(f"| {files} file{'s' if files > 1 else ''} at once | {args.disk:g} | {write:.2f} | {read:.2f} |", flush=True)
        print()
    if args.state > 0:
        state_io(args.work, args.state, args.threads)
        print()
    checkpoint.file_digests = timed("checksums", checkpoint.file_digests)
    checkpoint.checkpoint_problems = timed("verify", checkpoint.checkpoint_problems)
    checkpoint.CheckpointManager.save = timed("save", checkpoint.CheckpointManager.save)
    checkpoint.CheckpointManager.load = timed("load", checkpoint.CheckpointManager.load)
    if not args.run:
        return
    rows = []
    for run in args.run:
        config, *extra = shlex.split(run)
        rows.append((run, *measure(config, extra, args.work)))
    print("| run | checkpoint GB | save s | save GB/s | of which checksums read back s | cold load, verified s | of "
          "which verification s | cold load, unverified s | unverified GB/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for run, gb, save, sums, load, verify, unverified in rows:
        print(f"| {run} | {gb:.2f} | {save:.2f} | {gb / save:.2f} | {sums:.2f} | {load:.2f} | {verify:.2f} | "
              f"{unverified:.2f} | {gb / unverified:.2f} |")


if __name__ == "__main__":
    main()
