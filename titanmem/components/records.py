"""Plain data (None, bool, int, float, str, lists, tuples, dicts with string keys) as a uint8 tensor of JSON, so
that checkpoints hold no pickles: reading one back can build only such data, never run code.

Tuples are tagged so that they come back as tuples (Python's RNG state must); anything else is refused when saving.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch

_TUPLE = "__tuple__"


def _tagged(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise TypeError(f"{where}: {value} cannot be saved as a record (JSON has no such number)")
        return value
    if isinstance(value, tuple):
        return {_TUPLE: [_tagged(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_tagged(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"{where}: only string keys can be saved, got {sorted(map(repr, value))}")
        if _TUPLE in value:
            raise TypeError(f"{where}: the key name {_TUPLE!r} is reserved")
        return {k: _tagged(v, f"{where}.{k}") for k, v in value.items()}
    raise TypeError(f"{where}: {type(value).__name__} is not plain data and cannot be saved as a record")


def _untagged(value: Any) -> Any:
    if isinstance(value, list):
        return [_untagged(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {_TUPLE}:
            return tuple(_untagged(v) for v in value[_TUPLE])
        return {k: _untagged(v) for k, v in value.items()}
    return value


def encode_record(value: Any) -> torch.Tensor:
    """`value` as a 1-D uint8 tensor (UTF-8 JSON)."""
    text = json.dumps(_tagged(value, "record"), separators=(",", ":"), allow_nan=False)
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).clone()


def decode_record(tensor: torch.Tensor) -> Any:
    """The plain data of `encode_record`; ValueError if the bytes are not such a record."""
    if tensor.dtype != torch.uint8 or tensor.ndim != 1:
        raise ValueError(f"a record is a 1-D uint8 tensor, got {tensor.dtype} of shape {tuple(tensor.shape)}")
    try:
        return _untagged(json.loads(bytes(tensor.cpu().numpy()).decode("utf-8")))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"a record is not valid JSON: {e}") from None
