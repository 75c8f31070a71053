"""Local data files read record by record, so that a bad record is found with its file, line and reason.

A record is bad when its line is not UTF-8, not JSON (a truncated last line included), not a JSON object, has no
text field, or holds something other than a string there; a text file is bad when it is not UTF-8; a compressed file
is bad from the point where it cannot be decompressed. The readers never raise on a bad record: they yield it with its
problem, and the caller applies `data.on_bad_record` (stop, or skip and count).
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator

from titanmem.config.errors import ConfigError
from titanmem.data.files import format_reader

# Decompressors by suffix; zstd is optional, as it is for `datasets`.
_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_BOM = b"\xef\xbb\xbf"
# What a damaged compressed stream or a failing disk raises while being read.
_READ_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError, ValueError)


@dataclass(frozen=True)
class Record:
    """One record of a file: its value, or the reason it is bad. `line` is 1-based (the record's index + 1 for a file
    holding one JSON array)."""

    path: str
    line: int
    value: Any = None
    problem: str | None = None

    @property
    def description(self) -> str:
        """Where the record is and what is wrong with it."""
        return f"{self.path} line {self.line}: {self.problem}"


def bad_record_error(description: str, field: str = "data.path") -> ConfigError:
    """The error that stops a run at a bad record (`Record.description`), with the fix."""
    fix = "fix or remove it, or set data.on_bad_record = 'skip'" if field == "data.path" else "fix the file"
    return ConfigError(field, f"bad record at {description}; {fix}")


def open_binary(path: str | Path) -> IO[bytes]:
    """The file's bytes, decompressed as its suffix says."""
    suffix = Path(path).suffix.lower()
    if suffix == ".zst":
        try:
            import zstandard
        except ImportError:
            raise ConfigError("data.path", f"{path} is zstd-compressed; pip install zstandard, or decompress it") from None
        return zstandard.open(path, "rb")
    return _OPENERS.get(suffix, open)(path, "rb")


def _short(error: BaseException) -> str:
    return " ".join(str(error).split())[:200]


def _describe_read_error(error: BaseException) -> str:
    return f"the file cannot be read from here on ({type(error).__name__}: {_short(error)})"


def _decode(raw: bytes) -> tuple[str | None, str | None]:
    """The text of `raw`, or the reason it is not UTF-8."""
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"


def _is_json_file(path: str) -> bool:
    """`.json` (not `.jsonl`) under any compression suffix: such a file may hold one array of records."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    while suffixes and (suffixes[-1] in _OPENERS or suffixes[-1] == ".zst"):
        suffixes.pop()
    return bool(suffixes) and suffixes[-1] == ".json"


def _first_significant_byte(path: str | Path) -> bytes:
    try:
        with open_binary(path) as handle:
            while chunk := handle.read(4096):
                if stripped := chunk.removeprefix(_BOM).lstrip():
                    return stripped[:1]
    except _READ_ERRORS:
        pass  # the line reader reports it, with the line it happened at
    return b""


def json_records(path: str | Path) -> Iterator[Record]:
    """The JSON values of a JSON-lines file (one per non-blank line), or the elements of a file holding one JSON
    array."""
    path = str(path)
    if _is_json_file(path) and _first_significant_byte(path) == b"[":
        yield from _json_array_records(path)
        return
    line = 0
    try:
        with open_binary(path) as handle:
            for line, raw in enumerate(handle, start=1):
                if line == 1:
                    raw = raw.removeprefix(_BOM)  # editors on Windows start UTF-8 files with one
                if not raw.strip():
                    continue
                text, problem = _decode(raw)
                if problem is not None:
                    yield Record(path, line, problem=problem)
                    continue
                try:
                    yield Record(path, line, json.loads(text))
                except json.JSONDecodeError as e:
                    # Only a file's last line can lack its newline: a write cut short.
                    what = "not valid JSON" if raw.endswith(b"\n") else "a truncated last line"
                    yield Record(path, line, problem=f"{what} ({e.msg}, column {e.colno})")
                except (ValueError, RecursionError) as e:  # an integer too long to convert, nesting too deep
                    yield Record(path, line, problem=f"not usable JSON ({type(e).__name__}: {_short(e)})")
    except _READ_ERRORS as e:
        yield Record(path, line + 1, problem=_describe_read_error(e))


def _json_array_records(path: str) -> Iterator[Record]:
    try:
        with open_binary(path) as handle:
            raw = handle.read()
    except _READ_ERRORS as e:
        yield Record(path, 1, problem=_describe_read_error(e))
        return
    decoded = _decode_file(path, raw)
    if decoded.problem is not None:
        yield decoded
        return
    try:
        values = json.loads(decoded.value)
    except json.JSONDecodeError as e:
        yield Record(path, e.lineno, problem=f"not valid JSON ({e.msg}, column {e.colno})")
        return
    except (ValueError, RecursionError) as e:
        yield Record(path, 1, problem=f"not usable JSON ({type(e).__name__}: {_short(e)})")
        return
    for index, value in enumerate(values):
        yield Record(path, index + 1, value)


def missing_field_problem(text_field: str) -> str:
    return f"no field {text_field!r}"


def text_of(record: Record, text_field: str) -> Record:
    """`record` with its value replaced by its document text (a string, or None for a null text), or made bad."""
    if record.problem is not None:
        return record
    value = record.value
    if not isinstance(value, dict):
        return Record(record.path, record.line, problem=f"a JSON {type(value).__name__}, not an object")
    if text_field not in value:
        fields = ", ".join(list(value)[:8]) or "none"
        return Record(record.path, record.line, problem=f"{missing_field_problem(text_field)} (its fields: {fields})")
    text = value[text_field]
    if text is not None and not isinstance(text, str):
        return Record(record.path, record.line, problem=f"{text_field!r} holds a JSON {type(text).__name__}, not text")
    if text:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate escape such as \ud800, common in scraped dumps
            return Record(record.path, record.line, problem=f"{text_field!r} holds a lone surrogate "
                          f"(U+{ord(text[e.start]):04X} at character {e.start}), which is not text")
    return Record(record.path, record.line, text)


def text_file_record(path: str | Path) -> Record:
    """A text file as one document (so that documents are separated between files, not lines)."""
    path = str(path)
    try:
        with open_binary(path) as handle:
            raw = handle.read()
    except _READ_ERRORS as e:
        return Record(path, 1, problem=_describe_read_error(e))
    return _decode_file(path, raw)


def _decode_file(path: str, raw: bytes) -> Record:
    """A whole file's text, or where it stops being UTF-8."""
    raw = raw.removeprefix(_BOM)
    try:
        return Record(path, 1, raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        return Record(path, line, problem=f"not UTF-8 (byte 0x{raw[e.start]:02x} at column {column})")


def document_records(path: str | Path, builder: str, text_field: str) -> Iterator[Record]:
    """The documents of one local file of data format `builder` (one that reads records: json, text or a registered
    one), each a text or a bad record."""
    yield from format_reader(builder)(path, text_field)


def json_documents(path: str | Path, text_field: str) -> Iterator[Record]:
    """The `json` format's reader: each record's `text_field` (JSON lines, or one JSON array)."""
    for record in json_records(path):
        yield text_of(record, text_field)


def text_documents(path: str | Path, text_field: str) -> Iterator[Record]:
    """The `text` format's reader: the whole file as one document (so that documents are separated between files, not
    lines)."""
    yield text_file_record(path)
