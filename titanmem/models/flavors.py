"""Named model shapes. Dense shapes follow the paper's base models (Berges et al. 2025); 720m and 1.3b are derived
from the parameter counts the paper reports, 8b is Llama-3 8B.

Each flavor also names where its memory layers go when `[memory] enabled = true`: three layers, centred and spread
out (stride 8 in 24-ish-layer models, stride 4 in the 12-layer 134m), and the default table size.
"""

from __future__ import annotations

from typing import NamedTuple

from titanmem.models.args import ModelArgs

FLAVORS: dict[str, ModelArgs] = {
    "debug": ModelArgs(dim=256, n_layers=6, n_heads=8, ffn_hidden_dim=768),
    "134m": ModelArgs(dim=768, n_layers=12, n_heads=12, ffn_hidden_dim=2048),
    "373m": ModelArgs(dim=1024, n_layers=24, n_heads=16, ffn_hidden_dim=2816),
    "720m": ModelArgs(dim=1536, n_layers=22, n_heads=12, ffn_hidden_dim=4096),
    "1.3b": ModelArgs(dim=2048, n_layers=22, n_heads=16, ffn_hidden_dim=5632),
    "8b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_hidden_dim=14336, rope_theta=500000.0),
}


class MemoryPlacement(NamedTuple):
    layers: tuple[int, ...]
    n_keys: int


MEMORY_PLACEMENT: dict[str, MemoryPlacement] = {
    "debug": MemoryPlacement((1, 3, 5), 64),
    "134m": MemoryPlacement((2, 6, 10), 1024),
    "373m": MemoryPlacement((4, 12, 20), 1024),
    "720m": MemoryPlacement((3, 11, 19), 1024),
    "1.3b": MemoryPlacement((3, 11, 19), 1024),
    "8b": MemoryPlacement((7, 15, 23), 4096),
}
