"""What an export takes: time, rate and the exporting process's peak host memory, per format and dtype.

The export reads a checkpoint: `--checkpoint DIR` (a `step-N` folder of the config's model), or, without it, a
checkpoint of the config's model with random weights that this tool writes first into `--work` (model weights only,
saved by DCP as one rank, as a one-GPU run saves them). Each export then runs in a process of its own, after the
checkpoint's files are dropped from the page cache (when this user may), and its peak resident memory is read from
the kernel. docs/benchmarks.md has runs.

    python -m tools.bench.bench_export --job.config_file train_configs/llama_1.3b_memory.toml --work /tmp/bx \
        --format titanmem:fp32 --format hf:bf16
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def write_random_checkpoint(config_file: str, folder: Path) -> None:
    """The config's model weights, random, as a DCP checkpoint at `folder` (one tensor at a time in memory would not
    do: DCP saves a whole state dict, so the host holds the model once)."""
    import torch.distributed.checkpoint as dcp

    from titanmem.build import build_model
    from titanmem.config import build_config
    from titanmem.plan import resolve_plan

    config, _ = build_config(["--job.config_file", config_file, "--training.device", "cpu"])
    plan = resolve_plan(config, "dry_run")
    model = build_model(plan.model_args, "meta")
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, param in model.named_parameters():
        tensor = torch.empty(param.shape, dtype=param.dtype)
        for rows in torch.split(tensor.view(tensor.shape[0], -1) if tensor.dim() else tensor.view(1), 1 << 14):
            rows.normal_(0, 0.02, generator=generator)
        state[name] = tensor
    dcp.save({"model": state}, checkpoint_id=str(folder))


def drop_from_page_cache(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def export(config_file: str, checkpoint: Path, out: Path, export_format: str, dtype: str) -> tuple[float, float]:
    """Seconds and peak RSS (GB) of one export, run as a child process: `wait4` gives that child's own peak."""
    command = [sys.executable, "-m", "titanmem.export", "--job.config_file", config_file, "--training.device", "cpu",
               "--checkpoint.initial_load_path", str(checkpoint), "--checkpoint.verify_on_load", "false",
               "--export.folder", str(out), "--export.format", export_format, "--export.dtype", dtype]
    with tempfile.TemporaryFile() as log:
        start = time.perf_counter()
        child = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            log.seek(0)
            sys.exit(f"error: the export failed: {log.read().decode(errors='replace').strip().splitlines()[-1:]}")
    return seconds, usage.ru_maxrss * 1024 / 1e9  # Linux reports it in KiB


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--job.config_file", dest="config_file", required=True, help="the model's train config")
    parser.add_argument("--checkpoint", type=Path, help="a step-N folder of that model (default: write a random one)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_export"), help="scratch folder")
    parser.add_argument("--format", action="append", default=[], metavar="FORMAT:DTYPE",
                        help="titanmem:fp32, titanmem:bf16, hf:fp32 or hf:bf16; repeatable (default titanmem:fp32)")
    args = parser.parse_args()
    formats = [f.split(":") for f in args.format or ["titanmem:fp32"]]
    if any(len(f) != 2 or f[0] not in ("titanmem", "hf") or f[1] not in ("fp32", "bf16") for f in formats):
        parser.error("--format takes FORMAT:DTYPE with FORMAT titanmem or hf and DTYPE fp32 or bf16")
    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = args.work / "checkpoint" / "step-1"
        shutil.rmtree(checkpoint, ignore_errors=True)
        start = time.perf_counter()
        write_random_checkpoint(args.config_file, checkpoint)
        print(f"wrote a random checkpoint of {args.config_file} in {time.perf_counter() - start:.1f} s")
    stored = sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file()) / 1e9
    print("| format | dtype | checkpoint GB | exported GB | seconds | GB/s written | peak RSS GB |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for export_format, dtype in formats:
        out = args.work / f"export-{export_format}-{dtype}"
        shutil.rmtree(out, ignore_errors=True)
        drop_from_page_cache(checkpoint)
        seconds, peak = export(args.config_file, checkpoint, out, export_format, dtype)
        written = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 1e9
        print(f"| {export_format} | {dtype} | {stored:.2f} | {written:.2f} | {seconds:.1f} | {written / seconds:.2f} | "
              f"{peak:.2f} |", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
