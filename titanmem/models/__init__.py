"""Models: the Llama-style decoder, its flavors, and their initialisation. Plain single-device PyTorch: nothing here
reads the configuration or knows about ranks (the run plan turns a config into `ModelArgs`; the build path in
`titanmem.build` constructs, parallelizes and initialises)."""

from titanmem.models.args import MemoryArgs, ModelArgs
from titanmem.models.flavors import FLAVORS, MEMORY_PLACEMENT
from titanmem.models.llama import Transformer

__all__ = ["FLAVORS", "MEMORY_PLACEMENT", "MemoryArgs", "ModelArgs", "Transformer"]
