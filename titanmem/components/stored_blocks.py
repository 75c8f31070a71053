"""The stored bytes of one tensor in a file, and the small helpers that both stored-tensor readers share.

`TensorRecord` reads the rows asked for straight from the file, at the dtype, storage offset, shape and strides that
a reader (`dcp_tensors` or `export_tensors`) found for it, so that only those rows' bytes are held in memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from titanmem.config.errors import ConfigError

# Bytes that a read may take beyond those asked for (the gaps between scattered elements) rather than split.
_SLACK_BYTES = 1 << 20


@dataclass(frozen=True)
class TensorRecord:
    """A stored tensor's bytes in a file: its storage from `data_start` on (`nbytes` long), and the tensor's layout
    over that storage, in elements."""

    file: Path
    data_start: int
    nbytes: int
    dtype: torch.dtype
    storage_offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def problem(self) -> str | None:
        """Why this layout does not fit its storage record, or None."""
        if any(size == 0 for size in self.size):
            return None
        last = self.storage_offset + sum((size - 1) * stride for size, stride in zip(self.size, self.stride))
        if (last + 1) * self.dtype.itemsize > self.nbytes:
            return f"its tensor reaches past its storage record ({self.nbytes} bytes)"
        return None

    def rows(self, start: int, stop: int, field: str) -> torch.Tensor:
        """Rows [start, stop) (the whole tensor if 0-D), read from the file alone."""
        if not self.size:
            return self._box((), (), field)
        return self._box((start, *(0 for _ in self.size[1:])), (stop - start, *self.size[1:]), field)

    def _box(self, corner: tuple[int, ...], shape: tuple[int, ...], field: str) -> torch.Tensor:
        """The elements [corner, corner + shape) of the tensor. Read with one call where they lie close together in
        the storage (rows of a row-major tensor); otherwise (rows of a transposed one, say) split along the
        dimension that spreads them most, so that what is read stays about the size of what is asked."""
        if any(size == 0 for size in shape):
            return torch.empty(shape, dtype=self.dtype)
        count = numel(shape)
        first = self.storage_offset + sum(c * s for c, s in zip(corner, self.stride))
        span = 1 + sum((size - 1) * stride for size, stride in zip(shape, self.stride))
        if span <= 2 * count + _SLACK_BYTES // self.dtype.itemsize:
            item = self.dtype.itemsize
            data = pread(self.file, self.data_start + first * item, span * item, field).view(self.dtype)
            block = data.as_strided(shape, self.stride)
            return block if block.is_contiguous() else block.contiguous()
        spread = max((d for d, size in enumerate(shape) if size > 1), key=lambda d: self.stride[d])
        out = torch.empty(shape, dtype=self.dtype)
        half = shape[spread] // 2
        for low, size in ((0, half), (half, shape[spread] - half)):
            part_corner = tuple(c + low if d == spread else c for d, c in enumerate(corner))
            part_shape = tuple(size if d == spread else s for d, s in enumerate(shape))
            out.narrow(spread, low, size).copy_(self._box(part_corner, part_shape, field))
        return out


def pread(file: Path, offset: int, nbytes: int, field: str) -> torch.Tensor:
    """`nbytes` bytes of `file` from `offset`, read straight into a new tensor (no copy through Python bytes)."""
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    view = memoryview(buffer.numpy())
    done = 0
    try:
        with open(file, "rb") as handle:
            while done < nbytes:
                # One call reads at most about 2 GB on Linux: a larger block takes several.
                got = os.preadv(handle.fileno(), [view[done:]], offset + done)
                if got == 0:
                    break
                done += got
    except OSError as e:
        raise ConfigError(field, f"{file} cannot be read ({e.strerror or e})") from None
    if done < nbytes:
        raise ConfigError(field, f"{file} ends before byte {offset + nbytes} that its index places data at: the file "
                          "is truncated; the folder is damaged")
    return buffer


def plain_ints(value, nonnegative: bool = True) -> tuple[int, ...] | None:
    """`value` as a tuple of ints (of a torch.Size, list or tuple), or None when it is not one."""
    if not isinstance(value, (tuple, list)):
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) and (v >= 0 or not nonnegative) for v in value):
        return None
    return tuple(value)


def numel(shape: tuple[int, ...]) -> int:
    """The number of elements of a tensor of `shape`."""
    count = 1
    for size in shape:
        count *= size
    return count


def row_range(shape: tuple[int, ...], start: int, stop: int | None) -> tuple[int, int]:
    """Rows [start, stop) of a tensor of `shape` (`stop` None: to the end); IndexError when they are not in it."""
    stop = shape[0] if stop is None else stop
    if not 0 <= start <= stop <= shape[0]:
        raise IndexError(f"rows [{start}, {stop}) of a tensor of {shape[0]} rows")
    return start, stop


def reason(error: BaseException) -> str:
    """An error's type and message on one line, cut short, for a message that names what could not be read."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:240]}" if text else type(error).__name__
