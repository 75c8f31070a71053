"""Every pluggable choice of a run, one entry per option: its name, what it can do, what it costs, where its code is.

A *kind* is one choice the config makes between implementations: the value table's optimizer, the memory layer's key
search and lookup, the training data's format, the shape of the lr decay. Each entry is the one statement of its
option. The config takes a kind's choice list from it, the run plan and the planner its capabilities, limits and
state sizes, the kernels their limits; the kind's loader (`Kind.loaded_by`) imports the entry's implementation, a
"module:attribute" string, on first use, so that a platform without Triton still has the torch implementations and
importing the registry imports nothing. docs/architecture.md ("Registry") says what a new option needs.

This module imports nothing of titanmem: every layer may read it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterable, Literal, TypeVar


class UnknownChoice(ValueError):
    """A name that no entry of a kind registers."""


@dataclass(frozen=True)
class Entry:
    """One option of a kind."""

    name: str
    """What the config calls it."""

    implementation: str | None = None
    """Its code as "module:attribute", imported by the kind's loader on first use; None for an entry with nothing of its
    own to load (`auto`, which the run plan resolves to another entry)."""

    needs_triton: bool = False
    """Its code runs Triton kernels (interpreted on a CPU), so Triton must be importable."""

    auto_devices: frozenset[str] = frozenset()
    """The devices (`cuda`, `cpu`) on which `auto` may pick it (`Kind.auto_order` gives the preference)."""


E = TypeVar("E", bound=Entry)


def load(implementation: str) -> Any:
    """The object an implementation string "module:attribute" names, its module imported now."""
    module, _, attribute = implementation.partition(":")
    return getattr(importlib.import_module(module), attribute)


class Kind(Generic[E]):
    """The entries of one choice, in the order the config lists them."""

    def __init__(self, name: str, field: str, loaded_by: str, entries: Iterable[E], auto_order: tuple[str, ...] = (),
                 check: Callable[[tuple[E, ...], E], None] | None = None):
        """`field`: the config field that chooses (`section.key`); `loaded_by`: the dotted name of the module that
        loads the implementations; `auto_order`: the entries `auto` tries, best first; `check(entries, new)`: raises
        ValueError when `new` cannot join `entries` (besides a name taken twice)."""
        self.name = name
        self.field = field
        self.loaded_by = loaded_by
        self.auto_order = auto_order
        self._check = check
        self._entries: dict[str, E] = {}
        for entry in entries:
            self.register(entry)

    @property
    def entries(self) -> tuple[E, ...]:
        """Every option, `auto` (where the kind has it) first."""
        return tuple(self._entries.values())

    def names(self) -> tuple[str, ...]:
        """The valid values of the config field."""
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def get(self, name: str) -> E:
        """The entry called `name`; UnknownChoice, with the valid names, if none is."""
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownChoice(f"unknown {self.field} {name!r}; choose one of {', '.join(self.names())}") from None

    def register(self, entry: E) -> E:
        """Add an option (the shipped ones are added below; a plugin or a test may add its own)."""
        if entry.name in self._entries:
            raise ValueError(f"{self.field} {entry.name!r} is registered already")
        if self._check is not None:
            self._check(self.entries, entry)
        self._entries[entry.name] = entry
        return entry

    def unregister(self, name: str) -> None:
        """Remove the option called `name`."""
        self.get(name)
        del self._entries[name]

    def load(self, name: str) -> Any:
        """The implementation of `name`, imported now; ValueError naming what is available when it cannot be."""
        entry = self.get(name)
        if entry.implementation is None:
            raise ValueError(f"{self.field} {name!r} has no implementation of its own to load")
        try:
            return load(entry.implementation)
        except ImportError as e:  # no Triton on this platform: the torch implementations still work
            raise ValueError(f"{self.field} {name!r} is not available in this build ({e}); available: "
                             f"{self.available()}") from None

    def available(self) -> list[str]:
        """The names whose implementation imports on this machine."""
        names = []
        for entry in self.entries:
            if entry.implementation is None:
                continue
            try:
                importlib.import_module(entry.implementation.partition(":")[0])
            except ImportError:
                continue
            names.append(entry.name)
        return sorted(names)

    def resolve(self, choice: str, device_type: str, usable: Callable[[E], bool]) -> str:
        """`choice`, or for `auto` the first of `auto_order` that runs well on `device_type` and is `usable` here."""
        if choice != "auto":
            return choice
        for name in self.auto_order:
            entry = self.get(name)
            if device_type in entry.auto_devices and usable(entry):
                return name
        raise UnknownChoice(f"{self.field} 'auto' finds no option for a {device_type} device here; set it")


# -------------------------------------------------------------------------------------------------- value optimizer

STATE_DTYPE_BYTES = {"fp32": 4, "bf16": 2}
"""Bytes per value of `memory.value_state_dtype`."""


@dataclass(frozen=True)
class ValueOptimizer(Entry):
    """What trains the memory value table."""

    rowwise: bool = False
    """Trains the table by a fused update of the rows a step reads, with no dense gradient
    (`titanmem.components.value_optimizer`); false: autograd's dense gradient of the whole table, stepped by the dense
    AdamW as a parameter group of its own (`titanmem.components.optimizer`)."""

    update_code: int | None = None
    """Row-wise: the number the fused update passes know it by, unique among the row-wise entries."""

    triton_update: bool = False
    """Row-wise: the fused Triton update (`titanmem.kernels.row_update`) has a branch for `update_code`, which runs on
    GPUs; without one, the implementation's tensor ops run on every device."""

    state: tuple[Literal["row", "element"], ...] = ()
    """Its state tensors, by what each holds one value for: a `row` (fp32) or an `element` of the table (in
    `memory.value_state_dtype` for a row-wise optimizer, fp32 for a dense one). The fused passes carry up to two."""

    state_summary: str = "none"
    """Its state in words, for the planner's report."""

    lr_scale: float | None = None
    """`memory.value_lr = -1` takes this multiple of optimizer.lr; None: the value lr must be set."""

    @property
    def dense(self) -> bool:
        """Trains the table through a dense gradient (and so may be FSDP-sharded, but cannot store bf16 values)."""
        return not self.rowwise

    @property
    def state_bytes_per_row(self) -> int:
        """State bytes per table row (fp32)."""
        return 4 * self.state.count("row")

    def state_bytes_per_element(self, state_dtype: str) -> int:
        """State bytes per table element, the moments of a row-wise optimizer stored in `state_dtype`."""
        return (STATE_DTYPE_BYTES[state_dtype] if self.rowwise else 4) * self.state.count("element")

    @property
    def gradient_bytes_per_element(self) -> int:
        """A dense optimizer's fp32 gradient of the table; a row-wise one forms none."""
        return 0 if self.rowwise else 4


def _check_value_optimizer(entries: tuple[ValueOptimizer, ...], new: ValueOptimizer) -> None:
    if new.name == "auto":
        return
    if len(new.state) > 2:
        raise ValueError(f"value optimizer {new.name!r}: the fused passes carry at most two state tensors")
    if new.rowwise and (new.update_code is None or new.implementation is None):
        raise ValueError(f"row-wise value optimizer {new.name!r} needs an update_code and an implementation")
    if new.rowwise and any(e.rowwise and e.update_code == new.update_code for e in entries):
        raise ValueError(f"value optimizer {new.name!r}: update_code {new.update_code} is taken")


# Row-wise optimizers group a step's reads by row with `titanmem.kernels.row_update` on every device: they need Triton.
VALUE_OPTIMIZERS: Kind[ValueOptimizer] = Kind(
    "value_optimizer", "memory.value_optimizer", loaded_by="titanmem.components.row_update_torch",
    entries=[
        ValueOptimizer("auto"),
        # The paper's baseline. Torch's AdamW keeps two fp32 moments per element, beside the fp32 gradient.
        ValueOptimizer("adamw", state=("element", "element"), state_summary="dense AdamW: two fp32 moments per element",
                       lr_scale=10.0, auto_devices=frozenset({"cuda", "cpu"})),
        ValueOptimizer("sgd", "titanmem.components.row_update_torch:sgd_rows", needs_triton=True, rowwise=True,
                       update_code=0, triton_update=True),
        # 50×: matched to AdamW in our 134m check (docs/benchmarks.md), the fastest that did.
        ValueOptimizer("adagrad", "titanmem.components.row_update_torch:adagrad_rows", needs_triton=True,
                       rowwise=True, update_code=1, triton_update=True, state=("row",),
                       state_summary="row-wise Adagrad: one fp32 accumulator per row", lr_scale=50.0,
                       auto_devices=frozenset({"cuda"})),
        # Lazy (row-sparse) Adam: moments of untouched rows are not decayed; the paper's 10× as for AdamW.
        ValueOptimizer("adam", "titanmem.components.row_update_torch:adam_rows", needs_triton=True, rowwise=True,
                       update_code=2, triton_update=True, state=("element", "element"),
                       state_summary="lazy Adam: two moments per element", lr_scale=10.0),
    ],
    # Row-wise Adagrad on GPUs; on a CPU, where Triton only runs interpreted, dense AdamW.
    auto_order=("adagrad", "adamw"),
    check=_check_value_optimizer,
)

# ------------------------------------------------------------------------------------------------------- key search


@dataclass(frozen=True)
class KeySearch(Entry):
    """How the memory layer finds each token's best product keys (`titanmem.models.key_search`)."""

    max_keys: int | None = None
    """The largest `memory.n_keys` it handles; None: no limit of its own."""

    max_knn: int | None = None
    """The largest `memory.knn` it handles; None: no limit of its own."""


KEY_SEARCHES: Kind[KeySearch] = Kind(
    "key_search", "memory.key_search", loaded_by="titanmem.models.key_search",
    entries=[
        KeySearch("auto"),
        KeySearch("torch", "titanmem.models.key_search:torch_key_search", auto_devices=frozenset({"cuda", "cpu"})),
        KeySearch("select", "titanmem.models.selected_key_search:selected_key_search", needs_triton=True,
                  auto_devices=frozenset({"cuda"})),
        # Each candidate's value row, n_keys · r + c, is kept in an int32 (46340² < 2³¹); ranking compares every
        # pair of a program's [16, knn] list, [16, knn, knn] values in registers.
        KeySearch("triton", "titanmem.kernels.key_search:key_search", needs_triton=True, max_keys=46340, max_knn=64),
    ],
    # The fastest on GPUs (docs/benchmarks.md); on a CPU the Triton selection would only run interpreted.
    auto_order=("select", "torch"),
)

# ----------------------------------------------------------------------------------------------------------- lookup

LOOKUPS: Kind[Entry] = Kind(
    "lookup", "memory.lookup", loaded_by="titanmem.models.lookup",
    entries=[
        Entry("auto"),
        Entry("torch", "titanmem.models.lookup:torch_weighted_bag", auto_devices=frozenset({"cuda", "cpu"})),
        Entry("triton", "titanmem.kernels.embedding_bag:weighted_bag", needs_triton=True,
              auto_devices=frozenset({"cuda"})),
    ],
    auto_order=("triton", "torch"),
)

# ------------------------------------------------------------------------------------------------------ data format


@dataclass(frozen=True)
class DataFormat(Entry):
    """How the training data is read (`titanmem.data.text.load_documents`)."""

    suffixes: tuple[str, ...] = ()
    """File name endings (lower case, before any compression suffix) that `auto` reads as this format."""

    reads: Literal["records", "dataset"] = "records"
    """`records`: the implementation is `(path, text_field) -> Iterator[Record]` over one local file
    (`titanmem.data.records`), whose bad records `data.on_bad_record` handles; `dataset`: it is `(data config,
    DataSource) -> datasets.Dataset or IterableDataset` over all of them."""

    local: bool = True
    """Reads local files; false: `data.path` names a remote dataset (the one such format, `REMOTE_FORMAT`, is also
    what `auto` takes a path that matches no local file for)."""


def _check_data_format(entries: tuple[DataFormat, ...], new: DataFormat) -> None:
    taken = {suffix for entry in entries for suffix in entry.suffixes}
    if taken & set(new.suffixes):
        raise ValueError(f"data format {new.name!r}: suffix {sorted(taken & set(new.suffixes))[0]} is taken")


REMOTE_FORMAT = "hub"
"""The data format of a `data.path` that names no local file."""

DATA_FORMATS: Kind[DataFormat] = Kind(
    "data_format", "data.format", loaded_by="titanmem.data.files",
    entries=[
        DataFormat("auto"),
        DataFormat("json", "titanmem.data.records:json_documents", suffixes=(".json", ".jsonl")),
        DataFormat("parquet", "titanmem.data.text:parquet_documents", suffixes=(".parquet",), reads="dataset"),
        DataFormat("text", "titanmem.data.records:text_documents", suffixes=(".txt", ".text")),
        DataFormat(REMOTE_FORMAT, "titanmem.data.text:hub_documents", reads="dataset", local=False),
    ],
    check=_check_data_format,
)

# -------------------------------------------------------------------------------------------------------- lr decay

LR_DECAYS: Kind[Entry] = Kind(
    "lr_decay", "lr_scheduler.decay_type", loaded_by="titanmem.components.lr_scheduler",
    entries=[
        Entry("linear", "titanmem.components.lr_scheduler:linear_decay"),
        Entry("cosine", "titanmem.components.lr_scheduler:cosine_decay"),
        Entry("constant", "titanmem.components.lr_scheduler:constant_decay"),
    ],
)


# --------------------------------------------------------------------------------------------------- export format

# Each writer is `(source, folder, *, plan, dtype, max_shard_bytes) -> list[Path]`: the checkpoint's tensors
# (`StoredTensors`), streamed into `folder` in the format, in `dtype`, in files of at most `max_shard_bytes`.
EXPORT_FORMATS: Kind[Entry] = Kind(
    "export_format", "export.format", loaded_by="titanmem.export",
    entries=[
        Entry("titanmem", "titanmem.export:write_titanmem_export"),
        Entry("hf", "titanmem.interop.hf_export:write_hf_export"),
    ],
)


def all_kinds() -> tuple[Kind, ...]:
    """Every kind, in the order docs/architecture.md describes them."""
    return VALUE_OPTIMIZERS, KEY_SEARCHES, LOOKUPS, DATA_FORMATS, LR_DECAYS, EXPORT_FORMATS
