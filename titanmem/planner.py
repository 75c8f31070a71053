"""What a plan needs per GPU, and which plans fit a cluster (`titanmem-plan`, i.e. `python -m titanmem.planner_report`,
prints it).

The model is built through the build path on the meta device, parallelized for the whole world under a fake process
group (`fake_world`), so every parameter, shard and value-table slice count is the code's own: what changes in the
model or the parallel plan changes here too. On top of those counts, `estimate` adds what no parameter shows:
gradients, optimizer states, activations, communication buffers and allocator headroom, from the formulas below
(docs/planner.md states them, and docs/benchmarks.md compares them with measured peaks).

`rank_plans` enumerates the (dp_replicate, dp_shard, tp, mp) meshes of a cluster, estimates each, and ranks those
that fit by estimated tokens per second per GPU, from a step-time model: compute from rates measured on a GPU
(`titanmem.step_model`: matmuls, elementwise work, the memory lookups, the optimizer steps and the value update),
plus the communication on the critical path (TP exchanges, and the value table's by its layout:
`titanmem.distributed.value_layout_cost`), plus what FSDP traffic the compute cannot hide.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from titanmem.build import build_planned_model
from titanmem.config.errors import ConfigError
from titanmem.config.sections import JobConfig
from titanmem.distributed.lookup import ReadRecorder
from titanmem.models.accounting import count_parameters, flops_per_token
from titanmem.models.llama import Transformer
from titanmem.models.memory import ProductKeyMemory
from titanmem.distributed.value_layout_cost import (INTER_NODE_BYTES_PER_S, INTRA_NODE_BYTES_PER_S, ring,
                                                    value_exchange_seconds, value_update_work)
from titanmem.plan import RunPlan, resolve_plan, value_table_work
from titanmem.step_model import MEASURED, StepRates, StepWork

GB = 1e9
# The memory telemetry's counts per row of the whole table, per memory layer and pooled: an int64 window and a bool
# "ever read" (titanmem/eval/telemetry.py).
TELEMETRY_BYTES_PER_ROW = 9
# Kept free of the estimate: the CUDA context, NCCL's own buffers and the caching allocator's fragmentation.
HEADROOM_FRACTION = 0.06
HEADROOM_MIN_BYTES = 2 * GB


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    gb_per_gpu: float

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def bytes_per_gpu(self) -> float:
        return self.gb_per_gpu * GB

    def describe(self) -> str:
        return f"{self.nodes} node(s) × {self.gpus_per_node} GPUs × {self.gb_per_gpu:g} GB"


@dataclass
class Estimate:
    """Per-GPU bytes by what holds them (rank 0; ranks of one plan hold the same amounts)."""

    plan: RunPlan
    rows: list[tuple[str, float, str]]
    headroom: float
    step_seconds: float
    comm_seconds: float

    @property
    def needed(self) -> float:
        return sum(row[1] for row in self.rows)

    @property
    def total(self) -> float:
        return self.needed + self.headroom

    @property
    def tokens_per_gpu_second(self) -> float:
        """Estimated training tokens per second per GPU: plans of one cluster differ in their global batch (tp
        ranks share a batch), so they are compared per token."""
        return self.plan.tokens_per_step / self.step_seconds / self.plan.world_size

    def fits(self, cluster: Cluster) -> bool:
        return self.total <= cluster.bytes_per_gpu

    def layout(self) -> str:
        d = self.plan.parallel
        return (f"dp_replicate {d.dp_replicate} × dp_shard {d.dp_shard} × tp {d.tp}, mp {d.mp}; values "
                f"{self.plan.value_optimizer or '-'}, slices {self.plan.value_slice_sharding or '-'}")


@contextlib.contextmanager
def fake_world(world_size: int):
    """A process group of `world_size` ranks that exchanges nothing (this process is rank 0), so a mesh and a
    parallelized model of any size can be built on one CPU."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a process group already exists; the planner needs its own")
    dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def planned_config(config: JobConfig, **parallelism) -> JobConfig:
    """`config` with some `[parallelism]` fields replaced."""
    return dataclasses.replace(config, parallelism=dataclasses.replace(config.parallelism, **parallelism))


def resolve_for(config: JobConfig, world: int, gpus_per_node: int | None = None) -> RunPlan:
    """The plan of `config` on `world` GPUs in nodes of `gpus_per_node` (default: one node), CUDA whatever this
    machine has."""
    vocab = config.model.vocab_size if config.model.vocab_size > 0 else None
    return resolve_plan(config, "dry_run", world_size=world, device_type="cuda", tokenizer_vocab_size=vocab,
                        gpus_per_node=gpus_per_node or world)


def build_meta(plan: RunPlan) -> Transformer:
    """The plan's model on rank 0, parallelized for its whole world on the meta device. Call inside `fake_world`
    when the world has several ranks."""
    plan.build_mesh("cpu")
    spec = plan.value_optimizer_spec
    recorder = ReadRecorder() if spec is not None and spec.rowwise else None
    return build_planned_model(plan, torch.device("meta"), recorder)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _numel_bytes(tensors) -> tuple[int, int]:
    tensors = list(tensors)
    return sum(t.numel() for t in tensors), sum(t.numel() * t.element_size() for t in tensors)


def estimate(plan: RunPlan, model: Transformer, cluster: Cluster) -> Estimate:
    """Per-GPU memory of `plan` on `cluster`, from the parallelized meta `model` (see `build_meta`)."""
    config, dims = plan.config, plan.parallel
    table = model.memory_values.weight if model.memory_values is not None else None
    dense = [p for p in model.parameters() if p is not table]
    dense_elements, dense_bytes = _numel_bytes(_local(p) for p in dense)
    rows: list[tuple[str, float, str]] = [
        ("dense parameters", dense_bytes, f"{dense_elements / 1e6:,.1f}M per GPU: fp32, FSDP shard of 1/{dims.dp_shard}"
         + (f", tp {dims.tp}" if dims.tp > 1 else "")),
        ("dense gradients", dense_elements * 4, "fp32, sharded like the parameters"),
        ("dense AdamW state", dense_elements * 8, "two fp32 moments per parameter"),
    ]
    tokens = config.training.local_batch_size * config.training.seq_len  # per data-parallel rank and micro-batch
    if table is not None:
        rows += _value_rows(plan, table, tokens)
    if table is not None and config.metrics.memory_telemetry_freq:
        layers = len(plan.model_args.memory.layers)
        rows.append(("memory telemetry", (layers + 1) * table.shape[0] * TELEMETRY_BYTES_PER_ROW,
                     f"read counts of every row of the table, per memory layer and pooled ({layers} + 1), "
                     "metrics.memory_telemetry_freq > 0"))
    rows.append(("activations", _activation_bytes(plan, model, tokens), _activation_note(plan)))
    rows.append(("communication buffers", _buffer_bytes(plan, model, tokens),
                 "FSDP: two blocks gathered in bf16 and one block's fp32 gradients; the root kept gathered; MP "
                 "exchange"))
    headroom = max(HEADROOM_MIN_BYTES, HEADROOM_FRACTION * cluster.bytes_per_gpu)
    step, comm = step_time(plan, model, cluster, tokens)
    return Estimate(plan, rows, headroom, step, comm)


def _value_rows(plan: RunPlan, table: torch.Tensor, tokens: int) -> list[tuple[str, float, str]]:
    dims, memory = plan.parallel, plan.model_args.memory
    local = _local(table)
    rows_sharded = plan.value_slice_sharding == "rows" and dims.slice_copies > 1
    slice_rows, slice_cols = table.shape[0], table.shape[1] // dims.mp  # the slice this rank's mp column holds
    block_rows = local.shape[0] if rows_sharded else slice_rows  # the rows this rank updates
    slice_elements = slice_rows * slice_cols
    element = local.element_size()
    spec = plan.value_optimizer_spec
    sharded = {"fsdp": f", row-sharded by FSDP over {dims.slice_copies} replicas",
               "rows": f", rows split in {dims.slice_copies} blocks (this rank's: {block_rows:,})"}
    rows = [("value-table slice", local.numel() * element,
             f"{slice_rows:,} rows × {slice_cols} of {table.shape[1]} columns (mp {dims.mp}), "
             f"{str(local.dtype).removeprefix('torch.')}"
             + (sharded.get(plan.value_slice_sharding, "") if dims.slice_copies > 1 else ""))]
    state_dtype = plan.config.memory.value_state_dtype
    if spec.dense:
        rows.append(("value optimizer state", local.numel() * spec.state_bytes_per_element(state_dtype),
                     spec.state_summary))
        if plan.value_slice_sharding == "fsdp":
            rows.append(("value gradients", local.numel() * 4 + slice_elements * 6,
                         "dense: the sharded fp32 gradient, plus the whole slice gathered in bf16 and its fp32 "
                         "gradient before the reduce-scatter"))
        else:
            rows.append(("value gradients", local.numel() * spec.gradient_bytes_per_element,
                         "dense: an fp32 gradient of this rank's block"))
        return rows
    # The state the value optimizer's registry entry states, of the rows this rank updates.
    state = block_rows * spec.state_bytes_per_row + block_rows * slice_cols * spec.state_bytes_per_element(state_dtype)
    rows.append(("value optimizer state", state,
                 spec.state_summary + (" of this rank's block" if rows_sharded else "")))
    # The step's reads, kept until the update: per memory-layer call, the (index, weight) pairs and the read-out
    # gradient of this rank's columns, and their sort.
    calls = len(memory.layers) * plan.accumulation_steps
    pairs = memory.heads * memory.knn
    if rows_sharded:
        # Every data-parallel rank's tokens, other blocks' rows as -1; the sort takes this block's pairs only.
        group_tokens = tokens * dims.dp
        recorded = calls * group_tokens * (pairs * 8 + slice_cols * element)
        sort = calls * tokens * dims.mp * pairs * 24
        rows.append(("value gradients", recorded + sort,
                     f"sparse: {calls} recorded reads of the {dims.dp} data-parallel ranks' {group_tokens:,} tokens × "
                     f"{pairs} rows (this block's read, the rest -1), and the sort of this block's"))
        return rows
    per_call = tokens * dims.mp * pairs * 12 + tokens * dims.mp * slice_cols * 4
    rows.append(("value gradients", calls * per_call * dims.slice_copies * 2,
                 f"sparse: {calls} recorded reads of {tokens:,} tokens × {pairs} rows, gathered over "
                 f"{dims.slice_copies} replica(s), and their sort"))
    return rows


# Bytes kept for backward per token, by block kind, under bf16 autocast with fused attention (no S² term):
# - a dense block: the two norms' fp32 inputs and bf16 outputs, q/k/v and their rotated copies, the attention output
#   (26 bytes per model dim), and the FFN's w1, w3, silu and product outputs in bf16 (8 bytes per hidden unit);
# - a memory block: its norm (6 per dim), the query (2 per query dim), the search's selected indices, gathers and
#   softmax (40 per selected row), the bag's fp32 and bf16 read-outs and Memory+'s w1, silu and product (12 per
#   value dim); under mp, the group's gathered (index, weight) pairs (12 per selected row and group rank).
DENSE_BLOCK_BYTES_PER_DIM = 26
DENSE_BLOCK_BYTES_PER_HIDDEN = 8
MEMORY_BLOCK_BYTES_PER_DIM = 6
MEMORY_BLOCK_BYTES_PER_QUERY_DIM = 2
MEMORY_BLOCK_BYTES_PER_ROW = 40
MEMORY_BLOCK_BYTES_PER_VALUE_DIM = 12
# The output layer's bf16 logits, their fp32 copy kept by the loss, and the fp32 gradient made in backward.
LOGITS_BYTES_PER_ENTRY = 10


def _block_bytes_per_token(plan: RunPlan, block) -> float:
    args, dims = plan.model_args, plan.parallel
    if isinstance(block.feed_forward, ProductKeyMemory):
        memory = args.memory
        rows = memory.heads * memory.knn
        per = (MEMORY_BLOCK_BYTES_PER_DIM * args.dim + MEMORY_BLOCK_BYTES_PER_QUERY_DIM * memory.heads * memory.k_dim
               + MEMORY_BLOCK_BYTES_PER_ROW * rows + MEMORY_BLOCK_BYTES_PER_VALUE_DIM * memory.v_dim)
        if plan.value_slice_sharding == "rows" and dims.slice_copies > 1:
            per += 8 * rows * (dims.dp - 1)  # every data-parallel rank's pairs (int32 row, fp32 weight)
        else:
            per += 12 * rows * (dims.mp - 1)
    else:
        hidden = block.feed_forward.w1.weight.shape[0] * (dims.tp if isinstance(block.feed_forward.w1.weight,
                                                                                 DTensor) else 1)
        per = DENSE_BLOCK_BYTES_PER_HIDDEN * hidden
    attention = DENSE_BLOCK_BYTES_PER_DIM * args.dim
    # Sequence parallel splits everything over tp but the gathered inputs of the column-parallel layers.
    return (attention + per) / dims.tp + 4 * args.dim * (1 - 1 / dims.tp)


def _activation_bytes(plan: RunPlan, model: Transformer, tokens: int) -> float:
    args, config = plan.model_args, plan.config
    blocks = list(model.layers.values())
    full = [tokens * _block_bytes_per_token(plan, block) for block in blocks]
    ac = config.activation_checkpoint
    kept_input = tokens * args.dim * 4 / plan.parallel.tp  # what a checkpointed block keeps: its input
    if ac.mode == "full":
        saved = len(blocks) * kept_input + max(full)  # plus one block recomputed in backward
    elif ac.mode == "selective":
        stride = ac.selective_layer_stride
        saved = sum(kept_input if i % stride == 0 else f for i, f in enumerate(full)) + max(full)
    else:
        saved = sum(full)
    logits = tokens * args.vocab_size * LOGITS_BYTES_PER_ENTRY / plan.parallel.tp
    # The widest transient of a memory layer: both halves' scores against every sub-key, bf16 and fp32.
    search = 0.0
    if args.memory is not None:
        search = tokens * args.memory.heads * 2 * args.memory.n_keys * 6 / plan.parallel.tp
    return saved + max(logits, search)


def _activation_note(plan: RunPlan) -> str:
    ac = plan.config.activation_checkpoint
    mode = {"none": "no activation checkpointing", "full": "full activation checkpointing",
            "selective": f"every {ac.selective_layer_stride}th block checkpointed"}[ac.mode]
    training = plan.config.training
    return f"{training.local_batch_size} × {training.seq_len} tokens per micro-batch, {mode}, logits and loss"


def _buffer_bytes(plan: RunPlan, model: Transformer, tokens: int) -> float:
    dims, args = plan.parallel, plan.model_args
    if not dims.distributed:
        return 0.0
    table = model.memory_values.weight if model.memory_values is not None else None
    largest = max(sum(p.numel() for p in block.parameters()) for block in model.layers.values())  # global numel
    root = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("layers.") and p is not table)
    buffers = (2 * largest * 2 + largest * 4) / dims.tp + root * 2 / dims.tp
    if args.memory is not None and plan.value_slice_sharding == "rows" and dims.slice_copies > 1:
        # The partial read-outs of every data-parallel rank's tokens, sent and received in fp32, and their gradients.
        buffers += 4 * dims.slice_copies * tokens * args.memory.v_dim * 4
    elif args.memory is not None and dims.mp > 1:
        buffers += 2 * tokens * args.memory.v_dim * 4  # the all-to-all's send and receive read-outs
    return buffers


def _bandwidth(cluster: Cluster, ranks_spanned: int) -> float:
    return INTRA_NODE_BYTES_PER_S if ranks_spanned <= cluster.gpus_per_node else INTER_NODE_BYTES_PER_S


def step_work(plan: RunPlan, model: Transformer) -> StepWork:
    """What one GPU of `plan` computes in a training step (`model`: its parallelized meta model, `build_meta`)."""
    dims, args = plan.parallel, plan.model_args
    table = model.memory_values.weight if model.memory_values is not None else None
    tokens = plan.config.training.local_batch_size * plan.config.training.seq_len * plan.accumulation_steps
    flops = flops_per_token(args, count_parameters(model), plan.config.training.seq_len)
    dense = sum(_local(p).numel() for p in model.parameters() if p is not table and p.requires_grad)
    memory_reads = gathered = dense_values = 0.0
    if args.memory is not None:
        memory = args.memory
        # Under mp each rank bags the whole group's tokens on its 1/mp of the columns: as many reads as alone.
        memory_reads = tokens * len(memory.layers) * memory.heads * memory.knn * memory.v_dim / dims.tp
        gathered, dense_values = value_update_work(plan.value_slice_sharding, plan.value_optimizer,
                                                   value_table_work(plan.config, memory, dims))
    # Activation checkpointing runs the forward of its blocks again in backward: a third more of their work.
    checkpointing = plan.config.activation_checkpoint
    extra = {"full": 1.0, "selective": 1 / checkpointing.selective_layer_stride}.get(checkpointing.mode, 0.0)
    recompute = 1 + extra / 3
    return StepWork(matmul_flops=recompute * flops * tokens / dims.tp,
                    activation_elements=recompute * tokens * args.n_layers * args.dim / dims.tp,
                    memory_reads=recompute * memory_reads, dense_parameters=dense, row_update_bytes=gathered,
                    dense_value_elements=dense_values)


def step_time(plan: RunPlan, model: Transformer, cluster: Cluster, tokens: int,
               rates: StepRates = MEASURED) -> tuple[float, float]:
    """(estimated step seconds, of which communication on the critical path), by the model in the module doc."""
    dims, args = plan.parallel, plan.model_args
    table = model.memory_values.weight if model.memory_values is not None else None
    compute = rates.compute_seconds(step_work(plan, model))
    dense = sum(p.numel() for p in model.parameters() if p is not table) / dims.tp
    # FSDP over dp_shard (consecutive ranks after tp), and HSDP's all-reduce over the replicas: hidden by compute.
    shard_span = dims.dp_shard * dims.tp
    fsdp = plan.accumulation_steps * ring(8 * dense, dims.dp_shard, _bandwidth(cluster, shard_span))
    if dims.dp_replicate > 1:
        fsdp += ring(2 * 4 * dense / dims.dp_shard, dims.dp_replicate, INTER_NODE_BYTES_PER_S
                      if dims.world_size > cluster.gpus_per_node else INTRA_NODE_BYTES_PER_S)
    # TP: per block, forward and backward, two all-gathers and two reduce-scatters of the residual stream.
    critical = plan.accumulation_steps * len(model.layers) * ring(8 * tokens * args.dim * 2, dims.tp,
                                                                   _bandwidth(cluster, dims.tp))
    if args.memory is not None:
        # The value table's exchanges (mp, the slice's replicas or the grid), by its layout.
        critical += value_exchange_seconds(
            plan.value_slice_sharding, plan.value_optimizer, value_table_work(plan.config, args.memory, dims),
            _bandwidth(cluster, dims.mp * dims.tp), _bandwidth(cluster, dims.world_size))
    return compute + critical + max(0.0, fsdp - compute), critical


def estimate_config(config: JobConfig, cluster: Cluster) -> Estimate:
    """Plan and estimate `config` on `cluster` (a config error if the plan does not resolve)."""
    plan = resolve_for(config, cluster.world, cluster.gpus_per_node)
    with fake_world(cluster.world) if cluster.world > 1 else contextlib.nullcontext():
        model = build_meta(plan)
        return estimate(plan, model, cluster)


def candidate_meshes(config: JobConfig, cluster: Cluster) -> list[dict]:
    """The (dp_replicate, dp_shard, tp, mp) meshes to try: tp and each mp group inside a node."""
    world, node = cluster.world, cluster.gpus_per_node
    meshes = []
    for tp in _divisors(node):
        for replicate in _divisors(world // tp):
            shard = world // (tp * replicate)
            for mp in _divisors(shard):
                if mp * tp <= node and (config.memory.enabled or mp == 1):
                    meshes.append({"dp_replicate": replicate, "dp_shard": shard, "tp": tp, "mp": mp})
    return meshes


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def rank_plans(config: JobConfig, cluster: Cluster) -> tuple[list[Estimate], list[Estimate]]:
    """(the plans that fit, fastest first; those that do not), over `candidate_meshes`."""
    fitting, failing = [], []
    for mesh in candidate_meshes(config, cluster):
        try:
            found = estimate_config(planned_config(config, **mesh), cluster)
        except ConfigError:
            continue  # the mesh does not divide the model's shapes
        (fitting if found.fits(cluster) else failing).append(found)
    fitting.sort(key=lambda e: (-e.tokens_per_gpu_second, e.total))
    failing.sort(key=lambda e: e.total)
    return fitting, failing


def paper_layout(config: JobConfig) -> JobConfig:
    """`config` as the paper trains its memory: an fp32 table, each GPU one whole column slice of it (no sharding of
    the slice), a dense value gradient and dense AdamW."""
    memory = dataclasses.replace(config.memory, value_optimizer="adamw")
    if hasattr(config.memory, "value_dtype"):
        memory = dataclasses.replace(memory, value_dtype="fp32")
    return dataclasses.replace(planned_config(config, value_slice_sharding="replicate"), memory=memory)


def paper_layout_gpus(config: JobConfig, cluster: Cluster, max_nodes: int = 64) -> Estimate | None:
    """The smallest world (whole nodes of `cluster`'s kind) on which the paper's layout fits, with the table's
    columns split over every GPU (the most it can be split); None if none up to `max_nodes` nodes."""
    paper = paper_layout(config)
    v_dim = resolve_for(planned_config(paper, mp=1, dp_shard=-1, tp=1, dp_replicate=1), 1).model_args.memory.v_dim
    nodes = 1
    while nodes <= max_nodes:
        world = nodes * cluster.gpus_per_node
        if v_dim % world == 0:
            candidate = Cluster(nodes, cluster.gpus_per_node, cluster.gb_per_gpu)
            try:
                found = estimate_config(planned_config(paper, mp=world, dp_shard=world, tp=1, dp_replicate=1),
                                        candidate)
            except ConfigError:
                found = None
            if found is not None and found.fits(candidate):
                return found
        nodes *= 2
    return None

