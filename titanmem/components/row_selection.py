"""Which value rows a sparse memory finetuning step trains: the top-t by TF-IDF (Lin et al., 2025).

A row's score is tf × idf, with
- tf = the row's reads in the new data / all reads of the new data (per step: the step's reads, all memory layers,
  micro-batches and data-parallel ranks; per dataset: the reads counted over the whole finetuning set);
- idf = log((D + 1) / (d + 1)), D the background sequences counted and d those that read the row.

A row that the pretraining data reads in every batch scores near 0 however often the new data reads it; a row the
new data reads and the background never did scores highest. Ties go to the lower row, so every rank that ranks the
same reads picks the same rows.

Rows outside the step's reads have no gradient and are never candidates: the selection is a flag per touched row,
never a mask of the whole table (`titanmem.kernels.row_update` takes it).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from titanmem.components.read_counts import ReadCounts
from titanmem.distributed.memory_parallel import all_gather_rows


def tfidf_scores(reads: torch.Tensor, documents_reading: torch.Tensor, background_documents: int,
                 total_reads: torch.Tensor | None = None) -> torch.Tensor:
    """[U] float64 TF-IDF of rows read `reads` times in the new data (of `total_reads`, default their sum) and by
    `documents_reading` of the `background_documents` background sequences."""
    reads = reads.double()
    total = reads.sum() if total_reads is None else total_reads.double()
    tf = reads / total.clamp(min=1)
    idf = torch.log((background_documents + 1) / (documents_reading.double() + 1))
    return tf * idf


def top_rows(scores: torch.Tensor, t: int) -> torch.Tensor:
    """[U] bool: the `t` highest scores (all when there are fewer); among equal scores the earlier position wins."""
    order = torch.sort(scores, descending=True, stable=True).indices
    chosen = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    chosen[order[:t]] = True
    return chosen


def top_rows_of_blocks(scores: torch.Tensor, rows: torch.Tensor, t: int, group) -> torch.Tensor:
    """The rows (ascending) of the `t` highest scores over every rank of `group`, each passing its own `rows` and
    their `scores`; equal scores go to the lower row, as `top_rows` on all of them would. Each rank's own top-t holds
    every row of the overall top-t that it has, so only those travel."""
    mine = top_rows(scores, t)
    padding = t - int(mine.sum())
    # Padded to t per rank with scores below any real one (TF-IDF is >= 0).
    candidate_scores = torch.cat([scores[mine], scores.new_full((padding,), -1.0)])
    candidate_rows = torch.cat([rows[mine], rows.new_full((padding,), -1)])
    gathered_scores = all_gather_rows(candidate_scores, group)
    gathered_rows = all_gather_rows(candidate_rows, group)
    # By score, descending, then by row, ascending: two stable sorts, the minor key first.
    by_row = torch.sort(gathered_rows, stable=True).indices
    order = by_row[torch.sort(gathered_scores[by_row], descending=True, stable=True).indices]
    chosen = gathered_rows[order[:t]]
    return chosen[chosen >= 0].sort().values


class RowSelector:
    """The rows a step trains, as a flag per touched row. Per step, it ranks the step's touched rows by their reads
    in the step; per dataset (`dataset` counts given), the top-t rows of the whole set are fixed at the start and a
    step trains those it touches."""

    def __init__(self, top_t: int, background: ReadCounts, dataset: ReadCounts | None = None):
        if dataset is not None and dataset.n_values != background.n_values:
            raise ValueError(f"the dataset counts ({dataset.n_values} rows) and the background ({background.n_values})"
                             " count different tables")
        self.top_t = top_t
        self.background = background
        self.fixed_rows: torch.Tensor | None = None
        if dataset is not None:
            read = dataset.reads.nonzero().flatten()
            scores = tfidf_scores(dataset.reads[read], background.documents_reading.to(read.device)[read],
                                  background.documents)
            self.fixed_rows = read[top_rows(scores, top_t)].sort().values  # ascending, for searchsorted

    def __call__(self, rows: torch.Tensor, offsets: torch.Tensor, blocks_group=None) -> torch.Tensor:
        """[U] bool for the touched `rows` (ascending, the whole table's row numbers), grouped as `offsets` ([U + 1]
        into the step's reads). With `blocks_group`, the table's rows are split in blocks over that group, each rank
        passing its block's rows: the per-step ranking is then made over all of them, as on one process."""
        if self.fixed_rows is None:
            reads = offsets[1:] - offsets[:-1]
            total = reads.sum()
            if blocks_group is not None:
                dist.all_reduce(total, group=blocks_group)
            scores = tfidf_scores(reads, self.background.documents_reading[rows.long()], self.background.documents,
                                  total)
            if blocks_group is None:
                return top_rows(scores, self.top_t)
            return torch.isin(rows.long(), top_rows_of_blocks(scores, rows.long(), self.top_t, blocks_group))
        fixed = self.fixed_rows
        if fixed.numel() == 0:
            return torch.zeros(rows.numel(), dtype=torch.bool, device=rows.device)
        position = torch.searchsorted(fixed, rows.to(fixed.dtype)).clamp(max=fixed.numel() - 1)
        return fixed[position] == rows.to(fixed.dtype)

    def describe(self) -> str:
        how = (f"the {self.top_t:,} rows of highest TF-IDF in each step" if self.fixed_rows is None else
               f"{self.fixed_rows.numel():,} rows fixed by their TF-IDF over the finetuning set")
        return f"{how}, against {self.background.documents:,} background sequences"

