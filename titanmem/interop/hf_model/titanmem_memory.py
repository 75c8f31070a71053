"""The memory layer as the exported modeling code sees it. An exported folder holds, under this file's name, a
standalone copy of these definitions (`titanmem.interop.memory_code.standalone_memory_code`), so that transformers
loads it without titanmem installed."""

from titanmem.models.args import MemoryArgs
from titanmem.models.init import ParamInit
from titanmem.models.memory import MemoryValues, ProductKeyMemory

__all__ = ["MemoryArgs", "MemoryValues", "ParamInit", "ProductKeyMemory"]
