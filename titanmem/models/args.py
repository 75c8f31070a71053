"""Shape of a decoder: what a flavor fixes and what the tokenizer fills in."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MemoryArgs:
    layers: tuple[int, ...]
    n_keys: int
    k_dim: int
    v_dim: int
    heads: int = 4
    knn: int = 32
    swilu: bool = True
    qk_norm: bool = False
    gated: bool = False
    lookup: str = "torch"
    """Implementation of the weighted bag of value rows (an entry of titanmem.registry.LOOKUPS)."""
    key_search: str = "torch"
    """Implementation of the product-key search (an entry of titanmem.registry.KEY_SEARCHES)."""
    value_dtype: str = "fp32"
    """Storage of the value table: fp32 or bf16."""

    @property
    def n_values(self) -> int:
        return self.n_keys**2

    def validate(self, n_layers: int) -> None:
        if not self.layers:
            raise ValueError("memory layers must name at least one block")
        if any(not 0 <= layer < n_layers for layer in self.layers) or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"memory layers {list(self.layers)} must be distinct blocks in [0, {n_layers})")
        if self.k_dim % 2:
            raise ValueError(f"memory k_dim {self.k_dim} must be even: the query is split into two halves")
        if self.knn > self.n_keys:
            raise ValueError(f"memory knn {self.knn} exceeds n_keys {self.n_keys}")
        if self.heads < 1 or self.knn < 1 or self.v_dim < 1:
            raise ValueError("memory heads, knn and v_dim must be positive")


@dataclass(frozen=True)
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    ffn_hidden_dim: int
    n_kv_heads: int | None = None
    vocab_size: int = -1
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    memory: MemoryArgs | None = None
    """Product-key memory layers in the FFN slots they name; None for a dense model."""

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def validate(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")
        if self.vocab_size <= 0:
            raise ValueError("vocab_size must be set (from the tokenizer) before the model is built")
        if self.memory is not None:
            self.memory.validate(self.n_layers)
