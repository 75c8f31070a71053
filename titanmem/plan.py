"""The run plan: every choice a run makes, resolved once from (config, purpose, world size, device), and checked.

`resolve_plan` turns each `auto` and -1 of the config into its value on this machine (the parallel degrees, the
model's shape with its memory settings and lookup kernel, the value optimizer and its lr, the value-table layout, the
precision, the AdamW kernel, the batch and schedule lengths, the data source) and runs every pre-flight check on the
result. Nothing is built: a bad setting fails here in seconds, with the field named, before a tokenizer, a process
group or a model exists. Everything downstream (the build path, the trainer, eval, generate) reads the plan and never
resolves a setting again. `--print_config` shows what was resolved (`RunPlan.resolved`).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from titanmem.components.checkpoint import (checkpoint_folder, complete_checkpoint_steps, continues_rollback,
                                            saved_step)
from titanmem.components.export import is_export
from titanmem.components.hf_checkpoint import check_hf_config, is_hf_folder
from titanmem.components.read_counts import load_read_counts
from titanmem.config.errors import ConfigError
from titanmem.config.manager import build_config, check_choices, format_config, format_help, resolve_asset_path
from titanmem.config.sections import JobConfig
from titanmem.data.files import DataSource, resolve_data_source
from titanmem.distributed.parallel_dims import ParallelDims
from titanmem.distributed.value_layout_cost import (INTER_NODE_BYTES_PER_S, INTRA_NODE_BYTES_PER_S, ValueTableWork,
                                                    cheapest_layout)
from titanmem.models.args import MemoryArgs, ModelArgs
from titanmem.models.flavors import FLAVORS, MEMORY_PLACEMENT
from titanmem.models.key_search import available_key_searches
from titanmem.models.lookup import available_lookups
from titanmem.registry import KEY_SEARCHES, LOOKUPS, VALUE_OPTIMIZERS, ValueOptimizer
from titanmem.utils import print_error, print_output

# train: data, a fresh start or a resume. eval, generate, export: read a run's checkpoint. dry_run: the model alone,
# built to be inspected (`python -m titanmem.check_init`), with neither data nor checkpoint.
Purpose = Literal["train", "eval", "generate", "export", "dry_run"]

# `model.vocab_size = -1` rounds the tokenizer's size up to this, which keeps the output GEMM tensor-core aligned.
VOCAB_MULTIPLE = 64


@dataclass(frozen=True)
class RunPlan:
    config: JobConfig
    """The configuration as given; the plan never changes it."""
    purpose: Purpose
    world_size: int
    device_type: str
    """`cuda` or `cpu`; each process takes the GPU of its LOCAL_RANK."""
    parallel: ParallelDims
    model_args: ModelArgs
    """The model's shape: vocabulary, context and memory (with its lookup kernel) resolved."""
    autocast_dtype: torch.dtype | None
    """bf16 autocast, or None for plain fp32."""
    value_optimizer: str | None
    """What trains the value table (an entry of `titanmem.registry.VALUE_OPTIMIZERS`); None without memory
    layers."""
    value_lr: float | None
    value_slice_sharding: str | None
    """`replicate`, `fsdp` or `rows` (how the ranks that hold the same slice of the table keep it); None without
    memory."""
    optimizer_implementation: str
    """AdamW's kernel: fused, foreach or for-loop."""
    global_batch_size: int
    accumulation_steps: int
    lr_decay_steps: int
    data_source: DataSource | None
    """The training data (train only)."""
    checkpoint_folder: Path
    """Where the run's `step-N` checkpoints live (`resolve_checkpoint_folder`)."""
    checkpoint_to_load: Path | None
    """The complete checkpoint this run resumes from (train) or reads (eval, generate, export: a `step-N` folder or
    an exported one); None for a fresh start."""
    initial_load: Path | None
    """Training only: `checkpoint.initial_load_path`, when the run has no checkpoint of its own to resume from."""

    @property
    def value_optimizer_spec(self) -> ValueOptimizer | None:
        """The value optimizer's registry entry: its capabilities and state sizes."""
        return VALUE_OPTIMIZERS.get(self.value_optimizer) if self.value_optimizer is not None else None

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.config.training.seq_len

    def build_mesh(self, device_type: str) -> None:
        """This process's device mesh for the plan (with the value grid of a rows-sharded table)."""
        self.parallel.build_mesh(device_type, value_grid=self.value_slice_sharding == "rows")

    @property
    def device(self) -> torch.device:
        if self.device_type == "cuda":
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")

    def resolved(self) -> dict[str, object]:
        """What each `auto` and -1 of the config became, by `section.key`."""
        c, m, p = self.config, self.model_args, self.parallel
        values: dict[str, object] = {
            "training.device": self.device_type,
            "training.mixed_precision": "bf16" if self.autocast_dtype == torch.bfloat16 else "fp32",
            "training.global_batch_size": self.global_batch_size,
            "parallelism.dp_shard": p.dp_shard,
            "model.vocab_size": m.vocab_size,
            "optimizer.implementation": self.optimizer_implementation,
            "lr_scheduler.decay_steps": self.lr_decay_steps,
        }
        if self.data_source is not None:
            values["data.format"] = self.data_source.builder
        if self.checkpoint_to_load is not None and not _weights_only(self.checkpoint_to_load):
            values["checkpoint.load_step"] = saved_step(self.checkpoint_to_load)
        if m.memory is not None:
            values.update({
                "memory.layers": list(m.memory.layers), "memory.n_keys": m.memory.n_keys,
                "memory.k_dim": m.memory.k_dim,
                "memory.v_dim": m.memory.v_dim, "memory.lookup": m.memory.lookup,
                "memory.key_search": m.memory.key_search,
                "memory.value_optimizer": self.value_optimizer, "memory.value_lr": self.value_lr,
                "parallelism.value_slice_sharding": self.value_slice_sharding,
            })
        return {key: value for key, value in values.items() if _as_set(c, key) != value}


def _as_set(config: JobConfig, key: str) -> object:
    section, name = key.split(".")
    return getattr(getattr(config, section), name)


def world_size_from_env() -> int:
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        world_size = int(text)
    except ValueError:
        world_size = 0
    if world_size < 1:
        raise ConfigError("WORLD_SIZE", f"the environment's WORLD_SIZE must be a positive integer, got {text!r}; "
                          "launch with torchrun (or run_train.sh), which sets it")
    return world_size


def resolve_device_type(choice: str) -> str:
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return "cpu"
    if not torch.cuda.is_available():
        raise ConfigError("training.device", "is 'cuda' but no GPU is visible; use 'auto' or 'cpu'")
    return "cuda"


def resolve_memory_args(config: JobConfig, device_type: str) -> MemoryArgs | None:
    """The flavor's memory placement with the `[memory]` section's settings over it, checked."""
    memory = config.memory
    if not memory.enabled:
        return None
    flavor = config.model.flavor
    args, placement = FLAVORS[flavor], MEMORY_PLACEMENT[flavor]
    # `auto`: the registry's preference for this device among the implementations that import here.
    lookup = LOOKUPS.resolve(memory.lookup, device_type, lambda entry: entry.name in available_lookups())
    key_search = KEY_SEARCHES.resolve(memory.key_search, device_type,
                                      lambda entry: entry.name in available_key_searches())
    resolved = MemoryArgs(
        layers=tuple(memory.layers) or placement.layers,
        n_keys=memory.n_keys if memory.n_keys != -1 else placement.n_keys,
        k_dim=memory.k_dim if memory.k_dim != -1 else args.dim // 2,
        v_dim=memory.v_dim if memory.v_dim != -1 else args.dim,
        heads=memory.heads, knn=memory.knn, swilu=memory.swilu, qk_norm=memory.qk_norm, gated=memory.gated,
        lookup=lookup, key_search=key_search, value_dtype=memory.value_dtype,
    )
    if not all(0 <= layer < args.n_layers for layer in resolved.layers):
        raise ConfigError("memory.layers", f"must lie in [0, {args.n_layers}) for flavor {flavor}, got "
                          f"{list(resolved.layers)}")
    if len(set(resolved.layers)) != len(resolved.layers):
        raise ConfigError("memory.layers", f"lists a block twice: {list(resolved.layers)}")
    if resolved.k_dim % 2:
        raise ConfigError("memory.k_dim", f"must be even (the query is split in two halves), got {resolved.k_dim}")
    if resolved.knn > resolved.n_keys:
        raise ConfigError("memory.knn", f"must be at most n_keys ({resolved.n_keys}), got {resolved.knn}")
    for field, choice, available in (("lookup", memory.lookup, available_lookups),
                                     ("key_search", memory.key_search, available_key_searches)):
        if choice != "auto" and choice not in available():
            raise ConfigError(f"memory.{field}", f"{choice!r} is not available in this build; available: "
                              f"{available()}")
    search = KEY_SEARCHES.get(key_search)
    if (search.max_keys is not None and resolved.n_keys > search.max_keys) or (
            search.max_knn is not None and resolved.knn > search.max_knn):
        raise ConfigError("memory.key_search", f"{key_search!r} handles n_keys up to {search.max_keys} and knn up to "
                          f"{search.max_knn}, got n_keys {resolved.n_keys} and knn {resolved.knn}; use 'torch'")
    return resolved


def resolve_value_optimizer(config: JobConfig, device_type: str) -> tuple[str, float]:
    """The value table's optimizer (`auto`: the registry's preference for the device, fused row-wise Adagrad on GPUs
    and dense AdamW on CPU, where Triton would only run interpreted) and its peak lr (-1: its entry's multiple of the
    dense lr)."""
    memory = config.memory
    triton = "triton" in available_lookups()
    kind = VALUE_OPTIMIZERS.resolve(memory.value_optimizer, device_type,
                                    lambda entry: triton or not entry.needs_triton)
    spec = VALUE_OPTIMIZERS.get(kind)
    dense = [entry.name for entry in VALUE_OPTIMIZERS.entries if entry.name != "auto" and entry.dense]
    rowwise = _rowwise_names()
    if spec.needs_triton and not triton:
        raise ConfigError("memory.value_optimizer", f"{kind!r} runs fused Triton kernels, and Triton is not "
                          f"importable here; use {' or '.join(map(repr, dense))}")
    if memory.value_dtype == "bf16" and spec.dense:
        raise ConfigError("memory.value_dtype", f"'bf16' needs a row-wise value_optimizer ({rowwise}): "
                          f"a dense {kind} would round away every update smaller than a bf16 step; use value_dtype "
                          f"'fp32' with {kind}")
    if memory.value_dtype == "bf16" and memory.value_rounding == "stochastic" and not spec.triton_update:
        raise ConfigError("memory.value_rounding", f"'stochastic' draws its bits in the fused Triton update, which "
                          f"has no branch for value_optimizer {kind!r}; use 'nearest', or value_dtype 'fp32'")
    if memory.value_lr != -1:
        return kind, memory.value_lr
    if spec.lr_scale is None:
        raise ConfigError("memory.value_lr", f"has no default for value_optimizer {kind!r}; set it explicitly")
    return kind, spec.lr_scale * config.optimizer.lr


def _rowwise_names() -> str:
    """The row-wise value optimizers, in words ("adagrad, adam or sgd")."""
    names = sorted(entry.name for entry in VALUE_OPTIMIZERS.entries if entry.rowwise)
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else "".join(names)


def resolve_parallel(config: JobConfig, world_size: int, memory: MemoryArgs | None, value_optimizer: str | None,
                     gpus_per_node: int | None = None) -> tuple[ParallelDims, str | None]:
    """The parallel degrees, checked against the world size and the model's shapes, and the value-table layout
    (`auto`: the cheapest the value optimizer allows by `titanmem.distributed.value_layout_cost`, on nodes of
    `gpus_per_node` GPUs, default the launcher's LOCAL_WORLD_SIZE). With one copy of each slice the layouts
    coincide: `rows` is then `replicate`."""
    p = config.parallelism
    dims = ParallelDims.resolve(p.dp_replicate, p.dp_shard, p.tp, p.mp, world_size)
    args = FLAVORS[config.model.flavor]
    dims.check_model(args.n_heads, args.kv_heads, args.ffn_hidden_dim, memory)
    if dims.tp_enabled and config.training.seq_len % dims.tp:
        raise ConfigError("training.seq_len", f"({config.training.seq_len}) must be divisible by parallelism.tp = "
                          f"{dims.tp}: sequence parallel splits each sequence over the tensor-parallel ranks")
    if memory is None:
        return dims, None
    sharding = p.value_slice_sharding
    if sharding == "auto":
        sharding = cheapest_layout(value_optimizer, value_table_work(config, memory, dims),
                                   *_value_bandwidths(dims, gpus_per_node))
    if dims.distributed and VALUE_OPTIMIZERS.get(value_optimizer).rowwise and sharding == "fsdp":
        raise ConfigError(
            "parallelism.value_slice_sharding",
            f"'fsdp' row-shards the value table, but value_optimizer {value_optimizer!r} updates whole slices in "
            "place; use 'rows' or 'replicate' (or 'auto'), or memory.value_optimizer = 'adamw'",
        )
    if sharding == "rows":
        if dims.slice_copies == 1:
            return dims, "replicate"
        block = -(-memory.n_values // dims.slice_copies)
        if block * (dims.slice_copies - 1) >= memory.n_values:
            raise ConfigError("parallelism.value_slice_sharding", f"'rows' splits the {memory.n_values:,} value rows "
                              f"into {dims.slice_copies} blocks of {block}, which leaves a rank none; raise "
                              "memory.n_keys, or use 'replicate'")
    return dims, sharding


def value_table_work(config: JobConfig, memory: MemoryArgs, dims: ParallelDims) -> ValueTableWork:
    """The sizes the value table's layouts are costed by (`titanmem.distributed.value_layout_cost`)."""
    training = config.training
    unit = training.local_batch_size * dims.dp
    accumulation = max(training.global_batch_size // unit, 1) if training.global_batch_size != -1 else 1
    return ValueTableWork(
        n_values=memory.n_values, v_dim=memory.v_dim, element_bytes=2 if memory.value_dtype == "bf16" else 4,
        pairs=memory.heads * memory.knn, tokens=training.local_batch_size * training.seq_len,
        calls=len(memory.layers) * accumulation, mp=dims.mp, copies=dims.slice_copies)


def _value_bandwidths(dims: ParallelDims, gpus_per_node: int | None) -> tuple[float, float]:
    """(the mp group's link, the slice replicas' link): an mp group lies inside a node; the replicas span nodes when
    the world does."""
    node = gpus_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", dims.world_size) or dims.world_size)
    replicas = INTER_NODE_BYTES_PER_S if dims.world_size > node else INTRA_NODE_BYTES_PER_S
    return INTRA_NODE_BYTES_PER_S, replicas


def _check_finetune(config: JobConfig, memory: MemoryArgs | None, value_optimizer: str | None) -> None:
    """A finetuning mode other than `full` needs a memory to train, and `sparse_memory` a row-wise value optimizer
    and read counts of this model's table."""
    finetune = config.finetune
    if finetune.mode == "full":
        return
    if memory is None:
        raise ConfigError("finetune.mode", f"{finetune.mode!r} trains the memory value table, and this model has "
                          "none; set memory.enabled = true, or finetune.mode = 'full'")
    if finetune.mode != "sparse_memory":
        return
    if not VALUE_OPTIMIZERS.get(value_optimizer).rowwise:
        raise ConfigError("memory.value_optimizer", "finetune.mode 'sparse_memory' updates its selected rows inside "
                          f"the fused row-wise value optimizers; set it to {_rowwise_names()}")
    counts = [("background_counts", "the background read counts that rank the rows")]
    if finetune.selection == "per_dataset":
        counts.append(("dataset_counts", "the read counts of the finetuning data that fix the rows"))
    for name, what in counts:
        path = getattr(finetune, name)
        if not path:
            raise ConfigError(f"finetune.{name}", f"is empty; sparse_memory needs {what}: make them with "
                              "python -m titanmem.count_memory_reads")
        load_read_counts(path, f"finetune.{name}", memory.n_values)


def resolve_checkpoint_folder(config: JobConfig, purpose: Purpose) -> Path:
    """The folder of the run's `step-N` checkpoints: `checkpoint.folder` inside `job.dump_folder`. Training must keep
    it inside, where the run's lock covers it: a folder elsewhere could be shared by two runs unnoticed (readers take
    no lock, and read it where it is)."""
    name = Path(config.checkpoint.folder)
    if purpose == "train" and (name.is_absolute() or ".." in name.parts or not name.parts):
        raise ConfigError("checkpoint.folder", f"{config.checkpoint.folder!r} must be a folder name inside "
                          "job.dump_folder (relative, without '..'); to train elsewhere, move job.dump_folder")
    return checkpoint_folder(config.checkpoint, config.job.dump_folder)


def resolve_checkpoint(config: JobConfig, purpose: Purpose) -> Path | None:
    """The checkpoint to start from: `generate.checkpoint` (generate), else `checkpoint.load_step`'s, else the newest
    complete one in the run's folder; None when training starts fresh. Readers of a run need one. Training that
    already went back to `load_step` in an earlier launch of the same command goes on from that timeline's newest
    checkpoint instead of going back again (`continues_rollback`)."""
    checkpoint = config.checkpoint
    if purpose == "generate" and config.generate.checkpoint:
        return _readable(config.generate.checkpoint, "generate.checkpoint")
    if purpose in ("eval", "generate", "export") and checkpoint.initial_load_path:
        return _readable(checkpoint.initial_load_path, "checkpoint.initial_load_path")
    if purpose == "dry_run" or (purpose == "train" and not checkpoint.enable):
        return None
    folder = resolve_checkpoint_folder(config, purpose)
    steps = complete_checkpoint_steps(folder)
    if checkpoint.load_step != -1:
        if purpose == "train" and (newest := continues_rollback(folder, steps, checkpoint.load_step)) is not None:
            return folder / f"step-{newest}"
        if checkpoint.load_step not in steps:
            raise ConfigError("checkpoint.load_step", f"no complete checkpoint step-{checkpoint.load_step} in "
                              f"{folder}; complete steps: {steps or 'none'}")
        return folder / f"step-{checkpoint.load_step}"
    if steps:
        return folder / f"step-{steps[-1]}"
    if purpose != "train":
        field = "generate.checkpoint" if purpose == "generate" else "checkpoint.folder"
        raise ConfigError(field, f"no complete checkpoint in {folder} to read; train first, or point "
                          f"job.dump_folder (or {field}) at one")
    damaged = sorted(p.name for p in folder.glob("step-*.damaged*")) if folder.is_dir() else []
    if damaged:
        # A relaunch after every checkpoint was found damaged must not quietly start the run again from step 0.
        raise ConfigError("checkpoint.folder", f"{folder} holds only damaged checkpoints ({', '.join(damaged[:3])}); "
                          "restore one as step-N, or remove them to start this run afresh")
    return None


def _readable(path: str, field: str) -> Path:
    """A folder that weights can be read from: a complete `step-N` checkpoint, an exported folder or a Hugging Face
    Llama folder."""
    if not ((Path(path) / ".metadata").is_file() or _weights_only(path)):
        raise ConfigError(field, f"{path} is neither a complete checkpoint (no .metadata file), nor an exported folder "
                          "(no model.safetensors.index.json), nor a Hugging Face model folder (no config.json with a "
                          "model_type)")
    return Path(path)


def _weights_only(path: str | Path) -> bool:
    """A folder of weights alone (titanmem's export or a Hugging Face model), not a training checkpoint."""
    return is_hf_folder(path) or is_export(path)


def _inside(path: str, folder: str) -> bool:
    resolved, outer = Path(path).resolve(), Path(folder).resolve()
    return resolved == outer or outer in resolved.parents


def _check_dump_folder(config: JobConfig) -> None:
    """Training writes under job.dump_folder: each existing part of the path must be a folder."""
    path = Path(config.job.dump_folder)
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                raise ConfigError("job.dump_folder", f"{config.job.dump_folder} cannot be a folder: {part} is a file")
            return


def _device_bytes(device_type: str) -> int | None:
    """The memory of one device (a GPU, or the host for CPU runs), or None when it cannot be told here."""
    if device_type == "cuda":
        return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def value_table_bytes(memory: MemoryArgs, dims: ParallelDims, value_optimizer: str, state_dtype: str,
                      sharding: str) -> float:
    """Bytes of the value table's slice on one rank with what trains it, as its value optimizer's registry entry
    states them: the weights, a dense gradient, state per element (moments in `state_dtype` for a row-wise
    optimizer) and per row. The planner itemizes the same amounts (`titanmem.planner`)."""
    spec = VALUE_OPTIMIZERS.get(value_optimizer)
    elements = memory.n_values * (memory.v_dim // dims.mp)
    weight = 2 if memory.value_dtype == "bf16" else 4
    per_element = weight + spec.gradient_bytes_per_element + spec.state_bytes_per_element(state_dtype)
    needed = elements * per_element + memory.n_values * spec.state_bytes_per_row
    if sharding == "rows" or (spec.dense and sharding == "fsdp"):
        needed /= dims.slice_copies
    return needed


def _check_value_table_fits(memory: MemoryArgs, dims: ParallelDims, value_optimizer: str, state_dtype: str,
                            sharding: str, device_type: str) -> None:
    """The value table's slice on one rank, with what trains it, must fit the device: refused here rather than by an
    allocation after minutes of start-up."""
    available = _device_bytes(device_type)
    if available is None:
        return
    needed = value_table_bytes(memory, dims, value_optimizer, state_dtype, sharding)
    if needed > available:
        raise ConfigError("memory.n_keys", f"the value table ({memory.n_keys}² = {memory.n_values:,} rows × "
                          f"{memory.v_dim}) needs {needed / 1e9:,.1f} GB per rank with value_optimizer "
                          f"{value_optimizer!r} and mp = {dims.mp}, more than this {device_type} device's "
                          f"{available / 1e9:,.1f} GB; lower memory.n_keys, or raise parallelism.mp"
                          + ("" if sharding == "rows" else ", or split its rows over the data-parallel ranks with "
                             "parallelism.value_slice_sharding = 'rows'"))


def _check_files(config: JobConfig, purpose: Purpose, world_size: int) -> None:
    data = config.data
    if purpose == "train" and data.facts_fraction > 0 and not resolve_asset_path(data.facts_path).is_file():
        raise ConfigError("data.facts_path", f"no such file: {data.facts_path} (needed by data.facts_fraction > 0)")
    evaluates = purpose == "eval" or (purpose == "train" and config.eval.interval)
    if evaluates and not resolve_asset_path(config.eval.perplexity_path).is_file():
        raise ConfigError("eval.perplexity_path", f"no such file: {config.eval.perplexity_path}; point it at held-out "
                          "text" + (", or set eval.interval = 0" if purpose == "train" else ""))
    if purpose == "generate" and not config.generate.prompts:
        raise ConfigError("generate.prompts",
                          "is empty; pass e.g. --generate.prompts '[\"The capital of France is\"]'")
    if purpose in ("generate", "export") and world_size != 1:
        raise ConfigError("WORLD_SIZE", f"{purpose} runs on one process, got {world_size}; run it without torchrun")
    if purpose == "export":
        folder = config.export.folder
        if not folder:
            raise ConfigError("export.folder", "is empty; name a new or empty folder to export to")
        if _inside(folder, config.job.dump_folder):
            raise ConfigError("export.folder", f"{folder} lies inside the run's folder {config.job.dump_folder}, "
                              "which reading a run never writes to; choose one outside it")
        if Path(folder).exists() and (not Path(folder).is_dir() or any(Path(folder).iterdir())):
            raise ConfigError("export.folder", f"{folder} exists and is not an empty folder; choose a new one")
    if purpose == "eval":
        results = config.eval.results_folder
        if config.eval.dump_memory and not results:
            raise ConfigError("eval.dump_memory", "needs eval.results_folder, a folder outside the run to write to")
        if results and _inside(results, config.job.dump_folder):
            raise ConfigError("eval.results_folder", f"{results} lies inside the run's folder "
                              f"{config.job.dump_folder}, which reading a run never writes to; choose one outside it")
    if config.tokenizer.path:
        if not resolve_asset_path(config.tokenizer.path).is_file():
            raise ConfigError("tokenizer.path", f"no such file: {config.tokenizer.path}")
    elif not config.tokenizer.name:
        raise ConfigError("tokenizer", "set tokenizer.path to a .tiktoken file or tokenizer.name to a named encoding")


def _tokenizer_vocab_size(config: JobConfig) -> int:
    from titanmem.data.tokenizer import build_tokenizer

    return build_tokenizer(config.tokenizer).vocab_size


def resolve_plan(config: JobConfig, purpose: Purpose = "train", world_size: int | None = None,
                 device_type: str | None = None, tokenizer_vocab_size: int | None = None,
                 gpus_per_node: int | None = None) -> RunPlan:
    """Resolve and check everything; raises ConfigError naming the field. `world_size` defaults to the
    environment's WORLD_SIZE, `device_type` to `training.device` on this machine, `gpus_per_node` to the launcher's
    LOCAL_WORLD_SIZE, and the tokenizer's size is read from its file unless given."""
    world_size = world_size_from_env() if world_size is None else world_size
    check_choices(config)
    flavor = config.model.flavor
    if flavor not in FLAVORS:
        close = difflib.get_close_matches(flavor, list(FLAVORS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; valid flavors: {', '.join(FLAVORS)}"
        raise ConfigError("model.flavor", f"unknown flavor {flavor!r}{hint}")
    device_type = device_type or resolve_device_type(config.training.device)
    memory = resolve_memory_args(config, device_type)
    value_optimizer, value_lr = resolve_value_optimizer(config, device_type) if memory else (None, None)
    dims, sharding = resolve_parallel(config, world_size, memory, value_optimizer, gpus_per_node)

    training = config.training
    unit = training.local_batch_size * dims.dp
    global_batch = training.global_batch_size if training.global_batch_size != -1 else unit
    if global_batch % unit:
        raise ConfigError("training.global_batch_size", f"({global_batch}) must be a multiple of local_batch_size × "
                          f"data-parallel degree = {training.local_batch_size} × {dims.dp} = {unit}")
    schedule = config.lr_scheduler
    decay_steps = schedule.decay_steps if schedule.decay_steps != -1 else max(training.steps - schedule.warmup_steps, 1)
    implementation = config.optimizer.implementation
    if implementation == "auto":
        implementation = "fused" if device_type == "cuda" else "foreach"
    precision = training.mixed_precision
    autocast_dtype = torch.bfloat16 if precision == "bf16" or (precision == "auto" and device_type == "cuda") else None

    # The export streams the table a block of rows at a time: it never holds it, whatever its size.
    if memory is not None and purpose not in ("dry_run", "export"):
        _check_value_table_fits(memory, dims, value_optimizer, config.memory.value_state_dtype, sharding,
                                device_type)
    if purpose == "train":
        _check_dump_folder(config)
    folder = resolve_checkpoint_folder(config, purpose)
    if purpose == "train":
        _check_finetune(config, memory, value_optimizer)
    _check_files(config, purpose, world_size)
    checkpoint_to_load = resolve_checkpoint(config, purpose)
    initial_load = None
    if purpose == "train" and checkpoint_to_load is None and config.checkpoint.initial_load_path:
        initial_load = _readable(config.checkpoint.initial_load_path, "checkpoint.initial_load_path")
        if _weights_only(initial_load) and not config.checkpoint.initial_load_model_only:
            raise ConfigError("checkpoint.initial_load_model_only", f"{initial_load} is an exported folder, which "
                              "holds weights only; set it to true, or point initial_load_path at a step-N folder")
    data_source = resolve_data_source(config.data) if purpose == "train" else None

    vocab = tokenizer_vocab_size if tokenizer_vocab_size is not None else _tokenizer_vocab_size(config)
    if config.model.vocab_size == -1:
        vocab_size = -(-vocab // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    elif config.model.vocab_size < vocab:
        raise ConfigError("model.vocab_size", f"must be at least the tokenizer's size {vocab}, got "
                          f"{config.model.vocab_size}")
    else:
        vocab_size = config.model.vocab_size
    model_args = dataclasses.replace(FLAVORS[flavor], vocab_size=vocab_size, memory=memory,
                                     max_seq_len=max(FLAVORS[flavor].max_seq_len, training.seq_len))
    # A Hugging Face model of another shape is told now, in one line, rather than after the model is built.
    weights = initial_load or (checkpoint_to_load if config.checkpoint.initial_load_path else None)
    if weights is not None and is_hf_folder(weights):
        check_hf_config(weights, model_args)
    return RunPlan(
        config=config, purpose=purpose, world_size=world_size, device_type=device_type, parallel=dims,
        model_args=model_args, autocast_dtype=autocast_dtype, value_optimizer=value_optimizer, value_lr=value_lr,
        value_slice_sharding=sharding, optimizer_implementation=implementation, global_batch_size=global_batch,
        accumulation_steps=global_batch // unit, lr_decay_steps=decay_steps, data_source=data_source,
        checkpoint_folder=folder, checkpoint_to_load=checkpoint_to_load, initial_load=initial_load,
    )


def format_resolved(plan: RunPlan) -> str:
    """The resolved settings as TOML comments, to follow the printed config."""
    lines = [f"# Resolved on this machine (world size {plan.world_size}, {plan.device_type}):"]
    for key, value in plan.resolved().items():
        lines.append(f"#   {key} = {format(value, '.6g') if isinstance(value, float) else repr(value)}")
    return "\n".join(lines) + "\n"


def plan_from_command_line(argv: list[str] | None, purpose: Purpose, usage: str) -> tuple[JobConfig, RunPlan] | int:
    """The shared start of every entry point: the config and its plan, or the exit code after `--help` (headed by
    `usage`, the entry point's own command line), `--print_config` (the config as TOML, then what `auto` resolved to
    here) or a config error (one line, code 2)."""
    try:
        config, command_line = build_config(argv)
        if command_line.help:
            print_output(format_help(usage))
            return 0
        plan = resolve_plan(config, purpose)
    except ConfigError as e:
        print_error(e)
        return 2
    if command_line.print_config:
        print_output(format_config(config) + format_resolved(plan))
        return 0
    return config, plan
