"""Export a checkpoint as one portable folder: `python -m titanmem.export --job.config_file FILE
--export.folder DIR [--checkpoint.load_step N] [--export.max_shard_gb 5] [--export.dtype bf16]`.

The model is built by the same path as training on one process, and the checkpoint's weights (of whatever plan
saved it; DCP reshards) are loaded into it, read-only. The folder gets the weights as safetensors files with their
index, `config.json` (the model and memory settings, the dtype and the step) and the tokenizer. Any plan's checkpoint
of the same weights exports the same bytes. `checkpoint.initial_load_path` starts a new run from such a folder, and
eval and generate read it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from titanmem.build import start_reader
from titanmem.components.checkpoint import saved_step
from titanmem.components.export import write_export
from titanmem.config import resolve_asset_path
from titanmem.utils import exit_with, setup_logging

USAGE = ("python -m titanmem.export [--job.config_file FILE] --export.folder DIR [--checkpoint.load_step N] "
         "[--print_config] [--section.key VALUE ...]")


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    started = start_reader(argv, "export", USAGE)
    if isinstance(started, int):
        return started
    plan, run = started
    config, source = plan.config, plan.checkpoint_to_load
    tokenizer = resolve_asset_path(config.tokenizer.path) if config.tokenizer.path else None
    tokenizer_files = [p for p in (tokenizer, tokenizer and tokenizer.with_suffix(".json")) if p and p.is_file()]
    files = write_export(run.model, config.export.folder, model_args=plan.model_args, step=saved_step(source),
                         max_shard_bytes=int(config.export.max_shard_gb * 1e9),
                         dtype=torch.bfloat16 if config.export.dtype == "bf16" else torch.float32,
                         tokenizer_files=tokenizer_files)
    size = sum(Path(f).stat().st_size for f in files)
    print(f"exported {source} to {config.export.folder}: {len(files)} files, {size / 1e9:.3f} GB")
    return 0


if __name__ == "__main__":
    exit_with(main())
