"""Initialisation that does not depend on how a parameter is stored.

Each parameter declares its distribution (`ParamInit`, elementwise i.i.d.), and its values are drawn in fixed chunks
of whole rows, each chunk from a generator seeded by (seed, parameter name, chunk index). Any block of a parameter
can therefore be drawn on its own and equals the same block of the whole tensor: a rank that holds a shard draws only
the chunks its rows fall in (all of them when it holds a column slice). The full initial model is thus a function of
the seed and the device type only, never of the parallel plan. (CPU and CUDA generators are different streams, so a
GPU run and a CPU run start from different, equally distributed weights.)
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

# Elements per chunk: a fixed constant, so that the draw never depends on the device or the plan. Big enough that
# seeding costs nothing next to drawing, small enough that a rank holding one row-shard of a huge table draws little
# beyond it.
CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class ParamInit:
    """A distribution for every element of one parameter."""

    kind: str  # normal, trunc_normal, uniform or constant
    args: tuple[float, ...]

    @classmethod
    def normal(cls, std: float, mean: float = 0.0) -> "ParamInit":
        return cls("normal", (mean, std))

    @classmethod
    def trunc_normal(cls, std: float, low: float, high: float, mean: float = 0.0) -> "ParamInit":
        """Normal(mean, std) truncated to [low, high] (absolute bounds, as `nn.init.trunc_normal_`)."""
        return cls("trunc_normal", (mean, std, low, high))

    @classmethod
    def uniform(cls, low: float, high: float) -> "ParamInit":
        return cls("uniform", (low, high))

    @classmethod
    def constant(cls, value: float) -> "ParamInit":
        return cls("constant", (value,))

    @classmethod
    def xavier_uniform(cls, fan_in: int, fan_out: int) -> "ParamInit":
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        return cls.uniform(-bound, bound)

    def draw(self, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        out = torch.empty(shape, dtype=torch.float32, device=device)
        if self.kind == "normal":
            return out.normal_(*self.args, generator=generator)
        if self.kind == "trunc_normal":
            mean, std, low, high = self.args
            return nn.init.trunc_normal_(out, mean, std, low, high, generator=generator)
        if self.kind == "uniform":
            return out.uniform_(*self.args, generator=generator)
        if self.kind == "constant":
            return out.fill_(self.args[0])
        raise ValueError(f"unknown initialisation {self.kind!r}")


def _chunk_seed(seed: int, name: str, chunk: int) -> int:
    digest = hashlib.sha256(f"{seed}\x00{name}\x00{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def draw_block(spec: ParamInit, full_shape: tuple[int, ...], index: tuple[slice, ...], seed: int, name: str,
               device: torch.device) -> torch.Tensor:
    """The block `full[index]` of the parameter `name`'s full initial tensor (`index`: one step-1 slice per dim)."""
    shape = tuple(len(range(*i.indices(size))) for i, size in zip(index, full_shape))
    out = torch.empty(shape, device=device, dtype=torch.get_default_dtype())
    fill_block(out, spec, full_shape, index, seed, name)
    return out


def fill_block(target: torch.Tensor, spec: ParamInit, full_shape: tuple[int, ...], index: tuple[slice, ...],
               seed: int, name: str) -> None:
    """Write `full[index]` into `target` (any dtype) one row chunk at a time, keeping only the chunk's selected
    columns: a column slice of a table far larger than the device never exists whole, nor in fp32."""
    device = target.device
    if not full_shape:  # a scalar is one chunk of one element
        target.copy_(spec.draw((), _generator(spec, seed, name, 0, device), device))
        return
    rows, rest = full_shape[0], tuple(full_shape[1:])
    per_chunk = max(1, CHUNK_ELEMENTS // max(1, math.prod(rest)))
    start, stop, _ = index[0].indices(rows)
    written = 0
    for chunk in range(start // per_chunk, -(-stop // per_chunk)):
        first, last = chunk * per_chunk, min((chunk + 1) * per_chunk, rows)
        block = spec.draw((last - first, *rest), _generator(spec, seed, name, chunk, device), device)
        selected = block[max(start, first) - first : min(stop, last) - first][(slice(None), *index[1:])]
        target[written : written + selected.shape[0]].copy_(selected)
        written += selected.shape[0]


def _generator(spec: ParamInit, seed: int, name: str, chunk: int, device: torch.device) -> torch.Generator | None:
    if spec.kind == "constant":
        return None
    return torch.Generator(device=device).manual_seed(_chunk_seed(seed, name, chunk))


# (name, parameter) -> (the name the parameter's init is declared under, the tensor to fill, the block of the full
# parameter it holds: a slice per dim).
Locate = Callable[[str, nn.Parameter], tuple[str, torch.Tensor, tuple[slice, ...]]]


def whole_parameter(name: str, param: nn.Parameter) -> tuple[str, torch.Tensor, tuple[slice, ...]]:
    return name, param.data, tuple(slice(0, size) for size in param.shape)


@torch.no_grad()
def init_weights(module: nn.Module, seed: int, locate: Locate = whole_parameter) -> None:
    """Fill every parameter of `module` from `module.param_inits()`, then recompute its buffers (`init_buffers`).

    `locate` says which block of each full parameter this process holds; the default is all of it (a plain model on
    one device). Parallel plans pass their own (`titanmem.distributed.initialize`)."""
    specs: dict[str, ParamInit] = module.param_inits()
    for name, param in module.named_parameters():
        declared, target, index = locate(name, param)
        if declared not in specs:
            raise KeyError(f"parameter {declared} declares no initialisation in {type(module).__name__}.param_inits()")
        full_shape = tuple(param.shape)
        fill_block(target, specs[declared], full_shape, index, seed, declared)
    init_buffers = getattr(module, "init_buffers", None)
    if init_buffers is not None:
        init_buffers()


def prefixed(prefix: str, specs: dict[str, ParamInit]) -> dict[str, ParamInit]:
    return {f"{prefix}.{name}": spec for name, spec in specs.items()}
