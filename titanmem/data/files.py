"""Which local files a `data.path` names, what format they are, and the formats' readers (the entries of
`titanmem.registry.DATA_FORMATS`). Light on imports: the run plan resolves the data source with it before anything is
built."""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from titanmem.config.errors import ConfigError
from titanmem.config.manager import resolve_asset_path
from titanmem.config.sections import Data as DataConfig
from titanmem.registry import DATA_FORMATS, REMOTE_FORMAT, DataFormat

_COMPRESSION_SUFFIXES = {".gz", ".bz2", ".xz", ".zst"}


def suffix_builder(file_name: str) -> str | None:
    """The data format a file name's suffix names (`json`, `parquet`, `text`, or a registered one), looking through
    compression suffixes; None if none does."""
    suffixes = [s.lower() for s in Path(file_name).suffixes]
    while suffixes and suffixes[-1] in _COMPRESSION_SUFFIXES:
        suffixes.pop()
    if not suffixes:
        return None
    return next((entry.name for entry in DATA_FORMATS.entries if suffixes[-1] in entry.suffixes), None)


def data_format(name: str) -> DataFormat:
    """The registry entry of data format `name`: how its reader reads."""
    return DATA_FORMATS.get(name)


def format_reader(name: str) -> Any:
    """The reader of data format `name`, imported now (a record reader or a dataset loader, as its entry's `reads`
    says)."""
    return DATA_FORMATS.load(name)


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


@dataclass(frozen=True)
class DataSource:
    """What `data.path` resolved to: a data format (`builder`: json, parquet, text or a registered one) and its local
    files, or a remote format (the hub) and no files."""

    builder: str
    files: tuple[str, ...] = ()

    @property
    def is_hub(self) -> bool:
        """`data.path` names a remote dataset, not local files."""
        return not data_format(self.builder).local


def resolve_data_source(config: DataConfig) -> DataSource:
    """`data.format = auto` resolved: the format from the files' extensions; a path that matches no local file and
    does not look local is a hub name."""
    if config.format != "auto" and not data_format(config.format).local:
        return DataSource(config.format)
    files = local_data_files(config.path)
    if not files:
        if config.format == "auto" and not looks_local(config.path):
            return DataSource(REMOTE_FORMAT)
        raise ConfigError("data.path", f"no local file matches {config.path}; fix the path, or set data.format = "
                          f"'{REMOTE_FORMAT}'")
    builder = config.format
    if builder == "auto":
        kinds = {suffix_builder(f) for f in files}
        if len(kinds) != 1 or None in kinds:
            raise ConfigError(
                "data.format", f"cannot infer one format from {config.path} (found {sorted(map(str, kinds))}); set it"
            )
        builder = kinds.pop()
    return DataSource(builder, tuple(files))
