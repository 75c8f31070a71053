"""One safetensors file written as a stream: the header first, then each tensor's bytes block by block, as they are
produced. The writer holds one block at a time, whatever the file's size.

The bytes are those of `safetensors.torch.save_file(tensors, path, metadata)` for the same tensors: an 8-byte
little-endian header length, the JSON header (`__metadata__` first, then each tensor in the order of its data), padded
with spaces to a multiple of 8 bytes, then the tensors' little-endian bytes with no gaps. save_file orders the
tensors by dtype, widest alignment first (the order of safetensors' dtype list, reversed), then by name.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

# safetensors' dtype names, in the order of its dtype list (save_file places a later dtype first).
_DTYPE_ORDER: tuple[tuple[torch.dtype, str], ...] = (
    (torch.bool, "BOOL"),
    (torch.uint8, "U8"),
    (torch.int8, "I8"),
    (torch.float8_e5m2, "F8_E5M2"),
    (torch.float8_e4m3fn, "F8_E4M3"),
    (torch.int16, "I16"),
    (torch.uint16, "U16"),
    (torch.float16, "F16"),
    (torch.bfloat16, "BF16"),
    (torch.int32, "I32"),
    (torch.uint32, "U32"),
    (torch.float32, "F32"),
    (torch.complex64, "C64"),
    (torch.float64, "F64"),
    (torch.int64, "I64"),
    (torch.uint64, "U64"),
)
DTYPE_NAMES: dict[torch.dtype, str] = dict(_DTYPE_ORDER)
_RANK = {dtype: rank for rank, (dtype, _) in enumerate(_DTYPE_ORDER)}


@dataclass(frozen=True)
class StreamedTensor:
    """A tensor to write: its dtype and shape, and `blocks()`, which yields its elements in row-major order as
    consecutive blocks (tensors of that dtype, any shape); together they hold exactly the tensor's elements."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    blocks: Callable[[], Iterable[torch.Tensor]]

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * self.dtype.itemsize


def file_order(tensors: dict[str, StreamedTensor]) -> list[str]:
    """The names in the order save_file writes their data: widest dtype first, then by name."""
    for name, tensor in tensors.items():
        if tensor.dtype not in DTYPE_NAMES:
            raise ValueError(f"{name}: safetensors has no name for {tensor.dtype}")
    return sorted(tensors, key=lambda name: (-_RANK[tensors[name].dtype], name))


def header_bytes(tensors: dict[str, StreamedTensor], metadata: dict[str, str] | None) -> bytes:
    """The 8-byte length and the padded JSON header of a file of `tensors`, as save_file writes them."""
    header: dict[str, object] = {}
    if metadata is not None:
        # save_file keeps `metadata` in a hash map: with several keys its order is not fixed; with one it is.
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name in file_order(tensors):
        tensor = tensors[name]
        header[name] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    # serde_json's compact form: no spaces, non-ASCII as is, control characters escaped as Python escapes them.
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_safetensors(path: str | Path, tensors: dict[str, StreamedTensor],
                      metadata: dict[str, str] | None = None) -> int:
    """Write `tensors` to one safetensors file at `path`, pulling each one's blocks as it goes; returns the file's
    size. A tensor whose blocks do not add up to its shape is a programming error (ValueError)."""
    order = file_order(tensors)
    with open(path, "wb") as handle:
        size = handle.write(header_bytes(tensors, metadata))
        for name in order:
            tensor = tensors[name]
            written = 0
            for block in tensor.blocks():
                if block.dtype != tensor.dtype:
                    raise ValueError(f"{name}: a block of {block.dtype}, but the tensor is {tensor.dtype}")
                data = block.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
                written += handle.write(memoryview(data.numpy()))
                del block, data  # before the next block is made: one block at a time
            if written != tensor.nbytes:
                raise ValueError(f"{name}: its blocks hold {written} bytes, its shape {list(tensor.shape)} "
                                 f"{tensor.nbytes}")
            size += written
    return size
