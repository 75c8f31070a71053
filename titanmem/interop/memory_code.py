"""The memory layer's code as one standalone file, for a Hugging Face folder: copied from titanmem's own modules at
export, never maintained twice.

The file holds the definitions the memory layer needs, each as its source in titanmem (comments and docstrings
included), under a header naming where they came from. Only the plain PyTorch key search and lookup go with it: they
are titanmem's reference implementations, which the Triton kernels match.
"""

from __future__ import annotations

from titanmem.interop.source_copy import definitions

# (module, top-level names), in an order in which each definition's dependencies come first.
SOURCES: list[tuple[str, tuple[str, ...]]] = [
    ("titanmem.utils", ("local_tensor",)),
    ("titanmem.models.init", ("ParamInit",)),
    ("titanmem.models.args", ("MemoryArgs",)),
    ("titanmem.models.key_search", ("KeySearch", "TopK", "merge_candidates", "torch_topk", "product_key_topk",
                                    "torch_key_search")),
    ("titanmem.models.lookup", ("torch_weighted_bag",)),
    ("titanmem.models.memory", ("VALUE_DTYPES", "MemoryValues", "ProductKeyMemory")),
]

HEADER = '''"""titanmem's memory layer (product-key memory, Memory+), standalone. Written by titanmem's export from
{modules}: do not edit, export again."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
'''

SEAMS = '''

def get_key_search(name: str) -> KeySearch:
    """The exported layer searches with the plain PyTorch implementation, whichever one the run trained with."""
    return torch_key_search


def get_lookup(name: str) -> Callable[..., torch.Tensor]:
    """The exported layer reads the table with the plain PyTorch implementation, whichever one the run trained with."""
    return torch_weighted_bag
'''


def standalone_memory_code() -> str:
    """The text of the standalone file (`titanmem_memory.py` in an exported folder)."""
    parts = [HEADER.format(modules=", ".join(module for module, _ in SOURCES))]
    for module, names in SOURCES:
        parts += definitions(module, names)
    # The seams the layer calls to pick its implementations come after the implementations they return.
    return "\n\n\n".join(parts).rstrip() + "\n" + SEAMS
