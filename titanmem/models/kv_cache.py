"""The attention layers' keys and values, kept across the forward calls of one decoding batch.

A batch of prompts of different lengths is left-padded to a common length, so that every row's next token sits in
the same column. Columns can also be marked as filler after the fact (a sequence-parallel plan needs every forward to
cover a multiple of its degree in tokens). Each real token keeps the position it would have alone (the count of real
tokens before it), and no real token attends to padding or filler. Only attention needs a cache: the FFN and the
memory layers act on each token alone.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every attention layer for a batch of `pad.numel()` left-padded rows, up to `capacity`
    tokens each (padding and filler included), of which at most `row_tokens` real. `pad[b]` counts the padding tokens
    that start row b. A forward call of the model with the cache writes its tokens' keys and values after those of
    the calls before it."""

    def __init__(self, pad: torch.Tensor, capacity: int, row_tokens: int | None = None):
        self.capacity = capacity
        # The most real tokens any row will hold (the rope positions it needs); at most `capacity` when no column
        # will be filler.
        self.row_tokens = capacity if row_tokens is None else row_tokens
        self.length = 0  # tokens of each row written so far (padding and filler included)
        # Which columns hold real tokens: the only ones attended to, and the only ones that count as positions.
        self.real = torch.arange(capacity, device=pad.device)[None, :] >= pad[:, None]
        self._layers: dict[int, LayerKVCache] = {}
        self._mask: tuple[int, int, torch.Tensor] | None = None  # (length, count, mask) of the current forward

    def mark_filler(self, start: int, end: int) -> None:
        """Columns [start, end) of every row hold filler tokens, not to be attended to."""
        self.real[:, start:end] = False

    def positions(self, count: int) -> torch.Tensor:
        """[B, count]: the rope positions of the next `count` tokens of each row, each the number of real tokens
        before it (padding and filler take their neighbour's, and are never attended to)."""
        if self.length + count > self.capacity:
            raise ValueError(f"the KV cache holds {self.capacity} tokens; {self.length} are written and {count} more "
                             "do not fit")
        before = self.real[:, : self.length + count].long().cumsum(1) - self.real[:, : self.length + count].long()
        return before[:, self.length :]

    def layer(self, layer_id: int) -> LayerKVCache:
        if layer_id not in self._layers:
            self._layers[layer_id] = LayerKVCache(self)
        return self._layers[layer_id]

    def mask(self, count: int) -> torch.Tensor:
        """[B, 1, count, length + count]: what each of the next `count` tokens may attend to: the real tokens up to
        itself, and itself (so that a padding or filler token's attention stays finite). Built once per forward call
        and shared by its layers."""
        if self._mask is None or self._mask[:2] != (self.length, count):
            end = self.length + count
            key_columns = torch.arange(end, device=self.real.device)
            query_columns = torch.arange(self.length, end, device=self.real.device)
            causal = key_columns[None, :] <= query_columns[:, None]  # [count, end]
            itself = key_columns[None, :] == query_columns[:, None]
            mask = (causal[None] & self.real[:, None, :end]) | itself[None]
            self._mask = (self.length, count, mask[:, None])
        return self._mask[2]

    def advance(self, count: int) -> None:
        """Mark the last forward call's `count` tokens as written (after every layer has stored them)."""
        self.length += count


class LayerKVCache:
    def __init__(self, owner: KVCache):
        self.owner = owner
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def update(self, keys: torch.Tensor, values: torch.Tensor):
        """Store the new tokens' [B, n, heads, head_dim] keys and values; return all keys and values so far,
        [B, length + n, heads, head_dim], and the attention mask of the new tokens (`KVCache.mask`)."""
        owner = self.owner
        start, count = owner.length, keys.shape[1]
        if self.keys is None:
            # Allocated on first use, in the shapes the layer produces (a tensor-parallel rank holds its heads only).
            self.keys = keys.new_zeros((keys.shape[0], owner.capacity, *keys.shape[2:]))
            self.values = values.new_zeros((values.shape[0], owner.capacity, *values.shape[2:]))
        end = start + count
        self.keys[:, start:end] = keys
        self.values[:, start:end] = values
        return self.keys[:, :end], self.values[:, :end], owner.mask(count)
