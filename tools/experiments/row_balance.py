"""How evenly a rows-sharded value table (`value_slice_sharding = "rows"`) spreads a trained model's reads over its
row blocks: the load of each block (its share of all reads) for R blocks, under the contiguous blocks titanmem uses
and under two other row-to-owner maps for comparison (row modulo R, and a fixed random permutation).

    python -m tools.experiments.row_balance COUNTS [--blocks 2 4 8 16 64]

COUNTS is a read-count file of `titanmem-count-reads` (reads of each row over batches of the data). A block's
load is its reads over the mean block's: the busiest block sets the pace of the lookup's bag and of the update, so the
table prints max/mean (1.00 is perfect balance) and the spread (the blocks' coefficient of variation).
"""

from __future__ import annotations

import argparse
import sys

import torch

from titanmem.components.read_counts import load_read_counts
from titanmem.config import ConfigError


def block_loads(reads: torch.Tensor, blocks: int, mapping: str) -> torch.Tensor:
    """[blocks] reads per block under `mapping`: contiguous (DTensor's Shard(0) cut), modulo, or permuted."""
    rows = reads.numel()
    if mapping == "contiguous":
        size = -(-rows // blocks)
        owner = torch.arange(rows) // size
    elif mapping == "modulo":
        owner = torch.arange(rows) % blocks
    else:
        owner = torch.randperm(rows, generator=torch.Generator().manual_seed(0)) % blocks
    return torch.zeros(blocks, dtype=torch.float64).index_add_(0, owner, reads.double())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("counts", help="a read-count file of titanmem-count-reads")
    parser.add_argument("--blocks", type=int, nargs="+", default=[2, 4, 8, 16, 64])
    args = parser.parse_args()
    try:
        counts = load_read_counts(args.counts, "counts")
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    reads = counts.reads
    print(f"{args.counts}: {reads.numel():,} rows, {int(reads.sum()):,} reads over {counts.tokens:,} tokens; "
          f"{int((reads > 0).sum()):,} rows read at least once")
    print("| blocks | contiguous max/mean | contiguous CV | modulo max/mean | modulo CV | permuted max/mean | "
          "permuted CV |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for blocks in args.blocks:
        cells = []
        for mapping in ("contiguous", "modulo", "permuted"):
            loads = block_loads(reads, blocks, mapping)
            mean = loads.mean()
            cells += [f"{(loads.max() / mean).item():.3f}", f"{(loads.std() / mean).item():.3f}"]
        print(f"| {blocks} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
