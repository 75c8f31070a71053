"""Text generation from a checkpoint: `python -m titanmem.generate --job.config_file FILE --generate.prompts
'["The capital of France is"]' [--generate.checkpoint DIR] [--generate.temperature 0.8 --generate.top_p 0.9]`.

The model is built from the same config as training (flavor, memory, tokenizer) on one device, and only its weights
are read from the checkpoint, whatever plan saved it (DCP checkpoints are keyed by parameter name). Each prompt's
continuation is printed after it, one per block.
"""

from __future__ import annotations

import sys

import torch

from titanmem.components.checkpoint import load_model_weights, newest_checkpoint
from titanmem.config import ConfigError, JobConfig, build_config
from titanmem.data import build_tokenizer
from titanmem.eval.decode import generate
from titanmem.models import build_model, build_model_args
from titanmem.utils import autocast_dtype, pick_device, setup_logging


def run(config: JobConfig) -> list[str]:
    """The continuations of `[generate] prompts`, in order."""
    options = config.generate
    if not options.prompts:
        raise ConfigError("generate.prompts", "is empty; pass e.g. --generate.prompts '[\"The capital of France is\"]'")
    path = options.checkpoint or newest_checkpoint(config.checkpoint, config.job.dump_folder)
    if path is None:
        raise ConfigError("generate.checkpoint",
                          f"no complete checkpoint in {config.job.dump_folder}/{config.checkpoint.folder}; set it")
    device = pick_device(config.training.device)
    tokenizer = build_tokenizer(config.tokenizer)
    model = build_model(build_model_args(config, tokenizer.vocab_size, device.type), device)
    load_model_weights(model, path)
    model.eval()
    generator = torch.Generator(device=device).manual_seed(options.seed)
    outputs = generate(
        model, [tokenizer.encode(prompt) for prompt in options.prompts], options.max_new_tokens, tokenizer.eos_id,
        device, temperature=options.temperature, top_p=options.top_p, generator=generator,
        autocast_dtype=autocast_dtype(config.training.mixed_precision, device), vocab_size=tokenizer.vocab_size,
    )
    return [tokenizer.decode(tokens) for tokens in outputs]


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    try:
        config, _ = build_config(argv)
        continuations = run(config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for prompt, continuation in zip(config.generate.prompts, continuations):
        print(f"{prompt}{continuation}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
