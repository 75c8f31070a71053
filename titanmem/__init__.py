"""titanmem: distributed training of language models with product-key memory layers."""

import os as _os

import torch as _torch

__version__ = "0.1.0"

# Without a GPU, Triton kernels run under its interpreter, which Triton reads when it is first imported, and torch
# imports Triton on its own the first time it builds a module under a device context. Choosing here, when the package
# loads, comes before either.
if "TRITON_INTERPRET" not in _os.environ and not _torch.cuda.is_available():
    _os.environ["TRITON_INTERPRET"] = "1"

# The Triton kernels live in the checkout's top-level kernels/ folder and install as `titanmem.kernels`. In a source
# checkout used without installing (PYTHONPATH=.), the checkout root joins this package's path so that the same
# import finds them; an installed titanmem has titanmem/kernels itself and skips this.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "kernels")) and _os.path.isfile(
    _os.path.join(_root, "kernels", "embedding_bag.py")
):
    __path__.append(_os.path.join(_root))
