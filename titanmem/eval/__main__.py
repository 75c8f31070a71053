"""Evaluate a checkpoint: `python -m titanmem.eval --job.config_file FILE [--checkpoint.load_step N]
[--eval.results_folder DIR]`, under torchrun for a sharded model.

The model is built by the same path as training, on the plan this launch gives (any plan can read any checkpoint:
DCP reshards by parameter name), and only its weights are read, from `load_step`'s checkpoint or the newest complete
one. Reading a run never changes it: nothing in its folder is renamed, deleted or written. Held-out perplexity and
fact recall are printed as JSON, and appended to `<eval.results_folder>/results.jsonl` when that is set.
"""

from __future__ import annotations

import json

import torch.distributed as dist

from titanmem.build import start_reader
from titanmem.components.checkpoint import saved_step
from titanmem.eval.runner import Evaluator
from titanmem.utils import exit_with, print_output, setup_logging

USAGE = ("python -m titanmem.eval [--job.config_file FILE] [--checkpoint.load_step N] [--eval.results_folder DIR] "
         "[--print_config] [--section.key VALUE ...]")


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    started = start_reader(argv, "eval", USAGE)
    if isinstance(started, int):
        return started
    plan, run = started
    config, path = plan.config, plan.checkpoint_to_load
    try:
        evaluator = Evaluator(config, run.tokenizer, run.device, plan.autocast_dtype, run.rank,
                              results_folder=config.eval.results_folder or None)
        results = evaluator.run(run.model, saved_step(path))
        if run.rank == 0:
            print_output(json.dumps(results, indent=1))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    exit_with(main())
