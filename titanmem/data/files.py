"""Which local files a `data.path` names, and what format they are. Light on imports: the config checks use it."""

from __future__ import annotations

import glob
from pathlib import Path

from titanmem.config.manager import resolve_asset_path

_BUILDER_BY_SUFFIX = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text", ".text": "text"}
_COMPRESSION_SUFFIXES = {".gz", ".bz2", ".xz", ".zst"}


def suffix_builder(file_name: str) -> str | None:
    """The `datasets` builder for a file name (`json`, `parquet`, `text`), looking through compression suffixes."""
    suffixes = [s.lower() for s in Path(file_name).suffixes]
    while suffixes and suffixes[-1] in _COMPRESSION_SUFFIXES:
        suffixes.pop()
    return _BUILDER_BY_SUFFIX.get(suffixes[-1]) if suffixes else None


def local_data_files(path: str) -> list[str]:
    """Files under a directory, the file itself, or the matches of a (recursive) glob; sorted."""
    resolved = resolve_asset_path(path)
    if resolved.is_dir():
        return sorted(str(p) for p in resolved.rglob("*") if p.is_file() and suffix_builder(p.name))
    if resolved.is_file():
        return [str(resolved)]
    return sorted(glob.glob(str(resolved), recursive=True))


def looks_local(path: str) -> bool:
    """A path a user clearly meant as local (a hub name is `owner/name` with no suffix, glob or leading ./ or /)."""
    return (
        path.startswith(("/", "./", "../", "~"))
        or any(ch in path for ch in "*?[")
        or suffix_builder(path) is not None
    )
