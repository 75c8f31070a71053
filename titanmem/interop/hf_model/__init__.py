"""The Hugging Face transformers code of a titanmem memory model, which `export.format = "hf"` writes into the folder
beside the weights. In this package it imports titanmem's own memory layer (`titanmem_memory`); in an exported
folder that file is a standalone copy of the same code (`titanmem.interop.memory_code`)."""
