"""Reading a folder of safetensors files (titanmem's export, or a Hugging Face model): which file holds each tensor,
and the tensors' lazy slices, so that each rank reads only the block it stores."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from titanmem.config.errors import ConfigError

INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def weight_files(folder: Path, field: str) -> dict[str, str]:
    """Tensor name -> safetensors file, from the folder's index or its one `model.safetensors`."""
    if (folder / INDEX).is_file():
        try:
            return dict(json.loads((folder / INDEX).read_text())["weight_map"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(field, f"{folder / INDEX} is not a safetensors index ({e})") from None
    if (folder / SINGLE_FILE).is_file():
        with safe_open(str(folder / SINGLE_FILE), framework="pt", device="cpu") as handle:
            return dict.fromkeys(handle.keys(), SINGLE_FILE)
    raise ConfigError(field, f"{folder} has no safetensors weights ({INDEX} or {SINGLE_FILE}); titanmem does not "
                      "unpickle .bin files: convert them to safetensors first")


class SafetensorsFolder:
    """The tensors of a folder, each file opened once, on first use; a context manager that closes them."""

    def __init__(self, folder: Path, field: str):
        self.folder = folder
        self.files = weight_files(folder, field)
        self._handles: dict[str, object] = {}

    def get_slice(self, name: str):
        """The lazy slice of tensor `name` (`get_shape()`, and indexing reads only the block asked for)."""
        file = self.files[name]
        if file not in self._handles:
            self._handles[file] = safe_open(str(self.folder / file), framework="pt", device="cpu")
        return self._handles[file].get_slice(name)

    def __enter__(self) -> "SafetensorsFolder":
        return self

    def __exit__(self, *exc) -> None:
        self._handles.clear()
