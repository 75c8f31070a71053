"""Training speed of a list of configs on this machine: tokens/s per GPU, MFU, peak memory and where a step's time goes.

Each run is a train_configs name, optionally followed by config overrides joined with ':' (e.g.
`llama_134m_memory:--compile.enable:true`). For each, it builds the trainer as training does (no checkpoint, no
eval), runs `--warmup` steps, then times `--steps` steps back to back (their mean). A step is split, with CUDA events
(means over the same steps), into:
- forward: the model's forward (the lookups included);
- backward: the rest of forward + backward;
- value update: the row-wise value optimizer (its norm, gathers and fused update);
- optimizer: the rest of the optimizer step (norms, clipping, AdamW, and a row-wise optimizer's host sync);
- exposed communication: from a profile of 3 more steps, the time NCCL kernels run while no compute kernel does;
- host syncs per step: over 3 more steps, by CUDA's sync debug mode. `--decide_on host` makes the host decide each
  step's update (as without fused AdamW), to compare with the device's decision.

The bf16 GEMM ceiling of the same run (an 8192³ matmul) is printed first, so that MFU can be read against what this
GPU reaches today. docs/benchmarks.md has the runs. On several GPUs, launch it with torchrun, one run per launch:

    python -m tools.bench.bench_train --steps 30 --warmup 10 llama_134m llama_134m_memory
    torchrun --standalone --nproc_per_node 2 -m tools.bench.bench_train llama_134m_memory:--parallelism.mp:2
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

import torch

from titanmem.config import build_config
from titanmem.plan import resolve_plan

PHASES = ("forward", "backward", "value update", "optimizer")


class PhaseClock:
    """Start and end marks of named phases within one step: CUDA events on a GPU, host clocks on a CPU."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.marks: list[tuple[str, object, object]] = []

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    @contextlib.contextmanager
    def phase(self, name: str):
        """The trainer's `phase_timer`: marks the start and end of each phase it runs."""
        start = self.mark()
        try:
            yield
        finally:
            self.marks.append((name, start, self.mark()))

    def seconds(self) -> dict[str, float]:
        """Seconds per phase name since the last call (marks of one name are summed)."""
        if self.cuda:
            torch.cuda.synchronize()
        totals: dict[str, float] = {}
        for name, start, end in self.marks:
            elapsed = start.elapsed_time(end) / 1e3 if self.cuda else end - start
            totals[name] = totals.get(name, 0.0) + elapsed
        self.marks = []
        return totals


def gemm_ceiling_tflops(size: int = 8192, repeats: int = 20) -> float | None:
    """bf16 matmul TFLOP/s of this GPU now; None on a CPU."""
    if not torch.cuda.is_available():
        return None
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


def exposed_communication(trainer, batches, steps: int = 3) -> float | None:
    """Mean seconds per step during which NCCL kernels run and no other kernel does; None without CUDA."""
    if not torch.cuda.is_available():
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            trainer.train_step(batches)
        torch.cuda.synchronize()
    comm, compute = [], []
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA or event.time_range.elapsed_us() <= 0:
            continue
        span = (event.time_range.start, event.time_range.end)
        (comm if "nccl" in event.name.lower() else compute).append(span)
    return uncovered(comm, compute) / 1e6 / steps


def host_syncs_per_step(trainer, batches, steps: int = 3) -> float | None:
    """Mean host syncs per step (CUDA's sync debug mode, which warns at each); None without CUDA."""
    if not torch.cuda.is_available():
        return None
    import warnings

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(steps):
                trainer.train_step(batches)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    trainer.settle()
    return sum("synchroniz" in str(w.message) for w in caught) / steps


def uncovered(spans: list[tuple[int, int]], cover: list[tuple[int, int]]) -> float:
    """Total length of the union of `spans` outside the union of `cover`."""
    def union(intervals):
        merged = []
        for start, end in sorted(intervals):
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        return merged

    total = 0.0
    covered = union(cover)
    for start, end in union(spans):
        length = end - start
        for c_start, c_end in covered:
            overlap = min(end, c_end) - max(start, c_start)
            if overlap > 0:
                length -= overlap
        total += length
    return total


def bench(run: str, steps: int, warmup: int, decide_on: str = "auto") -> dict:
    """`decide_on = "host"` makes the host read every step's loss and norms and decide whether to apply it, as
    without fused AdamW; "auto" leaves it to the device where it can (`Optimizers.skips_on_device`)."""
    from titanmem.train import Trainer

    name, *overrides = run.split(":")
    config, _ = build_config(["--job.config_file", f"train_configs/{name}.toml", *overrides, "--training.steps",
                              str(warmup + steps + 3), "--checkpoint.enable", "false", "--eval.interval", "0",
                              "--metrics.enable_tensorboard", "false", "--metrics.memory_telemetry_freq", "0",
                              "--job.dump_folder", f"/tmp/bench_train/{name}"])
    plan = resolve_plan(config, "train")
    clock = PhaseClock(plan.device_type == "cuda")
    trainer = Trainer(config, plan, phase_timer=clock.phase)
    trainer.read_late = True  # as in training: no host sync per step where the device can skip a step itself
    if decide_on == "host":
        optimizers = type(trainer.optimizers)
        trainer.optimizers.__class__ = type("HostDeciding", (optimizers,), {"skips_on_device": property(lambda _: False)})
    cuda = trainer.device.type == "cuda"
    batches = iter(trainer.dataloader)
    trainer.model.train()
    try:
        for _ in range(warmup):
            trainer.train_step(batches)
        trainer.settle()
        clock.seconds()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        # Back to back, as training runs them: the host waits only where the trainer does.
        start = time.perf_counter()
        for _ in range(steps):
            trainer.train_step(batches)
        trainer.settle()
        if cuda:
            torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / steps
        totals = clock.seconds()
        exposed = exposed_communication(trainer, batches)
        syncs = host_syncs_per_step(trainer, batches)
    finally:
        trainer.close()

    def mean(key):
        return totals.get(key, 0.0) / steps

    value_update = mean("value update")
    split = {"forward": mean("forward"),
             "backward": mean("forward+backward") - mean("forward"),
             "value update": value_update,
             "optimizer": mean("optimizer step") + mean("optimizer norms") - value_update}
    tokens = trainer.plan.tokens_per_step / trainer.world_size
    peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else None
    return {"run": run.replace(":", " "), "tokens_per_gpu_s": tokens / wall, "step_s": wall,
            "flops_per_token": trainer.flops_per_token, "peak_gb": peak, "split": split, "exposed": exposed,
            "syncs": syncs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="train_configs names, with ':'-joined overrides")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--decide_on", choices=("auto", "host"), default="auto",
                        help="host: the host reads each step's loss and norms and decides whether to apply it")
    args = parser.parse_args()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and len(args.runs) > 1:
        # A second trainer in the same processes would start a second NCCL world after the first one's end.
        parser.error("under torchrun, give one run per launch")
    ceiling = gemm_ceiling_tflops()
    if ceiling is not None:
        print(f"bf16 GEMM ceiling (8192³) now: {ceiling:,.0f} TFLOP/s on {torch.cuda.get_device_name()}\n")
    print("| run | tokens/s per GPU | step s | MFU (of 989 TFLOP/s) | of the GEMM ceiling | peak GB | forward | backward "
          "| value update | optimizer | exposed comm | host syncs per step |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for run in args.runs:
        r = bench(run, args.steps, args.warmup, args.decide_on)
        achieved = r["tokens_per_gpu_s"] * r["flops_per_token"] / 1e12
        split = r["split"]
        cells = [f"{split[p] * 1e3:.1f} ms" for p in PHASES]
        mfu = f"{achieved / 989:.1%}" if ceiling else "-"  # MFU is a GPU figure
        print(f"| {r['run']} | {r['tokens_per_gpu_s']:,.0f} | {r['step_s']:.3f} | {mfu} | "
              + (f"{achieved / ceiling:.1%}" if ceiling else "-") + " | "
              + (f"{r['peak_gb']:.1f}" if r["peak_gb"] is not None else "-") + " | " + " | ".join(cells) + " | "
              + (f"{r['exposed'] * 1e3:.1f} ms" if r["exposed"] is not None else "-") + " | "
              + (f"{r['syncs']:.1f}" if r["syncs"] is not None else "-") + " |", flush=True)


if __name__ == "__main__":
    main()
