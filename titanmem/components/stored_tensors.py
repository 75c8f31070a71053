"""A model's weights as stored on disk, read tensor by tensor and rows at a time, without building the model.

`open_stored_tensors` opens a DCP `step-N` checkpoint or an exported folder; `read(name, start, stop)` gives rows
[start, stop) of a tensor's first dimension (the elements of a 1-D one), so that a reader of a table larger than the
host's memory holds one block of rows at a time.

The checkpoint reader is `dcp_tensors.CheckpointTensors`, the exported-folder reader
`export_tensors.ExportTensors`; both read rows through `stored_blocks.TensorRecord`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch

from titanmem.components.dcp_tensors import CheckpointTensors
from titanmem.components.export import OutputTensor, is_export
from titanmem.components.export_tensors import ExportTensors
from titanmem.config.errors import ConfigError


class StoredTensors(Protocol):
    """The model tensors stored in a folder, by model parameter name."""

    path: Path
    field: str
    """The config field that names the folder, for errors."""
    settings_hint: str
    """What to do when the tensors do not fit the model (names the config that matches them)."""

    def names(self) -> list[str]: ...

    def check(self) -> None:
        """Refuse a damaged folder before anything is written from it: every tensor's file and layout is looked at
        (not its data)."""
        ...

    def shape(self, name: str) -> torch.Size: ...

    def dtype(self, name: str) -> torch.dtype: ...

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) of dim 0 (`stop` None: to the end); a 0-D tensor whole."""
        ...


def open_stored_tensors(path: str | Path) -> StoredTensors:
    """The tensors of a `step-N` checkpoint folder or of an exported folder."""
    if is_export(path):
        return ExportTensors(path)
    if (Path(path) / ".metadata").is_file():
        return CheckpointTensors(path)
    raise ConfigError("checkpoint.folder", f"{path} is neither a complete checkpoint (no .metadata file) nor an "
                      "exported folder (no model.safetensors.index.json)")


def require_shapes(source: StoredTensors, expected: dict[str, tuple[int, ...]]) -> None:
    """Every name of `expected` must be stored with that shape: else one line naming the first that is not (a tensor
    of another shape before a missing one, as `checkpoint_io.load_tensors` tells them)."""
    stored = set(source.names())
    missing = []
    for name, shape in expected.items():
        if name not in stored:
            missing.append(name)
        elif tuple(source.shape(name)) != tuple(shape):
            raise ConfigError(source.field, f"{source.path} holds {name} of shape {list(source.shape(name))}, but "
                              f"this model's is {list(shape)}: the model settings differ; {source.settings_hint}")
    if missing:
        raise ConfigError(source.field, f"{source.path} lacks {len(missing)} tensors this model has (first: "
                          f"{missing[0]}): it was saved by another model, or is incomplete; {source.settings_hint}")


def outputs_of(source: StoredTensors, dtypes: dict[str, torch.dtype]) -> dict[str, OutputTensor]:
    """The tensors of `source` that `dtypes` names, to export under the same names, each read as the dtype given: the
    model's dtype of that weight, which loading the checkpoint into the model would have cast it to."""
    return {name: OutputTensor(tuple(source.shape(name)), _reader(source, name, dtype))
            for name, dtype in dtypes.items()}


def _reader(source: StoredTensors, name: str, dtype: torch.dtype) -> Callable[[int, int], torch.Tensor]:
    return lambda start, stop: source.read(name, start, stop).to(dtype)
