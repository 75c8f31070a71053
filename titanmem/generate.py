"""Text generation from a checkpoint: `python -m titanmem.generate --job.config_file FILE --generate.prompts
'["The capital of France is"]' [--generate.checkpoint DIR] [--generate.temperature 0.8 --generate.top_p 0.9]`.

The model is built by the same path as training (flavor, memory, tokenizer), on one device, and only its weights are
read from the checkpoint, whatever plan saved it (DCP checkpoints are keyed by parameter name). Nothing in the run's
folder is written. Each prompt's continuation is printed after it, one per block.
"""

from __future__ import annotations


import torch

from titanmem.build import build_run
from titanmem.config import JobConfig
from titanmem.entry import run_command
from titanmem.eval.decode import generate
from titanmem.plan import RunPlan, resolve_plan
from titanmem.utils import exit_with, print_output

USAGE = ("python -m titanmem.generate [--job.config_file FILE] --generate.prompts JSON [--generate.checkpoint DIR] "
         "[--print_config] [--section.key VALUE ...]")


def run(config: JobConfig, plan: RunPlan | None = None) -> list[str]:
    """The continuations of `[generate] prompts`, in order."""
    options = config.generate
    plan = plan or resolve_plan(config, "generate")
    built = build_run(plan)
    built.model.eval()
    generator = torch.Generator(device=built.device).manual_seed(options.seed)
    tokenizer = built.tokenizer
    outputs = generate(
        built.model, [tokenizer.encode(prompt) for prompt in options.prompts], options.max_new_tokens,
        tokenizer.eos_id, built.device, temperature=options.temperature, top_p=options.top_p, generator=generator,
        autocast_dtype=plan.autocast_dtype, vocab_size=tokenizer.vocab_size,
    )
    return [tokenizer.decode(tokens) for tokens in outputs]


def main(argv: list[str] | None = None) -> int:
    return run_command(argv, "generate", USAGE, print_continuations)


def print_continuations(config: JobConfig, plan: RunPlan) -> int:
    """Each prompt followed by its continuation, one per block."""
    for prompt, continuation in zip(config.generate.prompts, run(config, plan)):
        print_output(f"{prompt}{continuation}\n")
    return 0


if __name__ == "__main__":
    exit_with(main())
