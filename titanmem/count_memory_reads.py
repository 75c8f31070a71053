"""Count how often a trained model's memory reads each value row, over batches of a run's training data.

    titanmem-count-reads --out FILE [--batches 100] --job.config_file CONFIG \
        --checkpoint.initial_load_path CHECKPOINT [config overrides]
    torchrun --nproc_per_node N -m titanmem.count_memory_reads ...   # data-parallel: each rank counts its shard

The model and its weights are read as `python -m titanmem.eval` reads them (`checkpoint.initial_load_path`, or the
run's own newest checkpoint), and the data is the config's `[data]`, in its training order from the start. Every
forward is a no-grad pass in eval mode; the memory layers' observer counts their reads. FILE
(`titanmem.components.read_counts`) is what `[finetune] background_counts` (counted on the pretraining data) and
`dataset_counts` (on the finetuning data) read. It must be a new file outside the run being read, and outside the
checkpoint folder: reading a run never writes into it. For an exported folder, `<folder>.read_counts.safetensors`
beside it is the default.

A batch is one rank's micro-batch (`training.local_batch_size` sequences of `training.seq_len` tokens): `--batches`
per rank, and a row's document frequency counts the sequences that read it. Tensor parallel splits the heads of a
read over ranks, and is refused here.
"""

from __future__ import annotations

import argparse
import functools
import logging
import time
from pathlib import Path

import torch
import torch.distributed as dist

from titanmem.build import Run
from titanmem.components.checkpoint import saved_step
from titanmem.components.export import is_export
from titanmem.components.read_counts import ReadCounter, ReadCounts, save_read_counts
from titanmem.config import ConfigError, JobConfig
from titanmem.data.dataloader import build_dataloader
from titanmem.data.files import DataSource, resolve_data_source
from titanmem.entry import run_command, with_run
from titanmem.plan import RunPlan
from titanmem.utils import autocast, exit_with, print_error, print_output

logger = logging.getLogger("titanmem")

USAGE = ("python -m titanmem.count_memory_reads [--out FILE] [--batches N] [--job.config_file FILE] "
         "[--checkpoint.initial_load_path DIR] [--section.key VALUE ...]")


def output_path(out: str | None, checkpoint: Path, dump_folder: str) -> Path:
    """Where the counts go: `out`, or beside an exported folder; never inside the run or the checkpoint read."""
    if out is None:
        if not is_export(checkpoint):
            raise ConfigError("--out", "is needed when reading a step-N checkpoint: name a new file outside the "
                              f"run's folder (e.g. beside an export of {checkpoint})")
        out = str(checkpoint.resolve()) + ".read_counts.safetensors"
    path = Path(out).resolve()
    # A step-N folder belongs to the run two levels up (<run>/<checkpoint.folder>/step-N).
    run = checkpoint.resolve() if is_export(checkpoint) else checkpoint.resolve().parent.parent
    for folder, what in ((Path(dump_folder).resolve(), "job.dump_folder"), (run, "the run of the checkpoint read")):
        if folder == path or folder in path.parents:
            raise ConfigError("--out", f"{out} lies inside {what} ({folder}), which reading a run never writes to; "
                              "choose a file outside it")
    if path.exists():
        raise ConfigError("--out", f"{out} exists; choose a new file")
    if not path.parent.is_dir():
        raise ConfigError("--out", f"{path.parent} is not a folder")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], add_help=False)
    parser.add_argument("--out", help="the counts file to write (new, outside the run read)")
    parser.add_argument("--batches", type=int, default=100, help="batches to count, per rank (default 100)")
    args, overrides = parser.parse_known_args(argv)
    if "--help" in overrides or "-h" in overrides:
        print_output(__doc__)  # then the config's fields, as every entry point prints them
    if args.batches < 1:
        print_error(f"--batches must be at least 1, got {args.batches}")
        return 2
    return run_command(overrides, "eval", USAGE, functools.partial(count_reads, out=args.out, batches=args.batches))


def count_reads(config: JobConfig, plan: RunPlan, out: str | None, batches: int) -> int:
    """Refuse what cannot be counted before any weights are read, then count and write the file (rank 0)."""
    if plan.model_args.memory is None:
        raise ConfigError("memory.enabled", "is false: this model has no memory to count reads of")
    if plan.parallel.tp > 1:
        raise ConfigError("parallelism.tp", "must be 1 here: tensor parallel splits each read's heads over ranks")
    path = output_path(out, plan.checkpoint_to_load, config.job.dump_folder)
    source = resolve_data_source(config.data)
    return with_run(plan, functools.partial(count_and_save, source=source, out=path, batches=batches))


def count_and_save(plan: RunPlan, run: Run, source: DataSource, out: Path, batches: int) -> int:
    counts = count_batches(plan, run, source, batches)
    if dist.is_initialized():
        for tensor in (counts.reads, counts.documents_reading):
            dist.all_reduce(tensor)
        totals = torch.tensor([counts.documents, counts.batches, counts.tokens], device=run.device)
        dist.all_reduce(totals)
        counts.documents, counts.batches, counts.tokens = (int(v) for v in totals.tolist())
    config = plan.config
    counts.description = {"checkpoint": str(plan.checkpoint_to_load), "step": saved_step(plan.checkpoint_to_load),
                          "data": config.data.path, "facts_fraction": config.data.facts_fraction,
                          "seq_len": config.training.seq_len, "seed": config.training.seed}
    if run.rank == 0:
        save_read_counts(counts, out)
        read = int((counts.reads > 0).sum())
        read_by_all = int((counts.documents_reading == counts.documents).sum())
        logger.info("%s: %s reads of %s rows (%.1f%% of the table read) over %d batches (%s sequences), %s "
                    "tokens; %.1f%% of the rows were read by every sequence", out, f"{int(counts.reads.sum()):,}",
                    f"{read:,}", 100 * read / counts.n_values, counts.batches, f"{counts.documents:,}",
                    f"{counts.tokens:,}", 100 * read_by_all / counts.n_values)
    return 0


def count_batches(plan: RunPlan, run: Run, source: DataSource, batches: int) -> ReadCounts:
    """This rank's counts over its first `batches` batches of the data, in no-grad eval-mode forwards."""
    dp_rank, dp_size = plan.parallel.data_parallel_position()
    loader = build_dataloader(plan.config, source, run.tokenizer, dp_rank, dp_size, run.device)
    counter = ReadCounter(plan.model_args.memory.n_values, run.device)
    run.model.memory_values.observer = counter.observe
    run.model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        for number, batch in zip(range(1, batches + 1), loader):
            inputs = batch["input"].to(run.device)
            counter.start_batch(inputs.shape[0])
            with autocast(run.device, plan.autocast_dtype):
                run.model(inputs)
            counter.end_batch(inputs.numel())
            if run.rank == 0 and (number % 50 == 0 or number == batches):
                logger.info("counted %d of %d batches (%.0f s)", number, batches, time.perf_counter() - start)
    counts = counter.counts
    if counts.batches < batches:
        raise ConfigError("data.path", f"ran out of data after {counts.batches} of {batches} batches")
    return counts


if __name__ == "__main__":
    exit_with(main())
