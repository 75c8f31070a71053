"""titanmem: distributed training of language models with product-key memory layers."""

import importlib.util as _importlib_util
import os as _os

import torch as _torch

__version__ = "0.1.0"

# Without a GPU, Triton kernels run under its interpreter, which Triton reads when it is first imported, and torch
# imports Triton on its own the first time it builds a module under a device context. Choosing here, when the package
# loads, comes before either.
if "TRITON_INTERPRET" not in _os.environ and not _torch.cuda.is_available():
    _os.environ["TRITON_INTERPRET"] = "1"

# The Triton kernels live in the checkout's top-level kernels/ folder, which the install maps to titanmem.kernels (an
# editable install for a checkout). A checkout imported without that install (from its root, where the current
# folder comes first on the import path) has no titanmem.kernels: say so here, not deep inside a model's build.
if _importlib_util.find_spec(f"{__name__}.kernels") is None:
    raise ImportError(f"titanmem at {_os.path.dirname(__file__)} is a checkout that is not installed, so "
                      "titanmem.kernels cannot be found: run tools/install.sh there (an editable install)")
