"""A checkpoint's manifest: every file of a `step-N` folder with its size and checksums, written before the folder is
made complete and verified before it is read, so that a truncated, deleted or corrupted file is caught instead of
loaded.

Checksums are CRC-32 of 64 MiB chunks: zlib computes one at several GB/s per core and releases the GIL, so the chunks
of a file are summed in parallel threads, and a value table of hundreds of GB costs seconds per rank. (CRC-32 catches
damage, not tampering; a planted checkpoint is the restricted unpickler's concern, `checkpoint_io`.) Each rank sums
the files it wrote, as it writes them (`titanmem.components.summing_writer`; a file written otherwise is read back
while still hot in the page cache); rank 0 adds any other file (DCP's `.metadata`) and writes `manifest.json`. A load
spreads the verification over the ranks the same way.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MANIFEST = "manifest.json"
# The steps a checkpoint's timeline went back to (`titanmem.components.checkpoint`): read before a resume decides
# which checkpoint to load, so the manifest must cover it like the checkpoint's own files.
TIMELINE = "timeline.json"
CHUNK_BYTES = 64 << 20
_THREADS = max(1, min(8, os.cpu_count() or 1))
_VERSION = 1


def _chunk_crc(path: Path, offset: int, length: int) -> int:
    with open(path, "rb", buffering=0) as handle:
        return zlib.crc32(os.pread(handle.fileno(), length, offset))


def file_digests(folder: str | Path, names: list[str]) -> dict[str, dict]:
    """{name: {"size", "crc32": [hex of each chunk]}} of the files `names` in `folder`, their chunks in parallel."""
    folder = Path(folder)
    sizes = {name: (folder / name).stat().st_size for name in names}
    jobs = [(name, offset, min(CHUNK_BYTES, sizes[name] - offset))
            for name in names for offset in range(0, max(sizes[name], 1), CHUNK_BYTES)]
    with ThreadPoolExecutor(_THREADS) as pool:
        crcs = list(pool.map(lambda job: _chunk_crc(folder / job[0], job[1], job[2]), jobs))
    digests = {name: {"size": sizes[name], "crc32": []} for name in names}
    for (name, _, _), crc in zip(jobs, crcs):
        digests[name]["crc32"].append(f"{crc:08x}")
    return digests


def files_of_rank(folder: str | Path, rank: int) -> list[str]:
    """The data files DCP's file writer named for `rank` (`__<rank>_<n>.distcp`)."""
    pattern = re.compile(rf"^__{rank}_\d+\.distcp$")
    return sorted(p.name for p in Path(folder).iterdir() if pattern.match(p.name))


def write_json_to_disk(path: str | Path, record: dict) -> None:
    """`record` as JSON in the file at `path`, flushed to disk before the folder holding it is made complete."""
    with open(path, "w") as handle:
        json.dump(record, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())


def write_manifest(folder: str | Path, digests: dict[str, dict]) -> None:
    """`manifest.json` of `digests` plus every other file of `folder` (summed here), flushed to disk."""
    folder = Path(folder)
    others = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name not in digests and p.name != MANIFEST)
    files = {**digests, **file_digests(folder, others)}
    write_json_to_disk(folder / MANIFEST, {"version": _VERSION, "algorithm": "crc32", "chunk_bytes": CHUNK_BYTES,
                                           "files": dict(sorted(files.items()))})


def read_manifest(folder: str | Path) -> dict | None:
    """The manifest's file table; None when the folder has none (saved by an older titanmem). Raises ValueError
    when it exists but is damaged."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_bytes())
        files = manifest["files"]
        if manifest.get("chunk_bytes") != CHUNK_BYTES or not all(
                isinstance(d["size"], int) and isinstance(d["crc32"], list) for d in files.values()):
            raise ValueError("unexpected layout")
        # File names of this folder only: a manifest must not send the check to read files elsewhere.
        if any(not isinstance(n, str) or "/" in n or "\\" in n or n in ("", ".", "..") for n in files):
            raise ValueError("a file name outside the folder")
        if any(len(d["crc32"]) != max(1, -(-d["size"] // CHUNK_BYTES)) for d in files.values()):
            raise ValueError("a checksum list that does not match its file's size")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{MANIFEST} is damaged ({type(e).__name__}: {e})") from None
    return files


def uncovered_files(folder: str | Path, files: dict[str, dict]) -> list[str]:
    """The checkpoint files of `folder` (DCP's index and data files, the timeline) that the manifest table `files` does
    not list: a manifest that leaves one out would let it load unchecked."""
    pattern = re.compile(rf"^(\.metadata|__\d+_\d+\.distcp|{re.escape(TIMELINE)})$")
    return sorted(p.name for p in Path(folder).iterdir() if pattern.match(p.name) and p.name not in files)


def verify_files(folder: str | Path, files: dict[str, dict], names: list[str]) -> list[str]:
    """The problems of the files `names` of `folder` against the manifest table `files` (empty when all hold)."""
    folder = Path(folder)
    problems, present = [], []
    for name in names:
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != files[name]["size"]:
            problems.append(f"{name} has {path.stat().st_size} bytes, not {files[name]['size']}")
        else:
            present.append(name)
    for name, digest in file_digests(folder, present).items():
        if digest["crc32"] != files[name]["crc32"]:
            bad = next(i for i, (a, b) in enumerate(zip(digest["crc32"], files[name]["crc32"])) if a != b)
            problems.append(f"{name} is corrupted (checksum mismatch from byte {bad * CHUNK_BYTES:,})")
    return problems
