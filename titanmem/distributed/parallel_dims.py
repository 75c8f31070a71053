"""The parallel plan: how the world's ranks split into data, tensor and memory parallelism.

Dimensions, outermost first (the innermost share a node, so their collectives run on NVLink):

- `dp_replicate`: full replicas of the (sharded) model; gradients are all-reduced across them (the replicate dim of
  HSDP).
- `dp_shard`: FSDP2 shards parameters, gradients and optimizer state over these ranks.
- `tp`: tensor parallel with sequence parallel; attention heads, FFN columns and the Memory+ layers' heads and v_dim
  are split over these ranks, and the residual stream's sequence between blocks.

`mp` (memory parallel) is not another factor of the world size: like torchtitan's expert parallel, it is carved out of
the existing ranks. Each group of `mp` consecutive `dp_shard` ranks splits the value table's columns (v_dim / mp each);
every rank of the group looks up for the whole group's tokens on its own columns. So `mp` must divide `dp_shard`, and
the world size is dp_replicate × dp_shard × tp.
"""

from __future__ import annotations

from dataclasses import dataclass

from titanmem.config.errors import ConfigError


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    tp: int
    mp: int
    world_size: int

    @classmethod
    def resolve(cls, dp_replicate: int, dp_shard: int, tp: int, mp: int, world_size: int) -> "ParallelDims":
        """Fill in dp_shard = -1 from the world size, then check the plan."""
        if dp_shard == -1:
            others = dp_replicate * tp
            if world_size % others:
                raise ConfigError(
                    "parallelism.dp_shard",
                    f"cannot be inferred: world size {world_size} is not divisible by dp_replicate × tp = "
                    f"{dp_replicate} × {tp}",
                )
            dp_shard = world_size // others
        dims = cls(dp_replicate, dp_shard, tp, mp, world_size)
        dims.validate()
        return dims

    def validate(self) -> None:
        for name in ("dp_replicate", "dp_shard", "tp", "mp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallelism.{name}", f"must be >= 1, got {getattr(self, name)}")
        product = self.dp_replicate * self.dp_shard * self.tp
        if product != self.world_size:
            raise ConfigError(
                "parallelism",
                f"dp_replicate × dp_shard × tp = {self.dp_replicate} × {self.dp_shard} × {self.tp} = {product} "
                f"must equal the world size {self.world_size}",
            )
        if self.dp_shard % self.mp:
            raise ConfigError(
                "parallelism.mp",
                f"must divide dp_shard = {self.dp_shard} (memory-parallel groups are carved out of the FSDP "
                f"shard ranks), got {self.mp}",
            )

    def check_model(self, n_heads: int, n_kv_heads: int, ffn_hidden_dim: int, memory=None) -> None:
        """Shape constraints of the plan on a model: every split must be even."""
        if self.tp > 1:
            for name, size in (("n_heads", n_heads), ("n_kv_heads", n_kv_heads), ("ffn_hidden_dim", ffn_hidden_dim)):
                if size % self.tp:
                    raise ConfigError("parallelism.tp", f"must divide the model's {name} ({size}), got {self.tp}")
            if memory is not None and memory.swilu:
                # Memory+ layers split their heads (query, sub-keys) and their v_dim (W1, W2) over tp.
                for name, size in (("memory heads", memory.heads), ("memory v_dim", memory.v_dim)):
                    if size % self.tp:
                        raise ConfigError("parallelism.tp", f"must divide the {name} ({size}), got {self.tp}")
        if self.mp > 1:
            if memory is None:
                raise ConfigError("parallelism.mp", f"is {self.mp}, but the model has no memory layers to shard")
            if memory.v_dim % self.mp:
                raise ConfigError(
                    "parallelism.mp", f"must divide the memory v_dim ({memory.v_dim}), got {self.mp}"
                )

    @property
    def dp(self) -> int:
        """Data-parallel ranks: each reads its own shard of the data."""
        return self.dp_replicate * self.dp_shard

    def mesh_shape(self) -> tuple[tuple[int, ...], tuple[str, ...]]:
        """Shape and names of the device mesh; dp_shard is split as (dp_shard_out, mp) so that a memory group is a
        run of consecutive ranks (inside one node when dp_shard fits in one)."""
        dims = [("dp_replicate", self.dp_replicate), ("dp_shard_out", self.dp_shard // self.mp), ("mp", self.mp),
                ("tp", self.tp)]
        return tuple(size for _, size in dims), tuple(name for name, _ in dims)
