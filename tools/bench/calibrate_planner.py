"""The planner against measured training steps on this machine's one GPU: peak memory, and step time, whose rates
(`titanmem.step_model`) it fits.

Each run is a train_configs name, optionally followed by config overrides joined with ':'.
- memory: trains 3 steps (no checkpoint, no eval, no loader workers), takes the whole run's
  `torch.cuda.max_memory_allocated`, and compares it with the planner's per-GPU need (without headroom).
- step_time: times `--steps` steps after `--warmup` (bench_train.py, beside this file, which also splits out the
  row-wise value update), fits the step model's rates to them (`titanmem.step_model.fit`), and prints the rates,
  ready to paste into `titanmem/step_model.py` as `MEASURED`, and each run's measured step against the planner's estimate with the
  committed rates and with the fitted ones. `--save FILE` keeps the measurements as JSON; `--load FILE` fits and
  compares those instead of measuring (on any machine). docs/planner.md and docs/benchmarks.md have runs.

    python -m tools.bench.calibrate_planner --what step_time --save /tmp/steps.json
    python -m tools.bench.calibrate_planner --what memory llama_134m llama_134m_memory llama_1.3b_memory \\
        llama_134m_memory:--activation_checkpoint.mode:full llama_1.3b_memory:--memory.value_dtype:bf16
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import subprocess
import sys
from pathlib import Path

import torch

from titanmem.config import ConfigError, build_config
from titanmem.planner import (
    Cluster, step_time, build_meta, estimate_config, fake_world, resolve_for, step_work,
)
from titanmem.step_model import MEASURED, Measurement, StepRates, StepWork, fit
from titanmem.train import main as train

STEP_TIME_RUNS = ["llama_134m", "llama_134m_memory", "llama_373m", "llama_373m_memory", "llama_1.3b",
                  "llama_1.3b_memory", "llama_134m_memory:--activation_checkpoint.mode:full"]
MEMORY_RUNS = ["llama_134m", "llama_134m_memory", "llama_1.3b_memory"]


def config_of(run: str):
    name, *overrides = run.split(":")
    config, _ = build_config(["--job.config_file", f"train_configs/{name}.toml", *overrides])
    return config


def measured_peak(argv: list[str]) -> int:
    """The peak bytes allocated over a whole short training run (the trainer resets the peak at each log line, so
    that reset is held off here)."""
    reset = torch.cuda.reset_peak_memory_stats
    reset()
    torch.cuda.reset_peak_memory_stats = lambda *args, **kwargs: None
    try:
        if train(argv) != 0:
            raise SystemExit(f"training failed: {' '.join(argv)}")
    finally:
        torch.cuda.reset_peak_memory_stats = reset
    peak = torch.cuda.max_memory_allocated()
    torch.cuda.empty_cache()
    return peak


def memory_table(runs: list[str]) -> None:
    rows = []
    for run in runs:
        name, *overrides = run.split(":")
        peak = measured_peak(["--job.config_file", f"train_configs/{name}.toml", *overrides, "--training.steps", "3",
                              "--checkpoint.enable", "false", "--eval.interval", "0", "--metrics.enable_tensorboard",
                              "false", "--data.num_workers", "0", "--job.dump_folder",
                              f"/tmp/calibrate_planner/{name}"])
        estimate = estimate_config(config_of(run),
                                   Cluster(1, 1, torch.cuda.get_device_properties(0).total_memory / 1e9))
        rows.append((run.replace(":", " "), peak, estimate.needed))
    print("| run | measured peak GB | planner GB | planner error |")
    print("| --- | ---: | ---: | ---: |")
    for run, peak, needed in rows:
        print(f"| {run} | {peak / 1e9:.2f} | {needed / 1e9:.2f} | {needed / peak - 1:+.1%} |")


def measure_steps(runs: list[str], steps: int, warmup: int) -> list[dict]:
    """Each run's mean step and value-update seconds, timed by `tools/bench/bench_train.py`."""
    from tools.bench.bench_train import bench

    measured = []
    for run in runs:
        result = bench(run, steps, warmup)
        measured.append({"run": run, "step_s": result["step_s"], "value_update_s": result["split"]["value update"]})
        print(f"measured {run}: {result['step_s'] * 1e3:.1f} ms per step", file=sys.stderr, flush=True)
        torch.cuda.empty_cache()
    return measured


def planned(run: str, world: int = 1):
    """The plan of `run` on `world` GPUs of one node, its parallelized meta model, and the planner's cluster."""
    plan = resolve_for(config_of(run), world, world)
    with fake_world(world) if world > 1 else contextlib.nullcontext():
        return plan, build_meta(plan), Cluster(1, world, 80.0)


def planner_seconds(run: str, rates: StepRates, world: int = 1) -> float:
    plan, model, cluster = planned(run, world)
    tokens = plan.config.training.local_batch_size * plan.config.training.seq_len
    return step_time(plan, model, cluster, tokens, rates)[0]


def step_time_table(measured: list[dict], source: str) -> StepRates:
    """Fit the rates to the one-GPU records whose value update was measured (or that have none), then compare every
    record, on one GPU or several (its `world`), with the planner's estimate."""
    measurements = []
    for record in measured:
        if record.get("world", 1) != 1 or record.get("value_update_s", 0.0) is None:
            continue
        plan, model, _ = planned(record["run"])
        work: StepWork = step_work(plan, model)
        measurements.append(Measurement(record["run"], work, record["step_s"], record.get("value_update_s", 0.0)))
    fitted = fit(measurements, MEASURED.hbm_bytes_per_s, source)
    print("```python\nMEASURED = StepRates(")
    for name in ("matmul_flops_per_s", "activation_elements_per_s", "memory_reads_per_s", "row_update_bytes_per_s",
                 "hbm_bytes_per_s"):
        print(f"    {name}={getattr(fitted, name):.3g},")
    print(f"    source={fitted.source!r},\n)\n```\n")
    print("| run | GPUs | measured step | of which value update | in the fit | planner (committed rates) | error | "
          "planner (fitted) | error |")
    print("| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    fitted_runs = {m.name for m in measurements}
    for record in measured:
        world = record.get("world", 1)
        committed = planner_seconds(record["run"], MEASURED, world)
        refit = planner_seconds(record["run"], fitted, world)
        step, update = record["step_s"], record.get("value_update_s", 0.0)
        print(f"| {record['run'].replace(':', ' ')} | {world} | {step * 1e3:.1f} ms | "
              f"{'?' if update is None else f'{update * 1e3:.1f} ms'} | "
              f"{'yes' if world == 1 and record['run'] in fitted_runs else 'no'} | {committed * 1e3:.1f} ms | "
              f"{committed / step - 1:+.1%} | {refit * 1e3:.1f} ms | {refit / step - 1:+.1%} |")
    return fitted


def source_line(args) -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parents[2]).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{card}, torch {torch.__version__}, commit {commit}, {datetime.date.today()}: python "
            f"tools/bench/calibrate_planner.py --what step_time --steps {args.steps} --warmup {args.warmup}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="*", help="train_configs names, with ':'-joined overrides")
    parser.add_argument("--what", choices=("memory", "step_time"), default="step_time")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--save", type=Path, help="write the step-time measurements to this JSON file")
    parser.add_argument("--load", type=Path, help="fit the step-time measurements of this JSON file (no GPU needed)")
    args = parser.parse_args(argv)
    if args.what == "memory":
        if not torch.cuda.is_available():
            parser.error("the memory calibration measures GPU memory: run it on a machine with a GPU")
        memory_table(args.runs or MEMORY_RUNS)
        return 0
    if args.load is not None:
        try:
            saved = json.loads(args.load.read_text())
            measured, source = saved["measurements"], saved["source"]
            for number, record in enumerate(measured, start=1):
                check_record(record, number)
        except (OSError, ValueError, KeyError, TypeError) as e:
            parser.error(f"--load {args.load}: not a measurements file of this tool ({e})")
    else:
        if not torch.cuda.is_available():
            parser.error("the step-time calibration times GPU steps: run it on a machine with a GPU, or --load a file")
        measured, source = measure_steps(args.runs or STEP_TIME_RUNS, args.steps, args.warmup), source_line(args)
        if args.save is not None:
            args.save.write_text(json.dumps({"source": source, "measurements": measured}, indent=1))
    try:
        step_time_table(measured, source)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # a fit the measurements cannot give (a step shorter than its own update)
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def check_record(record, number: int) -> None:
    """One measurement as `--save` writes it: a run, its step seconds (> 0), its value-update seconds (>= 0, or null
    when not measured) and its GPUs (default 1)."""
    if not isinstance(record, dict) or not isinstance(record.get("run"), str):
        raise ValueError(f"measurement {number} has no run name")
    step, update, world = record.get("step_s"), record.get("value_update_s", 0.0), record.get("world", 1)
    if not isinstance(step, (int, float)) or isinstance(step, bool) or not step > 0:
        raise ValueError(f"measurement {number} ({record['run']}): step_s must be a positive number of seconds")
    if update is not None and (not isinstance(update, (int, float)) or isinstance(update, bool) or update < 0):
        raise ValueError(f"measurement {number} ({record['run']}): value_update_s must be seconds >= 0, or null")
    if not isinstance(world, int) or isinstance(world, bool) or world < 1:
        raise ValueError(f"measurement {number} ({record['run']}): world must be a positive number of GPUs")


if __name__ == "__main__":
    sys.exit(main())
