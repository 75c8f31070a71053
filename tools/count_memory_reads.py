"""Count how often a trained model's memory reads each value row, over batches of a run's training data.

    python tools/count_memory_reads.py --out FILE [--batches 100] --job.config_file CONFIG \
        --checkpoint.initial_load_path CHECKPOINT [config overrides]
    torchrun --nproc_per_node N tools/count_memory_reads.py ...   # data-parallel: each rank counts its shard

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
import logging
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from titanmem.build import build_run  # noqa: E402
from titanmem.components.checkpoint import saved_step  # noqa: E402
from titanmem.components.export import is_export  # noqa: E402
from titanmem.components.read_counts import ReadCounter, save_read_counts  # noqa: E402
from titanmem.config import ConfigError  # noqa: E402
from titanmem.data.dataloader import build_dataloader  # noqa: E402
from titanmem.data.files import resolve_data_source  # noqa: E402
from titanmem.plan import plan_from_command_line  # noqa: E402
from titanmem.utils import autocast, exit_with, print_output, setup_logging  # noqa: E402

logger = logging.getLogger("titanmem")

USAGE = ("python tools/count_memory_reads.py [--out FILE] [--batches N] [--job.config_file FILE] "
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
    setup_logging()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], add_help=False)
    parser.add_argument("--out", help="the counts file to write (new, outside the run read)")
    parser.add_argument("--batches", type=int, default=100, help="batches to count, per rank (default 100)")
    args, overrides = parser.parse_known_args(argv)
    if "--help" in overrides or "-h" in overrides:
        print_output(__doc__)  # then the config's fields, as every entry point prints them
    if args.batches < 1:
        print(f"error: --batches must be at least 1, got {args.batches}", file=sys.stderr)
        return 2
    started = plan_from_command_line(overrides, "eval", USAGE)
    if isinstance(started, int):
        return started
    config, plan = started
    try:
        if plan.model_args.memory is None:
            raise ConfigError("memory.enabled", "is false: this model has no memory to count reads of")
        if plan.parallel.tp > 1:
            raise ConfigError("parallelism.tp", "must be 1 here: tensor parallel splits each read's heads over ranks")
        out = output_path(args.out, plan.checkpoint_to_load, config.job.dump_folder)
        source = resolve_data_source(config.data)
        run = build_run(plan)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        dp_rank, dp_size = plan.parallel.data_parallel_position()
        loader = build_dataloader(config, source, run.tokenizer, dp_rank, dp_size, run.device)
        counter = ReadCounter(plan.model_args.memory.n_values, run.device)
        run.model.memory_values.observer = counter.observe
        run.model.eval()
        start = time.perf_counter()
        with torch.no_grad():
            for number, batch in zip(range(1, args.batches + 1), loader):
                inputs = batch["input"].to(run.device)
                counter.start_batch(inputs.shape[0])
                with autocast(run.device, plan.autocast_dtype):
                    run.model(inputs)
                counter.end_batch(inputs.numel())
                if run.rank == 0 and (number % 50 == 0 or number == args.batches):
                    logger.info("counted %d of %d batches (%.0f s)", number, args.batches,
                                time.perf_counter() - start)
        counts = counter.counts
        if counts.batches < args.batches:
            raise ConfigError("data.path", f"ran out of data after {counts.batches} of {args.batches} batches")
        if dist.is_initialized():
            for tensor in (counts.reads, counts.documents_reading):
                dist.all_reduce(tensor)
            totals = torch.tensor([counts.documents, counts.batches, counts.tokens], device=run.device)
            dist.all_reduce(totals)
            counts.documents, counts.batches, counts.tokens = (int(v) for v in totals.tolist())
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
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    exit_with(main())
