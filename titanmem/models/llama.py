"""A Llama-style decoder as plain single-device PyTorch.

Parallelism is applied from outside (FSDP, TP and memory parallel wrap or shard these modules), so nothing here knows
about ranks or meshes. Blocks live in a `ModuleDict` keyed by layer index, which keeps parameter names stable when
blocks are wrapped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from titanmem.models.args import ModelArgs
from titanmem.models.init import ParamInit, prefixed
from titanmem.models.kv_cache import KVCache, LayerKVCache
from titanmem.models.memory import MemoryValues, ProductKeyMemory

# Attention and FFN input projections: torchtitan's truncated normal (bounds ±2, absolute).
_PROJECTION = ParamInit.trunc_normal(0.02, -2.0, 2.0)
_NORM = ParamInit.constant(1.0)


def rope_cache(head_dim: int, max_seq_len: int, theta: float, device=None) -> torch.Tensor:
    """cos and sin of the rotation angles, interleaved: [max_seq_len, head_dim] holding (cos θ_i, sin θ_i) pairs, the
    real and imaginary parts of the rotations e^{iθ} (`rope_rotations`)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), inv_freq)
    return torch.stack([angles.cos(), angles.sin()], dim=-1).flatten(-2)


def rope_rotations(cache: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The complex rotations e^{iθ} of the first `seq_len` positions, [seq_len, head_dim / 2] complex64. The blocks
    take them in this form because FSDP's mixed precision casts a block's floating-point inputs to bf16, which would
    round cos and sin, and leaves complex ones alone. A new tensor, not a view of the cache: the compiler does not
    trace a complex view of a real tensor passed in."""
    pairs = cache[:seq_len].unflatten(-1, (-1, 2))
    return torch.complex(pairs[..., 0], pairs[..., 1])


def rope_rotations_at(cache: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The complex rotations of the given [B, S] positions, [B, S, head_dim / 2] (each row its own positions, as
    left-padded decoding needs)."""
    pairs = cache[positions].unflatten(-1, (-1, 2))
    return torch.complex(pairs[..., 0], pairs[..., 1])


def apply_rope(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) of each head by `rotations` (`rope_rotations`, the first S
    positions, or `rope_rotations_at`, per row), in fp32. x: [B, S, H, D].

    In eager mode as one complex product: 3 kernels where the real arithmetic takes 10, which made rope a fifth of
    the 134m step. Under torch.compile in real arithmetic, which the compiler fuses into one kernel (it does not
    generate code for complex numbers)."""
    if rotations.dim() == 3:
        rotations = rotations[:, :, None, :]  # [B, S, 1, D / 2], broadcast over heads
    else:
        rotations = rotations[: x.shape[1], None, :]  # [S, 1, D / 2], broadcast over batch and heads
    pairs = x.float().contiguous().unflatten(-1, (-1, 2))  # a complex view needs even strides
    if torch.compiler.is_compiling():
        cos_sin = torch.view_as_real(rotations)
        cos, sin = cos_sin[..., 0], cos_sin[..., 1]
        real, imag = pairs[..., 0], pairs[..., 1]
        rotated = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1)
    else:
        rotated = torch.view_as_real(torch.view_as_complex(pairs) * rotations)
    return rotated.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.head_dim = args.head_dim
        self.n_rep = args.n_heads // args.kv_heads
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, rotations: torch.Tensor, cache: LayerKVCache | None = None) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        # -1 heads: under tensor parallel each rank holds a slice of the heads.
        q = self.wq(x).view(batch, seq_len, -1, self.head_dim)
        k = self.wk(x).view(batch, seq_len, -1, self.head_dim)
        v = self.wv(x).view(batch, seq_len, -1, self.head_dim)
        q, k = apply_rope(q, rotations), apply_rope(k, rotations)
        mask = None
        if cache is not None:
            k, v, mask = cache.update(k, v)
        if self.n_rep > 1:
            k = k.repeat_interleave(self.n_rep, dim=2)
            v = v.repeat_interleave(self.n_rep, dim=2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask, is_causal=mask is None)
        return self.wo(out.transpose(1, 2).reshape(batch, seq_len, -1))

    def param_inits(self, out_std: float) -> dict[str, ParamInit]:
        return {"wq.weight": _PROJECTION, "wk.weight": _PROJECTION, "wv.weight": _PROJECTION,
                "wo.weight": ParamInit.trunc_normal(out_std, -2.0, 2.0)}


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def param_inits(self, out_std: float) -> dict[str, ParamInit]:
        output = ParamInit.trunc_normal(out_std, -2.0, 2.0)
        return {"w1.weight": _PROJECTION, "w2.weight": output, "w3.weight": output}


class TransformerBlock(nn.Module):
    """Pre-norm residual block. `feed_forward` is any module mapping [B, S, dim] to [B, S, dim] with a
    `param_inits(out_std)` method (its parameters' distributions): a SwiGLU FFN, or a memory layer in the blocks that
    hold one."""

    def __init__(self, layer_id: int, args: ModelArgs, feed_forward: nn.Module):
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.feed_forward = feed_forward
        # Depth-scaled init of the residual-branch outputs keeps the residual stream's variance flat with depth.
        self.out_init_std = 0.02 / (2 * (layer_id + 1)) ** 0.5

    def forward(self, x: torch.Tensor, rotations: torch.Tensor, cache: LayerKVCache | None = None) -> torch.Tensor:
        # The cache goes by keyword: tensor parallel's input hooks lay out the positional inputs only.
        h = x + self.attention(self.attention_norm(x), rotations, cache=cache)
        return h + self.feed_forward(self.ffn_norm(h))

    def param_inits(self) -> dict[str, ParamInit]:
        return {"attention_norm.weight": _NORM, "ffn_norm.weight": _NORM,
                **prefixed("attention", self.attention.param_inits(self.out_init_std)),
                **prefixed("feed_forward", self.feed_forward.param_inits(self.out_init_std))}


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        args.validate()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        # One value table for all memory layers, owned here so that it has one name: `memory_values.weight`.
        self.memory_values = MemoryValues(args.memory.n_values, args.memory.v_dim,
                                          args.memory.value_dtype) if args.memory else None
        self.layers = nn.ModuleDict(
            {str(i): TransformerBlock(i, args, self.build_feed_forward(i)) for i in range(args.n_layers)}
        )
        self.norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        # Not persistent: it is a pure function of the args, so checkpoints stay free of it.
        self.register_buffer("rope", rope_cache(args.head_dim, args.max_seq_len, args.rope_theta), persistent=False)

    def build_feed_forward(self, layer_id: int) -> nn.Module:
        """The FFN slot of block `layer_id`: a memory layer where `args.memory` places one, else a SwiGLU FFN.
        Model variants override this to place other modules there."""
        memory = self.args.memory
        if memory is not None and layer_id in memory.layers:
            return ProductKeyMemory(self.args.dim, memory, self.memory_values)
        return FeedForward(self.args.dim, self.args.ffn_hidden_dim)

    def param_inits(self) -> dict[str, ParamInit]:
        """Every parameter's distribution, by name (`titanmem.models.init` draws them, whatever the plan)."""
        final_std = self.args.dim**-0.5
        specs = {"tok_embeddings.weight": ParamInit.normal(1.0), "norm.weight": _NORM,
                 "output.weight": ParamInit.trunc_normal(final_std, -3 * final_std, 3 * final_std)}
        if self.memory_values is not None:
            specs.update(prefixed("memory_values", self.memory_values.param_inits()))
        for name, block in self.layers.items():
            specs.update(prefixed(f"layers.{name}", block.param_inits()))
        return specs

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Recompute the buffers, e.g. after `to_empty` from the meta device."""
        self.rope.copy_(rope_cache(self.args.head_dim, self.args.max_seq_len, self.args.rope_theta, self.rope.device))

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """[B, S] tokens -> [B, S, vocab] logits. With a `cache` (decoding), the tokens follow those of the earlier
        calls with the same cache, and their keys and values join it."""
        if cache is None and tokens.shape[1] > self.args.max_seq_len:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds max_seq_len {self.args.max_seq_len}")
        if cache is not None and cache.row_tokens > self.args.max_seq_len:
            raise ValueError(f"sequence length {cache.row_tokens} (prompt and new tokens) exceeds max_seq_len "
                             f"{self.args.max_seq_len}")
        h = self.tok_embeddings(tokens)
        if cache is None:
            rotations = rope_rotations(self.rope, tokens.shape[1])
        else:
            rotations = rope_rotations_at(self.rope, cache.positions(tokens.shape[1]))
        for name, block in self.layers.items():
            h = block(h, rotations) if cache is None else block(h, rotations, cache=cache.layer(int(name)))
        if cache is not None:
            cache.advance(tokens.shape[1])
        return self.output(self.norm(h))
