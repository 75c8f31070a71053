"""Apply the parallel plan to a plain model, from outside, in a fixed order.

Order (each step sees the result of the one before):
1. tensor parallel over `tp` (`apply_tp`);
2. memory parallel over `mp` (`apply_memory_parallel`): the value table's columns split over each mp group;
3. activation checkpointing of blocks (`apply_activation_checkpointing`);
4. torch.compile of each block (`apply_compile`);
5. FSDP2 over `dp_shard` (HSDP when dp_replicate > 1): one `fully_shard` per transformer block, then one for the
   root, which holds the embeddings, the output layer and (without memory parallel) the memory value table.

The mesh is built by `build_mesh` from `ParallelDims.mesh_shape`, with flattened views for data loading (`dp`) and for
FSDP (`dp_shard`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor

from titanmem.distributed.parallel_dims import ParallelDims

try:  # torch >= 2.6 exports FSDP2 here
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
except ImportError:  # pragma: no cover - older torch
    from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard


def init_distributed(device: torch.device) -> None:
    """Join the process group torchrun described in the environment: NCCL between GPUs, gloo between CPU ranks."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)


@dataclass(frozen=True)
class Meshes:
    """The device mesh and the flattened views the trainer uses (kept here: slicing a flattened dim back out of
    the root mesh is deprecated)."""

    world: DeviceMesh
    dp: DeviceMesh  # every data-parallel rank: (dp_replicate, dp_shard_out, mp) flattened; loss and data sharding
    fsdp: DeviceMesh  # where FSDP2 shards: dp_shard, or (dp_replicate, dp_shard) for HSDP
    replicas: DeviceMesh | None  # the ranks holding the same value-table column slice: (dp_replicate, dp_shard_out)


def build_mesh(dims: ParallelDims, device_type: str) -> Meshes:
    shape, names = dims.mesh_shape()
    mesh = init_device_mesh(device_type, shape, mesh_dim_names=names)
    dp_shard = mesh[("dp_shard_out", "mp")]._flatten(mesh_dim_name="dp_shard")
    dp = mesh[("dp_replicate", "dp_shard_out", "mp")]._flatten(mesh_dim_name="dp")
    fsdp = dp_shard
    if dims.dp_replicate > 1:
        # HSDP needs a 2-D mesh (replicate, shard) over the same ranks as `dp`.
        fsdp = DeviceMesh(
            device_type,
            dp.mesh.reshape(dims.dp_replicate, dims.dp_shard),
            mesh_dim_names=("dp_replicate", "dp_shard"),
        )
    replicas = None
    if dims.mp > 1 and dims.dp // dims.mp > 1:
        replicas = mesh[("dp_replicate", "dp_shard_out")]._flatten(mesh_dim_name="mp_replicas")
    return Meshes(world=mesh, dp=dp, fsdp=fsdp, replicas=replicas)


def data_parallel_rank(meshes: Meshes | None) -> tuple[int, int]:
    """This rank's position among the data-parallel ranks, and their number."""
    if meshes is None:
        return 0, 1
    return meshes.dp.get_local_rank(), meshes.dp.size()


def apply_tp(model: torch.nn.Module, tp_mesh: DeviceMesh) -> None:
    """Megatron-style tensor parallel of attention (heads split) and of the SwiGLU FFNs (hidden units split): the
    column-parallel projections take the replicated input, the row-parallel ones all-reduce their output. Memory
    layers, norms, embeddings and the output layer stay replicated on the tp ranks in this plan: every tp rank runs
    them on the same (replicated) activations, so their gradients agree without communication."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from titanmem.models.llama import FeedForward

    for block in model.layers.values():
        plan = {
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(),
        }
        if isinstance(block.feed_forward, FeedForward):
            plan.update(
                {
                    "feed_forward.w1": ColwiseParallel(),
                    "feed_forward.w3": ColwiseParallel(),
                    "feed_forward.w2": RowwiseParallel(),
                }
            )
        parallelize_module(block, tp_mesh, plan)


def apply_activation_checkpointing(model: torch.nn.Module, mode: str, stride: int) -> None:
    """Wrap blocks so that their activations are recomputed in backward (all blocks, or every `stride`-th)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    if mode == "none":
        return
    for index, (name, block) in enumerate(list(model.layers.items())):
        if mode == "full" or index % stride == 0:
            model.layers[name] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_compile(model: torch.nn.Module, backend: str) -> None:
    """Compile each block on its own: blocks share code, so one compiled graph serves them all."""
    for name, block in list(model.layers.items()):
        model.layers[name] = torch.compile(block, backend=backend, fullgraph=False)


def apply_fsdp(model: torch.nn.Module, meshes: Meshes, bf16: bool) -> None:
    """Shard every block, then the root. Parameters are gathered in bf16 (on GPU) and gradients reduced in fp32."""
    fsdp_mesh = meshes.fsdp
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    blocks = list(model.layers.values())
    for index, block in enumerate(blocks):
        # The last block's parameters are needed again at once by backward: keep them gathered.
        fully_shard(block, mesh=fsdp_mesh, mp_policy=policy, reshard_after_forward=index < len(blocks) - 1)
    # A column-split value table (memory parallel) is managed by its own plan, not by FSDP.
    values = getattr(model, "memory_values", None)
    ignored = {values.weight} if values is not None and isinstance(values.weight, DTensor) else None
    fully_shard(model, mesh=fsdp_mesh, mp_policy=policy, ignored_params=ignored)


def local_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
