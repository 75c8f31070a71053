"""Which local files a `data.path` names, and what format they are. Light on imports: the run plan resolves the data
source with it before anything is built."""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

from titanmem.config.errors import ConfigError
from titanmem.config.manager import resolve_asset_path
from titanmem.config.sections import Data as DataConfig

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


@dataclass(frozen=True)
class DataSource:
    """What `data.path` resolved to: a `datasets` builder (json, parquet, text) and its local files, or a hub name."""

    builder: str
    files: tuple[str, ...] = ()

    @property
    def is_hub(self) -> bool:
        return self.builder == "hub"


def resolve_data_source(config: DataConfig) -> DataSource:
    """`data.format = auto` resolved: the format from the files' extensions; a path that matches no local file and
    does not look local is a hub name."""
    if config.format == "hub":
        return DataSource("hub")
    files = local_data_files(config.path)
    if not files:
        if config.format == "auto" and not looks_local(config.path):
            return DataSource("hub")
        raise ConfigError("data.path", f"no local file matches {config.path}; fix the path, or set data.format = 'hub'")
    builder = config.format
    if builder == "auto":
        kinds = {suffix_builder(f) for f in files}
        if len(kinds) != 1 or None in kinds:
            raise ConfigError(
                "data.format", f"cannot infer one format from {config.path} (found {sorted(map(str, kinds))}); set it"
            )
        builder = kinds.pop()
    return DataSource(builder, tuple(files))
