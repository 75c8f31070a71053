"""A Memory+ config trained three times at the same tokens: fp32 value table, bf16 rounded to nearest, bf16 with
stochastic rounding (row-wise Adagrad on the values). Prints the mean training loss of the last 50 steps and the
held-out perplexity of each. docs/benchmarks.md has a run.

    python -m tools.experiments.compare_value_rounding --steps 400 [--config llama_134m_memory]
"""

from __future__ import annotations

import argparse
import statistics
import time

from titanmem.config import build_config
from titanmem.train import Trainer

VARIANTS = [("fp32", []),
            ("bf16, nearest", ["--memory.value_dtype", "bf16", "--memory.value_rounding", "nearest"]),
            ("bf16, stochastic", ["--memory.value_dtype", "bf16", "--memory.value_rounding", "stochastic"])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--config", default="llama_134m_memory")
    parser.add_argument("--work", default="/tmp/compare_value_rounding")
    args = parser.parse_args()
    rows = []
    for name, extra in VARIANTS:
        config, _ = build_config([
            "--job.config_file", f"train_configs/{args.config}.toml", "--training.steps", str(args.steps),
            "--lr_scheduler.warmup_steps", str(args.steps // 10), "--memory.value_optimizer", "adagrad",
            "--checkpoint.enable", "false", "--eval.interval", "0", "--metrics.enable_tensorboard", "false",
            "--metrics.log_freq", "50", "--data.facts_path", "no_facts.jsonl",
            "--job.dump_folder", f"{args.work}/{name.replace(', ', '_')}", *extra])
        start = time.time()
        trainer = Trainer(config)
        losses = trainer.train()
        perplexity = trainer.evaluate()["perplexity"]
        trainer.close()
        tail = statistics.mean(losses[step] for step in range(max(1, args.steps - 49), args.steps + 1))
        rows.append((name, tail, perplexity, time.time() - start))
    base_loss, base_perplexity = rows[0][1], rows[0][2]
    print("| value table | mean loss, last 50 steps | vs fp32 | held-out perplexity | vs fp32 | wall s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, tail, perplexity, wall in rows:
        print(f"| {name} | {tail:.4f} | {tail / base_loss - 1:+.2%} | {perplexity:.2f} | "
              f"{perplexity / base_perplexity - 1:+.2%} | {wall:.0f} |")


if __name__ == "__main__":
    main()
