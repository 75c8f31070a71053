"""titanmem: distributed training of language models with product-key memory layers."""

import os as _os

import torch as _torch

__version__ = "0.1.0"

# Without a GPU, Triton kernels run under its interpreter, which Triton reads when it is first imported, and torch
# imports Triton on its own the first time it builds a module under a device context. Choosing here, when the package
# loads, comes before either.
if "TRITON_INTERPRET" not in _os.environ and not _torch.cuda.is_available():
    _os.environ["TRITON_INTERPRET"] = "1"
