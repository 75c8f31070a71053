"""Apply the parallel plan to a plain model, from outside, in one fixed order (`parallelize_model`):

1. tensor parallel over `tp` with sequence parallel (`apply_tp`, plan in `tensor_parallel_plan`);
2. memory parallel: the value table's columns split over each mp group (`shard_value_columns`), or its rows and
   columns over every data-parallel rank with `value_slice_sharding = "rows"` (`shard_value_grid`), and every
   memory layer's lookup routed through `DistributedLookup` (`apply_memory_lookups`), which gathers heads over tp,
   exchanges over mp (or the whole grid) and records reads for a row-wise value optimizer (on one process too);
3. activation checkpointing of blocks (`apply_activation_checkpointing`);
4. torch.compile of each block (`apply_compile`);
5. FSDP2 over `dp_shard` (HSDP when dp_replicate > 1): one `fully_shard` per transformer block, then one for the
   root, which holds the embeddings and the output layer. The memory value table is row-sharded by FSDP, or left
   to step 2's layout, per `[parallelism] value_slice_sharding` (see `apply_fsdp`).

Each step sees the result of the one before: TP and MP must replace parameters before AC and compile wrap the blocks,
and FSDP must come last so that it shards the parameters the earlier steps left. All of it runs on the meta device;
the build path then materialises each rank's shards and initialises them (`titanmem.distributed.initialize`).
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from titanmem.config.sections import JobConfig
from titanmem.distributed.lookup import ReadRecorder, apply_memory_lookups, is_tensor_parallel
from titanmem.distributed.memory_parallel import shard_value_columns
from titanmem.distributed.parallel_dims import ParallelDims
from titanmem.distributed.row_parallel import shard_value_grid
from titanmem.models.memory import ProductKeyMemory

try:  # torch >= 2.6 exports FSDP2 here
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
except ImportError:  # pragma: no cover - older torch
    from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard


def parallelize_model(model: torch.nn.Module, dims: ParallelDims, config: JobConfig, *, bf16: bool,
                      value_layout: str | None, recorder: ReadRecorder | None) -> None:
    """The whole plan, in the order of the module doc. `dims` must have built its mesh when it spans several ranks
    (with the value grid when `value_layout` is "rows"); `value_layout` is the plan's `value_slice_sharding`."""
    tp_mesh = dims.get_mesh("tp") if dims.tp_enabled else None
    if tp_mesh is not None:
        apply_tp(model, tp_mesh)
    if model.memory_values is not None:
        apply_memory_parallel(model, dims, value_layout, recorder, tp_mesh)
    ac = config.activation_checkpoint
    apply_activation_checkpointing(model, ac.mode, ac.selective_layer_stride)
    if config.compile.enable:
        apply_compile(model, config.compile.backend)
    if dims.distributed:
        apply_fsdp(model, dims, bf16=bf16, shard_value_slices=value_layout == "fsdp")


def apply_memory_parallel(model: torch.nn.Module, dims: ParallelDims, value_layout: str | None,
                          recorder: ReadRecorder | None, tp_mesh) -> None:
    """Lay the value table out (columns over mp; with "rows", rows over the slice's replicas too) and route every
    memory layer's lookup through the matching exchange."""
    grid_mesh = dims.get_mesh("value_grid") if value_layout == "rows" else None
    mp_mesh = dims.get_mesh("mp") if dims.mp_enabled else None
    if grid_mesh is not None:
        shard_value_grid(model.memory_values, grid_mesh)
        apply_memory_lookups(model, recorder, tp_mesh=tp_mesh, grid_group=dims.get_group("dp"))
        return
    if mp_mesh is not None:
        shard_value_columns(model.memory_values, mp_mesh)
    apply_memory_lookups(model, recorder, mp_mesh.get_group() if mp_mesh is not None else None, tp_mesh)


def tensor_parallel_plan(model: torch.nn.Module) -> dict[str, object]:
    """The tensor-parallel plan, as a literal dict from module path to style (Megatron-style with sequence parallel).

    Between blocks the residual stream is split along the sequence over tp (`Shard(1)`), and the norms run on their
    slice of the tokens (sequence parallel). Each attention, FFN and memory layer gathers the sequence at its input;
    its column-parallel projections (attention's wq/wk/wv, the FFN's w1/w3, the memory's query and W1) take the full
    input and keep a slice of heads or hidden units; its row-parallel projection (wo, the FFN's w2, the memory's W2)
    reduce-scatters its partial sums back to sequence slices. The memory layer's sub-keys are split by heads like its
    query; its lookup is made tensor parallel by `apply_memory_lookups`. Memory layers without W1 (plain PKM) run
    whole on every tp rank. Embedding rows and the output layer's vocabulary are split too.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        PrepareModuleInputOutput,
        RowwiseParallel,
        SequenceParallel,
    )

    def gather_sequence():
        return PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                  use_local_output=True)

    plan: dict[str, object] = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
    }
    for name, block in model.layers.items():
        prefix = f"layers.{name}"
        plan.update({
            f"{prefix}.attention_norm": SequenceParallel(),
            f"{prefix}.attention": PrepareModuleInput(input_layouts=(Shard(1), None),
                                                      desired_input_layouts=(Replicate(), None)),
            f"{prefix}.attention.wq": ColwiseParallel(),
            f"{prefix}.attention.wk": ColwiseParallel(),
            f"{prefix}.attention.wv": ColwiseParallel(),
            f"{prefix}.attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            f"{prefix}.ffn_norm": SequenceParallel(),
            f"{prefix}.feed_forward": gather_sequence(),
        })
        ffn = block.feed_forward
        if not isinstance(ffn, ProductKeyMemory):
            plan.update({
                f"{prefix}.feed_forward.w1": ColwiseParallel(),
                f"{prefix}.feed_forward.w3": ColwiseParallel(),
                f"{prefix}.feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
            })
        else:
            # A gate multiplies W2's full output, and a plain PKM layer runs whole: the layer's output is then
            # replicated, and only this rank's sequence slice goes on.
            whole_output = ffn.gate is not None or not is_tensor_parallel(ffn)
            if is_tensor_parallel(ffn):
                plan.update({
                    f"{prefix}.feed_forward.query": ColwiseParallel(),
                    f"{prefix}.feed_forward.w1": ColwiseParallel(),
                    f"{prefix}.feed_forward.w2": RowwiseParallel(
                        output_layouts=Replicate() if whole_output else Shard(1)),
                })
            if whole_output:
                plan[f"{prefix}.feed_forward"] = PrepareModuleInputOutput(
                    input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_input=True,
                    output_layouts=(Replicate(),), desired_output_layouts=(Shard(1),), use_local_output=True)
    return plan


def apply_tp(model: torch.nn.Module, tp_mesh: DeviceMesh) -> None:
    """Apply `tensor_parallel_plan`, and split each tensor-parallel memory layer's sub-keys by heads."""
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.parallel import parallelize_module

    parallelize_module(model, tp_mesh, tensor_parallel_plan(model))
    for layer in model.modules():
        if isinstance(layer, ProductKeyMemory) and is_tensor_parallel(layer):
            subkeys = distribute_tensor(layer.subkeys.data, tp_mesh, [Shard(0)])
            layer.subkeys = torch.nn.Parameter(subkeys, requires_grad=layer.subkeys.requires_grad)


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


def apply_fsdp(model: torch.nn.Module, dims: ParallelDims, bf16: bool, shard_value_slices: bool) -> None:
    """Shard every block, then the root. Parameters are gathered in bf16 (on GPU) and gradients reduced in fp32.

    The memory value table: with `shard_value_slices`, FSDP shards it by rows. When mp splits its columns, that is a
    group of its own over the slice's replicas, gathered once per step (its reads are random rows: resharding it
    between layers would gather it again for each); otherwise it belongs to the root. Without, FSDP leaves it alone:
    each rank holds its whole slice (`value_slice_sharding = "replicate"`) or its block of the grid ("rows")."""
    fsdp_mesh = dims.get_mesh("fsdp")
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    blocks = list(model.layers.values())
    for index, block in enumerate(blocks):
        # The last block's parameters are needed again at once by backward: keep them gathered.
        fully_shard(block, mesh=fsdp_mesh, mp_policy=policy, reshard_after_forward=index < len(blocks) - 1)
    values = getattr(model, "memory_values", None)
    ignored = None
    if values is not None:
        column_split = isinstance(values.weight, DTensor)
        replicas = dims.get_mesh("mp_replicas")
        if shard_value_slices and column_split and replicas is not None:
            fully_shard(values, mesh=replicas, mp_policy=policy, reshard_after_forward=False)
        elif not shard_value_slices or column_split:
            ignored = {values.weight}
    fully_shard(model, mesh=fsdp_mesh, mp_policy=policy, ignored_params=ignored)
