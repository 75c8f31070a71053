"""The tensors of an exported folder (safetensors files and their index), read by rows without building the model.

Each file's JSON header is read and checked against the file's size when the folder is opened; then only the bytes of
the rows asked for are read.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path, PurePosixPath

import torch

from titanmem.components.safetensors_folder import INDEX
from titanmem.components.safetensors_stream import DTYPE_NAMES
from titanmem.components.stored_blocks import TensorRecord, numel, plain_ints, reason, row_range
from titanmem.config.errors import ConfigError

# safetensors refuses longer headers.
_MAX_HEADER_BYTES = 100_000_000

_SAFETENSORS_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}


class ExportTensors:
    """The tensors of an exported folder (safetensors files and their index), read by rows."""

    field = "checkpoint.initial_load_path"
    settings_hint = "match the model settings of its config.json"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            weight_map = json.loads((self.path / INDEX).read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("its weight_map is not a mapping")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(self.field, f"{self.path / INDEX} is not a safetensors index ({reason(e)})") from None
        self._records: dict[str, TensorRecord] = {}
        headers: dict[str, tuple[int, int, dict]] = {}
        for name, file in sorted(weight_map.items()):
            if not isinstance(file, str) or PurePosixPath(file).name != file or file in ("", ".", ".."):
                raise ConfigError(self.field, f"{self.path / INDEX} places {name} in {file!r}, not a file of the "
                                  "folder: the exported folder is damaged; export it again")
            if file not in headers:
                headers[file] = self._header(self.path / file)
            self._records[name] = self._tensor(self.path / file, *headers[file], name)

    def _damaged(self, file: Path, problem: str) -> ConfigError:
        return ConfigError(self.field, f"{file} cannot be read ({problem}): the exported folder is damaged; export it "
                          "again")

    def _header(self, file: Path) -> tuple[int, int, dict]:
        """(where the data starts, the file's size, the parsed JSON header) of a safetensors file."""
        try:
            with open(file, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                prefix = handle.read(8)
                length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
                if not 0 <= length <= min(_MAX_HEADER_BYTES, size - 8):
                    raise self._damaged(file, "no safetensors header")
                header = json.loads(handle.read(length))
        except OSError as e:
            raise ConfigError(self.field, f"{file} cannot be read ({e.strerror or e})") from None
        except ValueError as e:
            if isinstance(e, ConfigError):
                raise
            raise self._damaged(file, f"its header is not JSON: {reason(e)}")
        if not isinstance(header, dict):
            raise self._damaged(file, "its header is not a mapping")
        return 8 + length, size, header

    def _tensor(self, file: Path, data_start: int, size: int, header: dict, name: str) -> TensorRecord:
        entry = header.get(name)
        if not isinstance(entry, dict):
            raise self._damaged(file, f"it holds no tensor {name}, which the index places there")
        dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype"))
        shape = plain_ints(entry.get("shape"))
        offsets = plain_ints(entry.get("data_offsets"))
        if dtype is None or shape is None or offsets is None or len(offsets) != 2:
            raise self._damaged(file, f"its header gives {name} no plain dtype, shape and offsets")
        begin, end = offsets
        if end - begin != numel(shape) * dtype.itemsize or data_start + end > size:
            raise self._damaged(file, f"its header places {name} outside the file, or at the wrong length")
        stride = tuple(numel(shape[d + 1:]) for d in range(len(shape)))
        return TensorRecord(file, data_start + begin, end - begin, dtype, 0, shape, stride)

    def names(self) -> list[str]:
        return sorted(self._records)

    def check(self) -> None:
        """Nothing more to look at: every file's header was checked against its size when the folder was opened."""

    def _get(self, name: str) -> TensorRecord:
        if name not in self._records:
            raise ConfigError(self.field, f"{self.path} has no tensor {name}: it was exported from another model; "
                              f"{self.settings_hint}")
        return self._records[name]

    def shape(self, name: str) -> torch.Size:
        return torch.Size(self._get(name).size)

    def dtype(self, name: str) -> torch.dtype:
        return self._get(name).dtype

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        record = self._get(name)
        if not record.size:
            return record.rows(0, 1, self.field)
        return record.rows(*row_range(record.size, start, stop), self.field)
