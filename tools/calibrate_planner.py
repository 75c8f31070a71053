"""The planner's estimate against the measured peak memory of a few training steps, on this machine's one GPU.

Each run is a train_configs name, optionally followed by config overrides joined with ':'. For each, it trains 3 steps
(no checkpoint, no eval, no loader workers), takes the whole run's `torch.cuda.max_memory_allocated`, and compares it
with `titanmem.planner`'s per-GPU need (without headroom) for one GPU. docs/benchmarks.md has a run.

    python tools/calibrate_planner.py llama_134m llama_134m_memory llama_1.3b_memory \\
        llama_134m_memory:--activation_checkpoint.mode:full llama_1.3b_memory:--memory.value_dtype:bf16
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from titanmem.config import build_config  # noqa: E402
from titanmem.planner import Cluster, estimate_config  # noqa: E402
from titanmem.train import main as train  # noqa: E402


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


def main(runs: list[str]) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("calibration measures GPU memory: run it on a machine with a GPU")
    rows = []
    for run in runs:
        name, *overrides = run.split(":")
        config_argv = ["--job.config_file", f"train_configs/{name}.toml", *overrides]
        peak = measured_peak([*config_argv, "--training.steps", "3", "--checkpoint.enable", "false",
                              "--eval.interval", "0", "--metrics.enable_tensorboard", "false", "--data.num_workers",
                              "0", "--job.dump_folder", f"/tmp/calibrate_planner/{name}"])
        config, _ = build_config(config_argv)
        estimate = estimate_config(config, Cluster(1, 1, torch.cuda.get_device_properties(0).total_memory / 1e9))
        rows.append((run.replace(":", " "), peak, estimate.needed))
    print("| run | measured peak GB | planner GB | planner error |")
    print("| --- | ---: | ---: | ---: |")
    for run, peak, needed in rows:
        print(f"| {run} | {peak / 1e9:.2f} | {needed / 1e9:.2f} | {needed / peak - 1:+.1%} |")


if __name__ == "__main__":
    main(sys.argv[1:] or ["llama_134m", "llama_134m_memory", "llama_1.3b_memory"])
