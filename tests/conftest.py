import importlib.util
import os
import sys
from pathlib import Path

# `python -m pytest` puts the checkout's root on the import path, where its kernels/ folder (installed as
# titanmem.kernels) would shadow the PyPI package `kernels` that transformers imports. titanmem itself is installed.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _ROOT]
try:
    import kernels  # noqa: F401
except ImportError:  # a transformers that does not need it: its check then finds no usable package by that name
    pass

# The tests of tools/ import it as the package it is when run from the root (`tools.assets.fact_sources`): bound by
# name here, so that the root itself stays off the path.
_tools = importlib.util.spec_from_file_location("tools", _ROOT / "tools" / "__init__.py",
                                                submodule_search_locations=[str(_ROOT / "tools")])
sys.modules["tools"] = importlib.util.module_from_spec(_tools)
_tools.loader.exec_module(sys.modules["tools"])

# Offline by construction: a test that reaches for the hub fails fast instead of retrying for 20 s.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

# Triton kernels run under its interpreter on a CPU-only host; it must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from helpers import make_config  # noqa: E402


@pytest.fixture
def small_config(tmp_path):
    return lambda **sections: make_config(tmp_path / "run", **sections)
