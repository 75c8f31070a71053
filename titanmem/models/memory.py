"""Product-key memory layers (Lample et al. 2019; Berges et al., "Memory Layers at Scale", 2025).

For each token: a per-head query is split in halves and scored against two small sub-key tables; the top-k of each
half are combined into k×k candidate full keys, whose top-k select rows of a shared value table of n_keys² rows. A
softmax over the selected scores weights a bag of heads·k value rows. Memory+ then gates the result with a SiLU
branch of the input: W2(y ⊙ silu(W1 x)).

The value table is owned by the model (`MemoryValues`), not by any layer, so that all memory layers read one table
and the table has one parameter name. Layers hold an unregistered reference to it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from titanmem.models.args import MemoryArgs
from titanmem.models.init import ParamInit
from titanmem.models.key_search import get_key_search
from titanmem.models.lookup import get_lookup
from titanmem.utils import local_tensor


VALUE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class MemoryValues(nn.Module):
    """The value table shared by every memory layer of one model: n_keys² rows of v_dim."""

    def __init__(self, n_values: int, v_dim: int, dtype: str = "fp32"):
        super().__init__()
        if dtype not in VALUE_DTYPES:
            raise ValueError(f"value table dtype must be one of {sorted(VALUE_DTYPES)}, got {dtype!r}")
        self.weight = nn.Parameter(torch.empty(n_values, v_dim, dtype=VALUE_DTYPES[dtype]))
        # Called by each memory layer with (layer, indices, weights) of its read, when set (telemetry, eval dumps).
        self.observer = None

    def forward(self) -> torch.Tensor:
        """The table. Layers read it through this call, so that wrappers of this module see each use (FSDP gathers a
        row-sharded table here)."""
        return self.weight

    def param_inits(self) -> dict[str, ParamInit]:
        return {"weight": ParamInit.normal(self.weight.shape[1] ** -0.5)}


class ProductKeyMemory(nn.Module):
    """One memory layer in a block's FFN slot: maps [B, S, dim] to [B, S, dim]."""

    def __init__(self, dim: int, args: MemoryArgs, values: MemoryValues):
        super().__init__()
        self.args = args
        self.dim = dim
        self.query = nn.Linear(dim, args.heads * args.k_dim, bias=True)
        self.subkeys = nn.Parameter(torch.empty(args.heads, 2, args.n_keys, args.k_dim // 2))
        # Memory+ gates the read-out with silu(W1 x) and projects back with W2; without swilu, W2 only bridges
        # a v_dim that differs from dim.
        self.w1 = nn.Linear(dim, args.v_dim, bias=True) if args.swilu else None
        self.w2 = nn.Linear(args.v_dim, dim, bias=True) if args.swilu or args.v_dim != dim else None
        self.gate = nn.Linear(dim, 1, bias=True) if args.gated else None
        # Not registered: the table belongs to the model, and registering it here would give it a second name.
        self.__dict__["values"] = values
        self.key_search = get_key_search(args.key_search)
        self.lookup = get_lookup(args.lookup)

    def param_inits(self, out_std: float | None = None) -> dict[str, ParamInit]:
        """The paper's recipe (its own scales, not the block's depth-scaled std), with every bias zeroed."""
        bound = 1 / math.sqrt(self.args.k_dim)
        specs = {"subkeys": ParamInit.uniform(-bound, bound),
                 "query.weight": ParamInit.xavier_uniform(self.dim, self.args.heads * self.args.k_dim),
                 "query.bias": ParamInit.constant(0.0)}
        for name in ("w1", "w2", "gate"):
            if getattr(self, name) is not None:
                specs[f"{name}.weight"] = ParamInit.normal(self.dim**-0.5)
                specs[f"{name}.bias"] = ParamInit.constant(0.0)
        return specs

    def search(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax weights (fp32) and value-row indices, each [T, heads, knn], for flat tokens: [T, dim]. Under tensor
        parallel the query projection and the sub-keys hold a slice of the heads, and so do the results."""
        query = self.query(tokens).unflatten(-1, (-1, self.args.k_dim))
        subkeys = local_tensor(self.subkeys)
        if self.args.qk_norm:
            query = F.rms_norm(query.unflatten(-1, (2, -1)), (self.args.k_dim // 2,)).flatten(-2)
            subkeys = F.rms_norm(subkeys, subkeys.shape[-1:])
        return self.key_search(query, subkeys.to(query.dtype), self.args.knn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, indices = self.search(x.reshape(-1, self.dim))
        indices, weights = indices.flatten(1), weights.flatten(1)  # one bag of heads × knn rows per token
        if self.values.observer is not None:
            self.values.observer(self, indices, weights)
        # The parallel plan may route this through a wrapper that exchanges over ranks and records the read for a
        # row-wise value optimizer (titanmem.distributed.lookup); the model itself only reads.
        read = self.lookup(self.values(), indices, weights)
        # Back to [B, S, width]: the projections then see the sequence dim, which sequence parallel splits.
        read = read.view(*x.shape[:-1], -1).to(x.dtype)
        if self.w1 is not None:
            out = self.w2(read * F.silu(self.w1(x)))
        elif self.w2 is not None:
            out = self.w2(read)
        else:
            out = read
        if self.gate is not None:
            out = out * torch.sigmoid(self.gate(x))
        return out
