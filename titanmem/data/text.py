"""Documents in, fixed-length token windows out: HF `datasets` for reading, packing with EOS separators, and a
resumable position in the stream.

Each data-parallel rank (and each loader worker inside it) reads its own disjoint shard of the documents. The
position is kept as (epoch, next document, leftover tokens), so a checkpoint resumes mid-epoch on the exact token,
and can be dealt out again to another number of shards (`titanmem.data.position`).
"""

from __future__ import annotations

import random
from typing import Any, Iterator

import datasets
from datasets.distributed import split_dataset_by_node
import torch
from torch.utils.data import IterableDataset, get_worker_info

from titanmem.config.errors import ConfigError
from titanmem.config.sections import Data as DataConfig
from titanmem.data.facts import Fact, fact_statements
from titanmem.data.files import DataSource
from titanmem.data.position import ShardState, is_consumed
from titanmem.data.tokenizer import Tokenizer


def load_documents(config: DataConfig, source: DataSource) -> datasets.Dataset | datasets.IterableDataset:
    """Open the corpus that `source` (`resolve_data_source(config)`) names as a dataset of documents."""
    if source.is_hub:
        return datasets.load_dataset(
            config.path, config.hub_config or None, split=config.split, streaming=config.streaming
        )
    # A text file is one document, not one document per line, so EOS separators fall between files.
    extra = {"sample_by": "document"} if source.builder == "text" else {}
    try:
        documents = datasets.load_dataset(
            source.builder, data_files={config.split: list(source.files)}, split=config.split,
            streaming=config.streaming, **extra
        )
    except Exception as e:  # the reader's own error (Arrow, JSON, gzip, UTF-8): the file, not titanmem, is at fault
        field = "data.format" if config.format != "auto" else "data.path"
        reason = " ".join(str(e).split())[:300]
        raise ConfigError(field, f"{config.path} cannot be read as {source.builder} ({type(e).__name__}: {reason}); "
                          "fix the file, or set data.format to its format") from None
    column_names = documents.column_names
    if column_names is not None and config.text_field not in column_names:
        raise ConfigError("data.text_field", f"{config.text_field!r} is not a column of {config.path}: {column_names}")
    return documents


def check_shardable(documents: datasets.Dataset | datasets.IterableDataset, dp_world_size: int, workers: int) -> None:
    """Every rank and loader worker must get documents; checked up front, since inside a worker it would surface as
    an opaque worker crash."""
    if isinstance(documents, datasets.IterableDataset):
        # A stream is split over ranks by example, then over a rank's workers by file shard.
        if workers > documents.num_shards:
            raise ConfigError(
                "data.num_workers",
                f"a streamed dataset splits over loader workers by file, and {documents.num_shards} file(s) cannot "
                f"feed {workers} workers; use at most {documents.num_shards}",
            )
        return
    shards = dp_world_size * max(workers, 1)
    if len(documents) < shards:
        raise ConfigError(
            "data.path", f"has {len(documents)} documents, fewer than the {shards} shards (ranks × loader workers)"
        )


class PackedTokenDataset(IterableDataset):
    """Yields {"input": [seq_len], "labels": [seq_len]} windows cut from the concatenated, EOS-separated documents.

    Consecutive windows overlap by one token, so every transition in the stream is trained on once. The stream
    cycles over the corpus forever; the training loop decides when to stop.
    """

    def __init__(
        self,
        documents: datasets.Dataset | datasets.IterableDataset,
        tokenizer: Tokenizer,
        seq_len: int,
        text_field: str = "text",
        dp_rank: int = 0,
        dp_world_size: int = 1,
        facts: list[Fact] | None = None,
        facts_fraction: float = 0.0,
        seed: int = 0,
    ):
        self.documents = documents
        # Only seen facts are ever stated; the rest stay unseen for the recall eval.
        self.facts = [fact for fact in facts or [] if fact.seen]
        self.facts_fraction = facts_fraction if self.facts else 0.0
        self.seed = seed
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.text_field = text_field
        self.dp_rank = dp_rank
        self.dp_world_size = dp_world_size
        self._epoch = 0
        self._next_document = 0
        self._buffer: list[int] = []
        # Documents an earlier shard count already read (see titanmem.data.position), until this shard passes them.
        self._consumed: list[dict] = []
        self._shard: datasets.Dataset | datasets.IterableDataset | None = None
        self._shard_id, self._num_shards = 0, 1
        self._pending_stream_state: dict | None = None
        # Positions of every shard after a change of the shard count, taken by each shard when it starts.
        self._resharded: list[ShardState] | None = None

    def continue_from(self, states: list[ShardState]) -> None:
        """Start each shard at its position in `states` (one per shard of this run: `position.reshard`)."""
        if isinstance(self.documents, datasets.IterableDataset):
            raise ConfigError("data.on_reshard", "a streamed dataset cannot continue its order on another number of "
                              "shards; set data.on_reshard = 'restart' to start the data order afresh")
        self._resharded = states

    def _shard_for_this_worker(self):
        worker = get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker else (1, 0)
        num_shards = self.dp_world_size * workers
        shard_id = self.dp_rank * workers + worker_id
        self._shard_id, self._num_shards = shard_id, num_shards
        if self._resharded is not None:
            self.load_state_dict(self._resharded[shard_id])
            self._resharded = None
        if isinstance(self.documents, datasets.IterableDataset):
            # Split by rank only: inside a loader worker, `datasets` itself hands each worker its own file shards.
            return split_dataset_by_node(self.documents, rank=self.dp_rank, world_size=self.dp_world_size)
        check_shardable(self.documents, self.dp_world_size, workers)
        return self.documents.shard(num_shards=num_shards, index=shard_id, contiguous=False)

    def _texts(self) -> Iterator[str]:
        """This shard's documents from the saved position on, advancing `_next_document` as each is taken."""
        shard = self._shard
        if isinstance(shard, datasets.IterableDataset):
            shard.set_epoch(self._epoch)
            if self._pending_stream_state is not None:
                shard.load_state_dict(self._pending_stream_state)
                self._pending_stream_state = None
            for row in shard:
                self._next_document += 1
                yield row[self.text_field]
            return
        for index in range(self._next_document, len(shard)):
            self._next_document = index + 1
            # Round-robin dealing: this shard's index-th document is the corpus's document index · S + shard.
            if self._consumed and is_consumed(self._consumed, index * self._num_shards + self._shard_id, self._epoch):
                self._skipped_in_epoch = True
                continue
            yield shard[index][self.text_field]

    def _fact_tokens(self, document_tokens: int) -> list[int]:
        """The fact statements that follow the current document: about facts_fraction / (1 - facts_fraction) of its
        length. They depend only on (seed, epoch, shard, document index), so a resumed stream repeats them."""
        rng = random.Random(f"facts:{self.seed}:{self._epoch}:{self._shard_id}:{self._next_document}")
        wanted = document_tokens * self.facts_fraction / (1 - self.facts_fraction)
        tokens: list[int] = []
        while len(tokens) < wanted:
            tokens.extend(self.tokenizer.encode(fact_statements(self.facts, rng, 1) + " "))
        return tokens

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._shard is None:
            self._shard = self._shard_for_this_worker()
        window = self.seq_len + 1
        while True:
            epoch_has_text = bool(self._buffer)
            self._skipped_in_epoch = False
            for text in self._texts():
                if not text:
                    continue  # an empty or null document would only add a lone separator
                epoch_has_text = True
                document = self.tokenizer.encode(text)
                self._buffer.extend(document)
                self._buffer.append(self.tokenizer.eos_id)
                if self.facts_fraction:
                    self._buffer.extend(self._fact_tokens(len(document)))
                    self._buffer.append(self.tokenizer.eos_id)
                while len(self._buffer) >= window:
                    tokens = torch.tensor(self._buffer[:window], dtype=torch.long)
                    # Trim before yielding: the state seen while suspended must be the state *after* this window.
                    self._buffer = self._buffer[self.seq_len :]
                    yield {"input": tokens[:-1], "labels": tokens[1:]}
            if not epoch_has_text and not self._skipped_in_epoch:
                raise ConfigError("data.path", f"the shard of data-parallel rank {self.dp_rank} holds no text")
            self._epoch += 1
            self._next_document = 0
            # A table's documents lie in its epochs only: once past them, this shard needs it no more.
            self._consumed = [t for t in self._consumed if max(t["epochs"]) >= self._epoch]

    def state_dict(self) -> dict[str, Any]:
        state = {"epoch": self._epoch, "next_document": self._next_document, "buffer": list(self._buffer)}
        if self._consumed:
            state["consumed"] = self._consumed
        if isinstance(self._shard, datasets.IterableDataset):
            state["stream"] = self._shard.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._epoch = state["epoch"]
        self._next_document = state["next_document"]
        self._buffer = list(state["buffer"])
        self._consumed = list(state.get("consumed", []))
        self._pending_stream_state = state.get("stream")

