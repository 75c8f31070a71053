"""The model tensors of a DCP `step-N` checkpoint folder, read by rows without building the model.

A checkpoint's tensor may be stored in several chunks, one per saving rank: blocks of rows, and with a value table
split by rows and columns (`value_slice_sharding = "rows"` with mp), blocks of both. DCP's file writer stores each
chunk as a `torch.save` archive (a zip file, its records uncompressed) at the offset and length that the index
(`.metadata`) gives. Here only the archive's directory and its small `data.pkl` are read, to learn where the chunk's
storage record starts and how the tensor lies over it (dtype, storage offset, shape, strides); then only the bytes of
the rows asked for are read from the file. `data.pkl` is read by an unpickler that builds plain layout records and
nothing else, and the index by `checkpoint_io`'s, so a folder received from elsewhere cannot run code. Anything that
this reader does not expect (a compressed or transformed record, a tensor that is not plain, a file shorter than
its index says) stops with one line naming the file.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from titanmem.components.checkpoint_io import UnsafeCheckpointError, read_metadata
from titanmem.components.stored_blocks import TensorRecord, numel, plain_ints, reason, row_range
from titanmem.config.errors import ConfigError

# The model's weights in a checkpoint: `load_model_weights` saves and loads them as {"model": model state dict}.
MODEL_PREFIX = "model."
# A torch.save archive's pickle holds a tensor's layout, a few hundred bytes; more is not a DCP chunk.
_MAX_PICKLE_BYTES = 1 << 20


class _Unreadable(Exception):
    """What this reader found wrong with a stored block (its message says what)."""


# torch.save names a tensor's storage by its legacy typed class, or UntypedStorage (bytes) with the dtype beside it.
_LEGACY_STORAGES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "LongStorage": torch.int64, "IntStorage": torch.int32, "ShortStorage": torch.int16, "CharStorage": torch.int8,
    "ByteStorage": torch.uint8, "BoolStorage": torch.bool, "BFloat16Storage": torch.bfloat16,
    "ComplexDoubleStorage": torch.complex128, "ComplexFloatStorage": torch.complex64,
}


@dataclass(frozen=True)
class _StorageKind:
    dtype: torch.dtype


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: torch.dtype
    numel: int


@dataclass(frozen=True)
class _Layout:
    storage: _Storage
    storage_offset: int
    size: tuple
    stride: tuple
    dtype: torch.dtype


def _layout_v2(storage, storage_offset, size, stride, requires_grad=False, hooks=None, metadata=None) -> _Layout:
    if not isinstance(storage, _Storage):
        raise _Unreadable("a tensor without a storage record")
    return _Layout(storage, storage_offset, size, stride, storage.dtype)


def _layout_v3(storage, storage_offset, size, stride, requires_grad, hooks, dtype, metadata=None) -> _Layout:
    if not isinstance(storage, _Storage) or not isinstance(dtype, torch.dtype):
        raise _Unreadable("a tensor without a storage record or dtype")
    return _Layout(storage, storage_offset, size, stride, dtype)


def _no_hooks() -> dict:
    return {}


class _LayoutUnpickler(pickle.Unpickler):
    """Reads the pickle of a plain tensor saved by torch.save into a `_Layout`: the tensor rebuilders become
    functions that return the layout, storages become their record's key, and nothing else can be named."""

    def find_class(self, module: str, name: str):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _layout_v2
        if module == "torch._utils" and name == "_rebuild_tensor_v3":
            return _layout_v3
        if module == "collections" and name == "OrderedDict":  # the tensor's (empty) backward hooks
            return _no_hooks
        if module == "torch":
            if name == "UntypedStorage":
                return _StorageKind(torch.uint8)
            if name in _LEGACY_STORAGES:
                return _StorageKind(_LEGACY_STORAGES[name])
            if isinstance(getattr(torch, name, None), torch.dtype):
                return getattr(torch, name)
        raise _Unreadable(f"it names {module}.{name}, which a plain tensor does not need")

    def persistent_load(self, pid):
        if (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageKind)
                and isinstance(pid[2], str) and isinstance(pid[4], int) and not isinstance(pid[4], bool)):
            return _Storage(pid[2], pid[1].dtype, pid[4])
        raise _Unreadable("a persistent reference that is not a storage")


class _FileSlice(io.RawIOBase):
    """Bytes [offset, offset + length) of an open file, as a seekable read-only file (for `zipfile`)."""

    def __init__(self, fd: int, offset: int, length: int):
        super().__init__()
        self._fd, self._offset, self._length, self._position = fd, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, position: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._position, 2: self._length}[whence]
        self._position = max(0, base + position)
        return self._position

    def readinto(self, buffer) -> int:
        count = max(0, min(len(buffer), self._length - self._position))
        data = os.pread(self._fd, count, self._offset + self._position)
        buffer[: len(data)] = data
        self._position += len(data)
        return len(data)


def _archive_record(file: Path, offset: int, length: int) -> TensorRecord:
    """The tensor that DCP stored as a torch.save archive at bytes [offset, offset + length) of `file`: where its
    storage lies in the file and how the tensor lies over it. Raises _Unreadable (or zipfile's, pickle's, OSError)
    on anything else."""
    with open(file, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if offset + length > size:
            raise _Unreadable(f"it is {size} bytes long, but the index places a record up to byte {offset + length}")
        with zipfile.ZipFile(_FileSlice(handle.fileno(), offset, length)) as archive:
            layout, info = _archive_layout(archive)
        # The record's bytes follow its local header: 30 bytes, then the name and the extra field (alignment).
        local = os.pread(handle.fileno(), 30, offset + info.header_offset)
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            raise _Unreadable(f"the local header of {info.filename} is damaged")
        name_length, extra_length = struct.unpack("<HH", local[26:30])
        data_start = info.header_offset + 30 + name_length + extra_length
        if data_start + info.file_size > length:
            raise _Unreadable(f"its storage record {info.filename} runs past the end of the chunk")
    storage_bytes = layout.storage.numel * layout.storage.dtype.itemsize
    if storage_bytes != info.file_size:
        raise _Unreadable(f"its storage record holds {info.file_size} bytes, its pickle says {storage_bytes}")
    size, stride = plain_ints(layout.size), plain_ints(layout.stride)
    storage_offset = layout.storage_offset
    if (size is None or stride is None or len(size) != len(stride) or not isinstance(storage_offset, int)
            or isinstance(storage_offset, bool) or storage_offset < 0):
        raise _Unreadable("its tensor's shape, strides or storage offset are not plain non-negative integers")
    return TensorRecord(file, offset + data_start, info.file_size, layout.dtype, storage_offset, size, stride)


def _archive_layout(archive: zipfile.ZipFile) -> tuple[_Layout, zipfile.ZipInfo]:
    """A torch.save archive's tensor layout (from its pickle) and the directory entry of its storage record."""
    pickles = [info for info in archive.infolist() if info.filename.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise _Unreadable("its record is not a torch.save archive (no data.pkl)")
    prefix = pickles[0].filename.removesuffix("data.pkl")
    if pickles[0].file_size > _MAX_PICKLE_BYTES:
        raise _Unreadable(f"its data.pkl is {pickles[0].file_size} bytes, not a tensor's few hundred")
    names = set(archive.namelist())
    if f"{prefix}byteorder" in names and archive.read(f"{prefix}byteorder") != b"little":
        raise _Unreadable("it was saved on a big-endian machine")
    layout = _LayoutUnpickler(io.BytesIO(archive.read(pickles[0]))).load()
    if not isinstance(layout, _Layout):
        raise _Unreadable(f"its record holds a {type(layout).__name__}, not a tensor")
    record_name = f"{prefix}data/{layout.storage.key}"
    if record_name not in names:
        raise _Unreadable(f"its archive lacks the storage record {record_name}")
    info = archive.getinfo(record_name)
    if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
        raise _Unreadable(f"its storage record {record_name} is compressed")
    return layout, info


@dataclass(frozen=True)
class _Chunk:
    """A block of a stored tensor: where it lies in the whole tensor, and where DCP stored it."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: Path
    offset: int
    length: int

    @property
    def numel(self) -> int:
        count = 1
        for size in self.sizes:
            count *= size
        return count


class CheckpointTensors:
    """The model tensors of a DCP `step-N` checkpoint folder (its `model.*` entries), read by rows."""

    field = "checkpoint.folder"
    settings_hint = "pass the config of the run that saved it (its config.toml)"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._entries: dict[str, TensorStorageMetadata] = {}
        self._chunks: dict[str, list[_Chunk]] = {}
        self._records: dict[tuple[str, int], TensorRecord] = {}
        metadata = read_metadata(self.path)
        try:
            self._index(metadata)
        except ConfigError:
            raise
        except (AttributeError, TypeError, ValueError, KeyError) as e:  # DCP's classes, holding something else
            raise self._damaged(f"its index is not DCP's: {reason(e)}") from None

    def _index(self, metadata) -> None:
        """Each model tensor's entry and stored blocks, from DCP's index."""
        where = {(index.fqn, tuple(index.offset or ())): info for index, info in (metadata.storage_data or {}).items()}
        for key, entry in metadata.state_dict_metadata.items():
            if not key.startswith(MODEL_PREFIX):
                continue  # the optimizer, the data loader, ...: not read, never unpickled
            if not isinstance(entry, TensorStorageMetadata):
                raise UnsafeCheckpointError(f"checkpoint entry {key} in {self.path} is a pickled object; titanmem "
                                            "checkpoints hold tensors only")
            name = key[len(MODEL_PREFIX):]
            shape = plain_ints(entry.size)
            if shape is None or not isinstance(entry.properties.dtype, torch.dtype):
                raise self._damaged(f"its index gives {key} no plain shape and dtype")
            self._entries[name] = entry
            self._chunks[name] = [self._chunk(key, shape, chunk, where) for chunk in entry.chunks]
            if sum(chunk.numel for chunk in self._chunks[name]) != numel(shape):
                raise self._damaged(f"its index lists blocks of {key} that do not cover it exactly")

    def _damaged(self, problem: str, file: Path | None = None) -> ConfigError:
        return ConfigError(self.field, f"{file or self.path / '.metadata'} cannot be read ({problem}): the checkpoint "
                          "is damaged; load an earlier one (checkpoint.load_step)")

    def _chunk(self, key: str, shape: tuple[int, ...], chunk, where: dict) -> _Chunk:
        offsets, sizes = plain_ints(chunk.offsets), plain_ints(chunk.sizes)
        if (offsets is None or sizes is None or len(offsets) != len(shape) or len(sizes) != len(shape)
                or any(o + s > whole for o, s, whole in zip(offsets, sizes, shape))):
            raise self._damaged(f"its index places a block of {key} outside the tensor")
        info = where.get((key, offsets))
        if info is None:
            raise self._damaged(f"its index does not say where the block of {key} at {list(offsets)} is stored")
        if getattr(info, "transform_descriptors", None):
            raise self._damaged(f"the block of {key} at {list(offsets)} was stored through DCP's stream "
                                f"extensions ({', '.join(map(str, info.transform_descriptors))}), which this reader "
                                "cannot read")
        relative = info.relative_path
        offset, length = plain_ints((info.offset, info.length)) or (None, None)
        parts = PurePosixPath(relative).parts if isinstance(relative, str) else ()
        if not parts or PurePosixPath(relative).is_absolute() or ".." in parts or offset is None:
            raise self._damaged(f"its index places the block of {key} at {list(offsets)} outside the folder")
        return _Chunk(offsets, sizes, self.path / relative, offset, length)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def check(self) -> None:
        """Read the layout of every stored block (its archive's directory and pickle, not its data)."""
        for name, chunks in self._chunks.items():
            for index, chunk in enumerate(chunks):
                if chunk.numel:
                    self._record(name, index)

    def _entry(self, name: str) -> TensorStorageMetadata:
        if name not in self._entries:
            raise ConfigError(self.field, f"{self.path} holds no tensor {name}: it was saved by another model; "
                              f"{self.settings_hint}")
        return self._entries[name]

    def shape(self, name: str) -> torch.Size:
        return torch.Size(self._entry(name).size)

    def dtype(self, name: str) -> torch.dtype:
        return self._entry(name).properties.dtype

    def _record(self, name: str, index: int) -> TensorRecord:
        """The layout of block `index` of `name`, read from its archive once."""
        if (name, index) not in self._records:
            chunk = self._chunks[name][index]
            try:
                record = _archive_record(chunk.file, chunk.offset, chunk.length)
            except _Unreadable as e:
                raise self._damaged(f"the block of model.{name} at {list(chunk.offsets)}: {e}", chunk.file) from None
            except (ValueError, OSError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, struct.error,
                    KeyError, TypeError, AttributeError, IndexError, RecursionError, NotImplementedError) as e:
                raise self._damaged(f"the block of model.{name} at {list(chunk.offsets)}: {reason(e)}",
                                    chunk.file) from None
            if record.dtype != self.dtype(name) or record.size != chunk.sizes:
                raise self._damaged(f"the block of model.{name} at {list(chunk.offsets)} holds {record.dtype} of "
                                    f"shape {list(record.size)}, its index says {self.dtype(name)} of "
                                    f"{list(chunk.sizes)}", chunk.file)
            problem = record.problem()
            if problem is not None:
                raise self._damaged(f"the block of model.{name} at {list(chunk.offsets)}: {problem}", chunk.file)
            self._records[name, index] = record
        return self._records[name, index]

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        shape, dtype = tuple(self.shape(name)), self.dtype(name)
        chunks = self._chunks[name]
        if not shape:
            return self._record(name, 0).rows(0, 1, self.field)
        start, stop = row_range(shape, start, stop)
        # The blocks that hold some of the rows, and which of their own rows those are.
        parts = [(index, max(start, c.offsets[0]), min(stop, c.offsets[0] + c.sizes[0]))
                 for index, c in enumerate(chunks) if c.numel]
        parts = [(index, low, high) for index, low, high in parts if low < high]
        out_shape = (stop - start, *shape[1:])
        if len(parts) == 1:
            index, low, high = parts[0]
            chunk = chunks[index]
            if (low, high) == (start, stop) and chunk.sizes[1:] == shape[1:]:
                return self._record(name, index).rows(low - chunk.offsets[0], high - chunk.offsets[0], self.field)
        # Zeros, not empty: what a damaged index failed to cover can never be stale memory.
        out = torch.zeros(out_shape, dtype=dtype)
        covered = 0
        for index, low, high in parts:
            chunk = chunks[index]
            block = self._record(name, index).rows(low - chunk.offsets[0], high - chunk.offsets[0], self.field)
            region = (slice(low - start, high - start),) + tuple(
                slice(o, o + s) for o, s in zip(chunk.offsets[1:], chunk.sizes[1:]))
            out[region] = block
            covered += block.numel()
            del block
        if covered != out.numel():
            raise self._damaged(f"no stored block holds part of rows [{start}, {stop}) of model.{name}")
        return out
