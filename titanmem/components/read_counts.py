"""How often each value row of the memory is read over a sample of text, as one safetensors file.

Sparse memory finetuning ranks rows by TF-IDF: a row read often by the new data (its term frequency) and rarely by
the pretraining data (its inverse document frequency) is one the new data owns. The second part needs *background
counts*, accumulated over batches of the pretraining data by `tools/count_memory_reads.py` with the memory layers'
observer hook, the one the telemetry counts with. The same tool counts the new data for a selection fixed over the
whole finetuning set (`finetune.selection = "per_dataset"`).

Per row, over all memory layers (they share the table) and heads, a file holds:
- `reads`: the reads of the row ((token, head, slot) triples that selected it);
- `batches_reading`: in how many of the counted batches the row was read at least once (its document frequency,
  a batch being one document of the TF-IDF);
and, as metadata, the number of batches and tokens counted and a description of what was counted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from titanmem.config.errors import ConfigError

FORMAT = "titanmem-memory-read-counts-v1"


@dataclass
class ReadCounts:
    reads: torch.Tensor
    """[N] int64: reads of each row."""
    batches_reading: torch.Tensor
    """[N] int64: batches that read each row at least once."""
    batches: int = 0
    tokens: int = 0
    description: dict = field(default_factory=dict)
    """What was counted: the checkpoint, the data, the command (free-form, saved as JSON)."""

    @property
    def n_values(self) -> int:
        return self.reads.numel()

    def to(self, device: torch.device) -> "ReadCounts":
        return ReadCounts(self.reads.to(device), self.batches_reading.to(device), self.batches, self.tokens,
                          self.description)


class ReadCounter:
    """Accumulates `ReadCounts` batch by batch: `observe` every memory-layer read of a batch (the signature of
    `MemoryValues.observer`), then `end_batch`."""

    def __init__(self, n_values: int, device: torch.device):
        self.counts = ReadCounts(torch.zeros(n_values, dtype=torch.int64, device=device),
                                 torch.zeros(n_values, dtype=torch.int64, device=device))
        self._batch = torch.zeros(n_values, dtype=torch.int64, device=device)

    @torch.no_grad()
    def observe(self, layer, indices: torch.Tensor, weights: torch.Tensor) -> None:
        self._batch += torch.bincount(indices.flatten(), minlength=self.counts.n_values)

    def end_batch(self, tokens: int) -> None:
        self.counts.reads += self._batch
        self.counts.batches_reading += self._batch > 0
        self.counts.batches += 1
        self.counts.tokens += tokens
        self._batch.zero_()


def save_read_counts(counts: ReadCounts, path: str | Path) -> None:
    """Write `counts` to `path` (a new file; written beside it and renamed, so a crash leaves no half file)."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    save_file({"reads": counts.reads.cpu().contiguous(), "batches_reading": counts.batches_reading.cpu().contiguous()},
              str(partial), metadata={"format": FORMAT, "batches": str(counts.batches), "tokens": str(counts.tokens),
                                      "description": json.dumps(counts.description)})
    partial.replace(path)


def load_read_counts(path: str | Path, field: str, n_values: int) -> ReadCounts:
    """The counts in `path`, checked against a table of `n_values` rows; a ConfigError naming `field` otherwise."""
    path = Path(path)
    fix = "make it with tools/count_memory_reads.py from the checkpoint being finetuned"
    if not path.is_file():
        raise ConfigError(field, f"no such file: {path}; {fix}")
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            tensors = {name: file.get_tensor(name) for name in file.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise ConfigError(field, f"{path} is not a read-counts file ({' '.join(str(error).split())[:200]}); "
                          f"{fix}") from None
    if metadata.get("format") != FORMAT or set(tensors) != {"reads", "batches_reading"}:
        raise ConfigError(field, f"{path} is not a read-counts file (format {metadata.get('format')!r}); {fix}")
    reads, batches_reading = tensors["reads"], tensors["batches_reading"]
    try:
        batches, tokens = int(metadata["batches"]), int(metadata["tokens"])
        description = json.loads(metadata.get("description", "{}"))
    except (KeyError, ValueError):
        raise ConfigError(field, f"{path} has a damaged header; {fix}") from None
    if reads.shape != (n_values,) or batches_reading.shape != (n_values,):
        raise ConfigError(field, f"{path} counts a table of {reads.numel():,} rows, but this model's has "
                          f"{n_values:,}; {fix}")
    if (reads.dtype != torch.int64 or batches_reading.dtype != torch.int64 or batches < 1 or
            bool((reads < 0).any()) or bool((batches_reading < 0).any()) or bool((batches_reading > batches).any())):
        raise ConfigError(field, f"{path} holds inconsistent counts; {fix}")
    return ReadCounts(reads, batches_reading, batches, tokens, description)
