"""Named model shapes. Dense shapes follow the paper's base models (DESIGN.md §1); 720m and 1.3b are derived from the
parameter counts the paper reports, 8b is Llama-3 8B."""

from __future__ import annotations

from titanmem.models.args import ModelArgs

FLAVORS: dict[str, ModelArgs] = {
    "debug": ModelArgs(dim=256, n_layers=6, n_heads=8, ffn_hidden_dim=768),
    "134m": ModelArgs(dim=768, n_layers=12, n_heads=12, ffn_hidden_dim=2048),
    "373m": ModelArgs(dim=1024, n_layers=24, n_heads=16, ffn_hidden_dim=2816),
    "720m": ModelArgs(dim=1536, n_layers=22, n_heads=12, ffn_hidden_dim=4096),
    "1.3b": ModelArgs(dim=2048, n_layers=22, n_heads=16, ffn_hidden_dim=5632),
    "8b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_hidden_dim=14336, rope_theta=500000.0),
}
