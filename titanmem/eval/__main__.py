"""Evaluate a checkpoint: `python -m titanmem.eval --job.config_file FILE [--checkpoint.load_step N]
[--eval.results_folder DIR]`, under torchrun for a sharded model.

The model is built by the same path as training, on the plan this launch gives (any plan can read any checkpoint:
DCP reshards by parameter name), and only its weights are read, from `load_step`'s checkpoint or the newest complete
one. Reading a run never changes it: nothing in its folder is renamed, deleted or written. Held-out perplexity and
fact recall are printed as JSON, and appended to `<eval.results_folder>/results.jsonl` when that is set.
"""

from __future__ import annotations

import json

from titanmem.build import Run
from titanmem.components.checkpoint import saved_step
from titanmem.entry import run_reader
from titanmem.eval.runner import Evaluator
from titanmem.plan import RunPlan
from titanmem.utils import exit_with, print_output

USAGE = ("python -m titanmem.eval [--job.config_file FILE] [--checkpoint.load_step N] [--eval.results_folder DIR] "
         "[--print_config] [--section.key VALUE ...]")


def main(argv: list[str] | None = None) -> int:
    return run_reader(argv, "eval", USAGE, evaluate)


def evaluate(plan: RunPlan, run: Run) -> int:
    """Score the checkpoint's model and print the results (rank 0)."""
    config = plan.config
    evaluator = Evaluator(config, run.tokenizer, run.device, plan.autocast_dtype, run.rank,
                          results_folder=config.eval.results_folder or None)
    results = evaluator.run(run.model, saved_step(plan.checkpoint_to_load))
    if run.rank == 0:
        print_output(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    exit_with(main())
