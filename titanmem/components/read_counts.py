"""How often each value row of the memory is read over a sample of text, as one safetensors file.

Sparse memory finetuning ranks rows by TF-IDF: a row read often by the new data (its term frequency) and rarely by
the pretraining data (its inverse document frequency) is one the new data owns. The second part needs *background
counts*, accumulated over batches of the pretraining data by `titanmem-count-reads` with the memory layers'
observer hook, the one the telemetry counts with. The same tool counts the new data for a selection fixed over the
whole finetuning set (`finetune.selection = "per_dataset"`).

Per row, over all memory layers (they share the table) and heads, a file holds:
- `reads`: the reads of the row ((token, head, slot) triples that selected it);
- `documents_reading`: in how many of the counted sequences the row was read at least once (its document frequency,
  a sequence being one document of the TF-IDF);
and, as metadata, the number of sequences, batches and tokens counted and a description of what was counted.

The document is the sequence, not the batch: a batch of 16 × 2,048 tokens makes 12.6M reads (3 memory layers ×
4 heads × top-32 per token), about 12 per row of a 1M-row table, so nearly every row is read in every batch, the
idf of almost every row is log(1) = 0, and the ranking is left to the few rows the pretraining data hardly uses.
One sequence of 2,048 tokens reads the average row less than once, and the document frequency tells rows apart.
(Version 1 of the format counted batches; it is refused, to be counted again.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from titanmem.config.errors import ConfigError
from titanmem.utils import give_plain_file_mode

FORMAT = "titanmem-memory-read-counts-v2"


@dataclass
class ReadCounts:
    reads: torch.Tensor
    """[N] int64: reads of each row."""
    documents_reading: torch.Tensor
    """[N] int64: sequences that read each row at least once."""
    documents: int = 0
    """Sequences counted."""
    batches: int = 0
    tokens: int = 0
    description: dict = field(default_factory=dict)
    """What was counted: the checkpoint, the data, the command (free-form, saved as JSON)."""

    @property
    def n_values(self) -> int:
        return self.reads.numel()

    def to(self, device: torch.device) -> "ReadCounts":
        return ReadCounts(self.reads.to(device), self.documents_reading.to(device), self.documents, self.batches,
                          self.tokens, self.description)


class ReadCounter:
    """Accumulates `ReadCounts` batch by batch: `start_batch` with the batch's sequence count, `observe` every
    memory-layer read of the batch (the signature of `MemoryValues.observer`), then `end_batch`."""

    def __init__(self, n_values: int, device: torch.device):
        self.counts = ReadCounts(torch.zeros(n_values, dtype=torch.int64, device=device),
                                 torch.zeros(n_values, dtype=torch.int64, device=device))
        self._device = device
        self._read_by: torch.Tensor | None = None  # [sequences, N] bool: the batch's sequences that read each row

    def start_batch(self, sequences: int) -> None:
        self._read_by = torch.zeros(sequences, self.counts.n_values, dtype=torch.bool, device=self._device)

    @torch.no_grad()
    def observe(self, layer, indices: torch.Tensor, weights: torch.Tensor) -> None:
        """`indices`: [tokens, reads per token], the batch's sequences one after the other."""
        if self._read_by is None:
            raise RuntimeError("ReadCounter.observe before start_batch")
        self.counts.reads += torch.bincount(indices.flatten(), minlength=self.counts.n_values)
        sequences = self._read_by.shape[0]
        per_sequence = indices.reshape(sequences, -1)
        self._read_by[torch.arange(sequences, device=indices.device)[:, None].expand_as(per_sequence),
                      per_sequence] = True

    def end_batch(self, tokens: int) -> None:
        self.counts.documents_reading += self._read_by.sum(0)
        self.counts.documents += self._read_by.shape[0]
        self.counts.batches += 1
        self.counts.tokens += tokens
        self._read_by = None


def save_read_counts(counts: ReadCounts, path: str | Path) -> None:
    """Write `counts` to `path` (a new file; written beside it and renamed, so a crash leaves no half file)."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    tensors = {"reads": counts.reads.cpu().contiguous(),
               "documents_reading": counts.documents_reading.cpu().contiguous()}
    save_file(tensors, str(partial), metadata={
        "format": FORMAT, "documents": str(counts.documents), "batches": str(counts.batches),
        "tokens": str(counts.tokens), "description": json.dumps(counts.description)})
    give_plain_file_mode(partial)
    partial.replace(path)


def load_read_counts(path: str | Path, field: str, n_values: int | None = None) -> ReadCounts:
    """The counts in `path`, checked against a table of `n_values` rows (any, when None); a ConfigError naming
    `field` otherwise."""
    path = Path(path)
    fix = ("make it with titanmem-count-reads (python -m titanmem.count_memory_reads) from the checkpoint being "
           "finetuned")
    if not path.is_file():
        raise ConfigError(field, f"no such file: {path}; {fix}")
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            tensors = {name: file.get_tensor(name) for name in file.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise ConfigError(field, f"{path} is not a read-counts file ({' '.join(str(error).split())[:200]}); "
                          f"{fix}") from None
    if metadata.get("format") == "titanmem-memory-read-counts-v1":
        raise ConfigError(field, f"{path} counts document frequency per batch (format v1), which leaves nearly every "
                          f"row's idf at 0; count again: {fix}")
    if metadata.get("format") != FORMAT or set(tensors) != {"reads", "documents_reading"}:
        raise ConfigError(field, f"{path} is not a read-counts file (format {metadata.get('format')!r}); {fix}")
    reads, documents_reading = tensors["reads"], tensors["documents_reading"]
    try:
        documents, batches, tokens = int(metadata["documents"]), int(metadata["batches"]), int(metadata["tokens"])
        description = json.loads(metadata.get("description", "{}"))
    except (KeyError, ValueError):
        raise ConfigError(field, f"{path} has a damaged header; {fix}") from None
    n_values = reads.numel() if n_values is None else n_values
    if reads.shape != (n_values,) or documents_reading.shape != (n_values,):
        raise ConfigError(field, f"{path} counts a table of {reads.numel():,} rows, but this model's has "
                          f"{n_values:,}; {fix}")
    if (reads.dtype != torch.int64 or documents_reading.dtype != torch.int64 or documents < 1 or batches < 1 or
            bool((reads < 0).any()) or bool((documents_reading < 0).any()) or
            bool((documents_reading > documents).any())):
        raise ConfigError(field, f"{path} holds inconsistent counts; {fix}")
    return ReadCounts(reads, documents_reading, documents, batches, tokens, description)
