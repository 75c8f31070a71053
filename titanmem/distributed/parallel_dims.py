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

`build_mesh` builds the device mesh once; the rest of the code asks for a mesh or a process group by name
(`get_mesh`, `get_group`) and never slices meshes itself:
- `world`: the root mesh (dp_replicate, dp_shard_out, mp, tp);
- `tp`, `mp`: the tensor- and memory-parallel groups;
- `dp`: every data-parallel rank (dp_replicate × dp_shard), which reads its own data and averages the loss;
- `fsdp`: where FSDP2 shards: dp_shard, or the 2-D (dp_replicate, dp_shard) of HSDP;
- `mp_replicas`: the ranks that hold the same slice of the value table (every data-parallel rank when mp = 1);
- `value_grid`: with `value_slice_sharding = "rows"`, the 2-D (value_rows, mp) mesh of the data-parallel ranks that
  the value table is laid out on: row blocks over the slice's replicas, columns over mp
  (`titanmem.distributed.row_parallel`). Its dims reuse the `mp_replicas` and `mp` groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from titanmem.config.errors import ConfigError


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    tp: int
    mp: int
    world_size: int
    # Filled once by `build_mesh`; the degrees above never change.
    _meshes: dict = field(default_factory=dict, compare=False, repr=False)

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

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def mp_enabled(self) -> bool:
        return self.mp > 1

    @property
    def slice_copies(self) -> int:
        """Ranks that hold the same slice of the value table (its column slice under mp, else the whole table)."""
        return self.dp // self.mp

    def mesh_shape(self) -> tuple[tuple[int, ...], tuple[str, ...]]:
        """Shape and names of the device mesh; dp_shard is split as (dp_shard_out, mp) so that a memory group is a
        run of consecutive ranks (inside one node when dp_shard fits in one)."""
        dims = [("dp_replicate", self.dp_replicate), ("dp_shard_out", self.dp_shard // self.mp), ("mp", self.mp),
                ("tp", self.tp)]
        return tuple(size for _, size in dims), tuple(name for name, _ in dims)

    def build_mesh(self, device_type: str, value_grid: bool = False) -> None:
        """Build the device mesh and its named views, once; a single process has none. `value_grid` adds the mesh of
        a rows-sharded value table (when the slice has several replicas to split its rows over)."""
        if self._meshes or not self.distributed:
            return
        from torch.distributed.device_mesh import init_device_mesh

        shape, names = self.mesh_shape()
        world = init_device_mesh(device_type, shape, mesh_dim_names=names)
        # Flattened views are made once here: slicing a flattened dim back out of the root mesh is deprecated.
        dp_shard = world[("dp_shard_out", "mp")]._flatten(mesh_dim_name="dp_shard")
        dp = world[("dp_replicate", "dp_shard_out", "mp")]._flatten(mesh_dim_name="dp")
        # HSDP needs a 2-D mesh (replicate, shard); sliced from the root mesh, so that FSDP can combine it with tp.
        fsdp = world[("dp_replicate", "dp_shard")] if self.dp_replicate > 1 else dp_shard
        meshes = {"world": world, "tp": world["tp"], "mp": world["mp"], "dp": dp, "fsdp": fsdp}
        if self.slice_copies > 1:
            meshes["mp_replicas"] = dp if self.mp == 1 else world[("dp_replicate", "dp_shard_out")]._flatten(
                mesh_dim_name="mp_replicas")
        if value_grid and self.slice_copies > 1:
            meshes["value_grid"] = self._value_grid(device_type, world, meshes["mp_replicas"])
        self._meshes.update(meshes)

    def _value_grid(self, device_type: str, world, replicas):
        """This rank's (value_rows, mp) mesh: the data-parallel ranks of its tp index, value_rows outermost (the
        data-parallel rank is value_rows × mp + mp rank). Made from the existing groups, so no new ones are formed."""
        import torch
        from torch.distributed.device_mesh import DeviceMesh

        ranks = torch.arange(self.world_size).view(self.slice_copies, self.mp, self.tp)
        ranks = ranks[:, :, world["tp"].get_local_rank()]
        return DeviceMesh.from_group([replicas.get_group(), world["mp"].get_group()], device_type, mesh=ranks,
                                     mesh_dim_names=("value_rows", "mp"))

    def get_mesh(self, name: str):
        """The named mesh (see the module doc), or None on a single process or when the plan has no such group."""
        if name not in ("world", "tp", "mp", "dp", "fsdp", "mp_replicas", "value_grid"):
            raise KeyError(f"no mesh named {name!r}")
        return self._meshes.get(name)

    def get_group(self, name: str):
        """The process group of a 1-D named mesh, or None when it has a single rank (nothing to exchange)."""
        mesh = self.get_mesh(name)
        return mesh.get_group() if mesh is not None and mesh.size() > 1 else None

    def data_parallel_position(self) -> tuple[int, int]:
        """This rank's index among the data-parallel ranks, and their number."""
        mesh = self.get_mesh("dp")
        return (mesh.get_local_rank(), mesh.size()) if mesh is not None else (0, 1)
