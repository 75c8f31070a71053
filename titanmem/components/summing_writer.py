"""DCP's file writer, summing each data file for the manifest while it writes it.

A save's manifest needs the CRC-32 of every 64 MiB chunk of every file (`titanmem.components.manifest`). Summed
after the write, that is a second pass over the whole checkpoint, from the page cache at best: about a tenth of a
sync save (docs/benchmarks.md). Here each writer thread sums the bytes of its own file as it hands them to the file,
so the checksums are ready when the last byte is written.

What DCP writes through a stream is a sequence of appends. A stream that is moved (`seek` elsewhere than its end) or
cut (`truncate`) has no digest here, and the caller sums that file by reading it (`file_digests`), as before.
"""

from __future__ import annotations

import contextlib
import io
import threading
import zlib
from pathlib import Path
from typing import Any

import torch.distributed.checkpoint as dcp

from titanmem.components.faults import disk_write_point
from titanmem.components.manifest import CHUNK_BYTES


class SummingStream:
    """A binary write stream that sums what passes through it, by `CHUNK_BYTES` chunks of the file."""

    def __init__(self, stream):
        self._stream = stream
        self._size = 0
        self._crcs: list[int] = []
        self._crc = 0
        self._filled = 0
        self._appends_only = True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        disk_write_point(len(view))
        written = self._stream.write(view)
        written = len(view) if written is None else written
        view = view[:written]
        while len(view):
            take = min(len(view), CHUNK_BYTES - self._filled)
            self._crc = zlib.crc32(view[:take], self._crc)
            self._filled += take
            view = view[take:]
            if self._filled == CHUNK_BYTES:
                self._crcs.append(self._crc)
                self._crc, self._filled = 0, 0
        self._size += written
        return written

    def seek(self, offset: int, whence: int = 0) -> int:
        position = self._stream.seek(offset, whence)
        if position != self._size:
            self._appends_only = False
        return position

    def truncate(self, size: int | None = None) -> int:
        self._appends_only = False
        return self._stream.truncate(size)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:  # tell, flush, fileno, close, writable, seekable, ...
        return getattr(self._stream, name)

    def digest(self) -> dict | None:
        """{"size", "crc32": [hex of each chunk]}, as `file_digests` gives it; None if the stream did not only append."""
        if not self._appends_only:
            return None
        crcs = self._crcs + ([self._crc] if self._filled or not self._crcs else [])
        return {"size": self._size, "crc32": [f"{crc:08x}" for crc in crcs]}


class _Discard(io.RawIOBase):
    """Where a writer thread's items go when their file could not be opened: the save has failed already, and the
    thread must still drain its queue without an error of its own."""

    def __init__(self):
        super().__init__()
        self._position = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        written = memoryview(data).nbytes
        self._position += written
        return written

    def tell(self) -> int:
        return self._position


class _SummingFileSystem:
    """DCP's file system, with its data files' write streams summed, and their write errors kept."""

    def __init__(self, fs, record, fail):
        self._fs, self._record, self._fail = fs, record, fail

    @contextlib.contextmanager
    def create_stream(self, path, mode: str):
        if mode != "wb" or not str(path).endswith(".distcp"):
            with self._fs.create_stream(path, mode) as stream:
                yield stream
            return
        # DCP's writer threads let an error escape, to be printed as a traceback and lost: the save would then complete
        # without that thread's files. Kept here, it fails the save in the thread that runs it (`write_data`). The
        # opening and the closing are inside too: on a full disk, the close flushes the file's buffer and fails again.
        summing = None
        try:
            with self._fs.create_stream(path, mode) as stream:
                summing = SummingStream(stream)
                yield summing
        except Exception as error:  # noqa: BLE001 - whatever stopped the write: kept, and raised by write_data
            self._fail(error)
            if summing is None:  # the file could not be opened: the thread writes its items nowhere, and moves on
                yield _Discard()
            return
        self._record(Path(path).name, summing.digest())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fs, name)


class SummingWriter(dcp.FileSystemWriter):
    """`dcp.FileSystemWriter` whose data files' digests are in `digests` once written ({file name: digest or None})."""

    def __init__(self, path: str, **kwargs):
        super().__init__(path, **kwargs)
        self.digests: dict[str, dict | None] = {}
        self.failures: list[Exception] = []
        self._lock = threading.Lock()
        if hasattr(getattr(self, "fs", None), "create_stream"):  # else: no digests, and the caller reads the files
            self.fs = _SummingFileSystem(self.fs, self._record, self._fail)

    def write_data(self, plan, planner):
        """DCP's write, which raises the first error any of its threads met (a full disk, say), so that DCP fails the
        save on every rank rather than completing one that lacks a file."""
        written = super().write_data(plan, planner)
        if self.failures:
            raise self.failures[0]
        return written

    def _record(self, name: str, digest: dict | None) -> None:
        with self._lock:
            self.digests[name] = digest

    def _fail(self, error: Exception) -> None:
        with self._lock:
            self.failures.append(error)
