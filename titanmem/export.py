"""Export a checkpoint as one portable folder: `python -m titanmem.export --job.config_file FILE
--export.folder DIR [--checkpoint.load_step N] [--export.max_shard_gb 5] [--export.dtype bf16]`.

The weights are streamed from the checkpoint's files (of whatever plan saved it: its blocks are put together row by
row) to the exported ones, a block of rows at a time, read-only: the host never holds the model, so a value table
larger than its memory exports all the same. The model is built on the meta device only, for the names, shapes and
dtypes that the checkpoint must hold. The folder gets the weights as safetensors files with their index,
`config.json` (the model and memory settings, the dtype and the step) and the tokenizer. Any plan's checkpoint of the
same weights exports the same bytes. `checkpoint.initial_load_path` starts a new run from such a folder, and eval and
generate read it; it can itself be exported again (another dtype, another format).
"""

from __future__ import annotations

import logging
import resource
import shutil
import sys
import time
from pathlib import Path

import torch

from titanmem.build import build_model
from titanmem.components.checkpoint import checkpoint_problems, saved_step
from titanmem.components.export import is_export, write_export
from titanmem.components.hf_checkpoint import is_hf_folder
from titanmem.components.stored_tensors import StoredTensors, open_stored_tensors, outputs_of, require_shapes
from titanmem.config import JobConfig, resolve_asset_path
from titanmem.config.errors import ConfigError
from titanmem.distributed.initialize import model_name
from titanmem.entry import run_command
from titanmem.plan import RunPlan
from titanmem.registry import EXPORT_FORMATS
from titanmem.utils import exit_with

logger = logging.getLogger(__name__)

USAGE = ("python -m titanmem.export [--job.config_file FILE] --export.folder DIR [--checkpoint.load_step N] "
         "[--print_config] [--section.key VALUE ...]")


def main(argv: list[str] | None = None) -> int:
    """The command: 0 once the folder is written, 2 after a config error (one line), as every entry point."""
    began = time.perf_counter()

    def export_and_report(config: JobConfig, plan: RunPlan) -> int:
        files = export(plan)
        size = sum(Path(f).stat().st_size for f in files)
        print(f"exported {plan.checkpoint_to_load} to {config.export.folder}: {len(files)} files, "
              f"{size / 1e9:.3f} GB")
        logger.info("export took %.1f s; peak host memory (RSS) %.3f GB", time.perf_counter() - began,
                    peak_rss_bytes() / 1e9)
        return 0

    return run_command(argv, "export", USAGE, export_and_report)


def export(plan: RunPlan) -> list[Path]:
    """Write the plan's checkpoint to `export.folder` in `export.format`; returns the files written. The files are
    written into `<folder>.partial` first, which becomes the folder once complete: an export that fails or is killed
    leaves no folder that looks like an export (a later one clears the partial folder)."""
    target = Path(plan.config.export.folder)
    partial = target.with_name(target.name + ".partial")
    _remove(partial)
    try:
        files = _write(plan, partial)
    except BaseException as error:
        _remove(partial)
        if isinstance(error, OSError) and error.filename is None:
            error.filename = str(target)  # a write to an open file that fails names none: the command's line will
        raise
    if target.exists():
        target.rmdir()  # empty: the plan refuses a folder that holds anything
    partial.rename(target)
    return [target / Path(f).relative_to(partial) for f in files]


def _remove(path: Path) -> None:
    """Whatever an earlier export left at `path`: a folder, or a file or link put there (never followed)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def _write(plan: RunPlan, folder: Path) -> list[Path]:
    config, path = plan.config, plan.checkpoint_to_load
    source = open_checked(path, verify=config.checkpoint.verify_on_load)
    # The meta model costs no memory: it only says which weights the config's model has, and their shapes and dtypes.
    model = build_model(plan.model_args, "meta")
    params = {model_name(name): param for name, param in model.named_parameters()}
    require_shapes(source, {name: tuple(param.shape) for name, param in params.items()})
    source.check()
    dtype = torch.bfloat16 if config.export.dtype == "bf16" else torch.float32
    writer = EXPORT_FORMATS.load(config.export.format)
    return writer(source, folder, plan=plan, dtype=dtype, max_shard_bytes=int(config.export.max_shard_gb * 1e9))


def write_titanmem_export(source: StoredTensors, folder: Path, *, plan: RunPlan, dtype: torch.dtype,
                          max_shard_bytes: int) -> list[Path]:
    """The `titanmem` format's writer: each weight under its model name, `config.json`, and the run's tokenizer."""
    config = plan.config
    params = dict(build_model(plan.model_args, "meta").named_parameters())
    tokenizer = resolve_asset_path(config.tokenizer.path) if config.tokenizer.path else None
    tokenizer_files = [p for p in (tokenizer, tokenizer and tokenizer.with_suffix(".json")) if p and p.is_file()]
    return write_export(outputs_of(source, {model_name(name): param.dtype for name, param in params.items()}),
                        folder, model_args=plan.model_args, step=saved_step(plan.checkpoint_to_load),
                        max_shard_bytes=max_shard_bytes, dtype=dtype, tokenizer_files=tokenizer_files)


def open_checked(path: Path, verify: bool = True) -> StoredTensors:
    """The tensors of the checkpoint or exported folder at `path`; with `verify`, a checkpoint's files are first
    checked against its manifest, and a damaged one is refused before anything is read from it."""
    if is_hf_folder(path):
        raise ConfigError("checkpoint.initial_load_path", f"{path} is a Hugging Face model folder, which other tools "
                          "read as it is; to export it in another format, start a run from it and export that run")
    if not is_export(path) and not (path / ".metadata").is_file():
        raise ConfigError("checkpoint.folder", f"{path} is not a complete checkpoint (no .metadata file)")
    if verify and not is_export(path) and (problems := checkpoint_problems(path)):
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ConfigError("checkpoint.folder", f"{path} is damaged: {problems[0]}{more}; read an earlier one "
                          "(checkpoint.load_step)")
    return open_stored_tensors(path)


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports it in KiB, macOS in bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


if __name__ == "__main__":
    exit_with(main())
