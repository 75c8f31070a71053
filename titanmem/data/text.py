"""Documents in, fixed-length token windows out: HF `datasets` for reading, packing with EOS separators, and a
resumable position in the stream.

Each data-parallel rank (and each loader worker inside it) reads its own disjoint shard of the documents. The
position is kept as (epoch, next document, leftover tokens), so a checkpoint resumes mid-epoch on the exact token,
and can be dealt out again to another number of shards (`titanmem.data.position`).
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import math
import os
import random
from pathlib import Path
from typing import Any, Iterator

import datasets
import pyarrow
import pyarrow.compute
import pyarrow.parquet
from datasets.distributed import split_dataset_by_node
import torch
from torch.utils.data import IterableDataset, get_worker_info

from titanmem.config.errors import ConfigError
from titanmem.config.sections import Data as DataConfig
from titanmem.data.facts import Fact, FactText
from titanmem.data.files import DataSource, data_format, format_reader
from titanmem.data.position import ShardState, is_consumed
from titanmem.data import records
from titanmem.data.records import bad_record_error, document_records, missing_field_problem
from titanmem.data.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


# The column that marks a bad record of a local file (its place and reason; null for a good one). Bad records keep
# their row, so that document indices, and with them saved positions, do not depend on `data.on_bad_record`.
BAD_RECORD = "titanmem_bad_record"
# A streamed corpus is checked this far before the model is built; the rest is checked as it is read.
STREAM_SAMPLE_RECORDS = 10_000


def _readers_fingerprint(builder: str) -> str:
    """The readers' own source (the format's reader's too), so that a cached Arrow table made by other readers is not
    reused."""
    source = (Path(records.__file__).read_bytes() + inspect.getsource(_document_rows).encode()
              + inspect.getsource(format_reader(builder)).encode())
    return hashlib.sha256(source).hexdigest()


def _document_rows(files: list[str], builder: str, text_field: str, stamps=None, version=None) -> Iterator[dict]:
    """Rows of (text, bad-record mark) of local files. `stamps` and `version` only key the Arrow cache."""
    rows = 0
    for path in files:
        for record in document_records(path, builder, text_field):
            bad = record.problem is not None
            rows += 1
            yield {text_field: None if bad else record.value, BAD_RECORD: record.description if bad else None}
    if not rows:
        yield {text_field: None, BAD_RECORD: None}  # empty files: one empty document, so the corpus says it is empty


def _file_stamps(files: tuple[str, ...]) -> tuple:
    """What identifies a file's contents cheaply (size and modification time), so an edited file is read again."""
    stamps = []
    for path in files:
        stat = os.stat(path)
        stamps.append((path, stat.st_size, stat.st_mtime_ns))
    return tuple(stamps)


def _reader_error(config: DataConfig, what: str, error: Exception) -> ConfigError:
    """A reader's own error (Arrow, parquet, the hub): the data, not titanmem, is at fault."""
    field = "data.format" if config.format != "auto" else "data.path"
    reason = " ".join(str(error).split())[:300]
    return ConfigError(field, f"{what} cannot be read ({type(error).__name__}: {reason}); fix it, or set data.format "
                       "to its format")


def load_documents(config: DataConfig, source: DataSource) -> datasets.Dataset | datasets.IterableDataset:
    """Open the corpus that `source` (`resolve_data_source(config)`) names as a dataset of documents, its local
    records checked as `data.on_bad_record` says (all of them; a streamed corpus, a sample). A format that reads
    records goes through titanmem's record readers; one that loads a dataset loads it itself."""
    if data_format(source.builder).reads == "records":
        documents = _load_local_documents(config, source)
    else:
        documents = format_reader(source.builder)(config, source)
    column_names = documents.column_names
    if column_names is not None and config.text_field not in column_names:
        raise ConfigError("data.text_field", f"{config.text_field!r} is not a column of {config.path}: {column_names}")
    return documents


def hub_documents(config: DataConfig, source: DataSource) -> datasets.Dataset | datasets.IterableDataset:
    """The `hub` format's loader: the hub dataset `data.path` names."""
    try:
        return datasets.load_dataset(config.path, config.hub_config or None, split=config.split,
                                     streaming=config.streaming)
    except Exception as e:  # offline, unknown name, no such split: the hub's own error says which
        raise _reader_error(config, f"the hub dataset {config.path}", e) from None


def parquet_documents(config: DataConfig, source: DataSource) -> datasets.Dataset | datasets.IterableDataset:
    """The `parquet` format's loader: its files through `datasets`, after a check of their footers."""
    check_parquet_files(config, source.files)
    try:
        return datasets.load_dataset("parquet", data_files={config.split: list(source.files)}, split=config.split,
                                     streaming=config.streaming)
    except Exception as e:
        raise _reader_error(config, f"{config.path} as parquet", e) from None


def _load_local_documents(config: DataConfig, source: DataSource) -> datasets.Dataset | datasets.IterableDataset:
    """Local files through the format's record reader (`records.document_records`), into an Arrow table (cached like
    `datasets` caches its own) or a stream."""
    features = datasets.Features({config.text_field: datasets.Value("string"), BAD_RECORD: datasets.Value("string")})
    kwargs = {"builder": source.builder, "text_field": config.text_field}
    if config.streaming:
        check_stream_sample(config, source)
        # One shard per file, so loader workers split the stream by file.
        return datasets.IterableDataset.from_generator(
            _document_rows, features=features, gen_kwargs={"files": list(source.files), **kwargs})
    # No progress bar: a bad record must end the run with one line, not below a half-drawn bar.
    bars_were_on = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        documents = datasets.Dataset.from_generator(
            _document_rows, features=features, split=datasets.Split(config.split),
            gen_kwargs={"files": list(source.files), "stamps": _file_stamps(source.files),
                        "version": _readers_fingerprint(source.builder), **kwargs})
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    marks = documents.data.column(BAD_RECORD)
    bad = len(marks) - marks.null_count
    if bad:
        first = marks.drop_null()[0].as_py()
        if marks[0].is_valid and missing_field_problem(config.text_field) in first:
            # Not a bad record but a wrong setting: the very first record lacks the field.
            raise ConfigError("data.text_field", f"{first}; set data.text_field to the field that holds the text")
        if config.on_bad_record == "stop":
            raise bad_record_error(first + (f" (and {bad - 1} more)" if bad > 1 else ""))
        logger.warning("data: skipped %d bad record(s) of %s (data.on_bad_record = 'skip'); the first: %s",
                       bad, config.path, first)
    lengths = pyarrow.compute.utf8_length(documents.data.column(config.text_field))
    if not pyarrow.compute.max(lengths).as_py():
        raise ConfigError("data.path", f"no document of {config.path} holds any text"
                          + (f" ({bad} bad record(s) skipped)" if bad else ""))
    return documents


def check_stream_sample(config: DataConfig, source: DataSource) -> None:
    """Read the start of a streamed local corpus before anything expensive, so that a bad first file stops the run
    at once."""
    bad = []
    for count, record in enumerate(document_records(source.files[0], source.builder, config.text_field)):
        if count >= STREAM_SAMPLE_RECORDS:
            break
        if record.problem is not None:
            if config.on_bad_record == "stop":
                raise bad_record_error(record.description)
            bad.append(record.description)
    if bad:
        logger.warning("data: %d bad record(s) in the first %d records of %s will be skipped (data.on_bad_record = "
                       "'skip'); the first: %s", len(bad), STREAM_SAMPLE_RECORDS, source.files[0], bad[0])


def check_parquet_files(config: DataConfig, files: tuple[str, ...]) -> None:
    """Every parquet file opens and holds `data.text_field` as strings (its footer only, cheap at any size)."""
    text_field = config.text_field
    for path in files:
        try:
            schema = pyarrow.parquet.read_schema(path)
        except Exception as e:
            raise _reader_error(config, f"{path} as parquet", e) from None
        if text_field not in schema.names:
            raise ConfigError("data.text_field", f"{text_field!r} is not a column of {path}: {schema.names}")
        kind = schema.field(text_field).type
        if not (pyarrow.types.is_string(kind) or pyarrow.types.is_large_string(kind) or pyarrow.types.is_null(kind)
                or getattr(pyarrow.types, "is_string_view", lambda _: False)(kind)):
            raise ConfigError("data.text_field", f"column {text_field!r} of {path} holds {kind}, not text; set "
                              "data.text_field to the text column")


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
        facts_qa_share: float = 0.0,
        seed: int = 0,
        on_bad_record: str = "stop",
    ):
        self.documents = documents
        self.on_bad_record = on_bad_record
        self.bad_records_skipped = 0
        # Only seen facts are ever trained on; the rest stay unseen for the recall eval.
        self.fact_text = FactText(facts or [], facts_qa_share)
        self.facts_fraction = facts_fraction if self.fact_text.seen else 0.0
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

    def _texts(self) -> Iterator[str | None]:
        """This shard's document texts from the saved position on, advancing `_next_document` as each is taken; a
        bad record stops or is skipped (None) as `on_bad_record` says."""
        for row in self._rows():
            text = row[self.text_field]
            problem = row.get(BAD_RECORD)
            if problem is None and text is not None and not isinstance(text, str):
                problem = (f"document {self._next_document - 1} of shard {self._shard_id}: {self.text_field!r} holds "
                           f"{type(text).__name__}, not text")
            if problem is None:
                yield text
                continue
            if self.on_bad_record == "stop":
                raise bad_record_error(problem)
            self.bad_records_skipped += 1
            # Named once: in the first pass over the shard (a fixed table was counted when it was loaded).
            first_pass = self._epoch == 0 and isinstance(self._shard, datasets.IterableDataset)
            if first_pass and (self.bad_records_skipped <= 10 or math.log10(self.bad_records_skipped).is_integer()):
                logger.warning("data: skipped bad record %d of this shard (data.on_bad_record = 'skip'): %s",
                               self.bad_records_skipped, problem)
            yield None

    def _rows(self) -> Iterator[dict]:
        """This shard's rows from the saved position on, advancing `_next_document` as each is taken."""
        shard = self._shard
        if isinstance(shard, datasets.IterableDataset):
            shard.set_epoch(self._epoch)
            if self._pending_stream_state is not None:
                shard.load_state_dict(self._pending_stream_state)
                self._pending_stream_state = None
            for row in shard:
                self._next_document += 1
                yield row
            return
        for index in range(self._next_document, len(shard)):
            self._next_document = index + 1
            # Round-robin dealing: this shard's index-th document is the corpus's document index · S + shard.
            if self._consumed and is_consumed(self._consumed, index * self._num_shards + self._shard_id, self._epoch):
                self._skipped_in_epoch = True
                continue
            yield shard[index]

    def _fact_tokens(self, document_tokens: int) -> list[int]:
        """The fact text that follows the current document, one item per line: about facts_fraction / (1 -
        facts_fraction) of its length. It depends only on (seed, epoch, shard, document index), so a resumed stream
        repeats it."""
        rng = random.Random(f"facts:{self.seed}:{self._epoch}:{self._shard_id}:{self._next_document}")
        wanted = document_tokens * self.facts_fraction / (1 - self.facts_fraction)
        tokens: list[int] = []
        while len(tokens) < wanted:
            tokens.extend(self.tokenizer.encode(self.fact_text.item(rng) + "\n"))
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

