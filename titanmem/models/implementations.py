"""Fixed tables from an implementation's name to (module, function), imported on first use.

The memory layer has two such seams, the key search (`titanmem.models.key_search`) and the weighted bag of value
rows (`titanmem.models.lookup`). The Triton kernels load only when a run asks for them, and a platform without
Triton still has the torch implementations. A new implementation is one more table entry (docs/architecture.md).
"""

from __future__ import annotations

import importlib
from typing import Callable

Table = dict[str, tuple[str, str]]


def available(table: Table) -> list[str]:
    """The names in `table` whose module imports on this machine."""
    names = []
    for name, (module, _) in table.items():
        try:
            importlib.import_module(module)
        except ImportError:  # no Triton on this platform: the torch implementation still works
            continue
        names.append(name)
    return sorted(names)


def load(table: Table, name: str, what: str) -> Callable:
    """The function `table` names `name`; `what` names the seam in errors ("memory lookup")."""
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}; choose one of {sorted(table)}")
    module, function = table[name]
    try:
        return getattr(importlib.import_module(module), function)
    except ImportError as e:
        raise ValueError(f"{what} {name!r} is not available in this build ({e}); available: "
                         f"{available(table)}") from None
