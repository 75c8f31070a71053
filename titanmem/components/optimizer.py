"""AdamW over parameter groups: matrices and embeddings decay, norms and biases do not (by default), and the memory
value table has a group of its own with its own lr and weight decay."""

from __future__ import annotations

import torch
from torch import nn

from titanmem.components.value_optimizer import RowWiseValueOptimizer
from titanmem.config.sections import JobConfig
from titanmem.config.sections import Memory as MemoryConfig
from titanmem.config.sections import Optimizer as OptimizerConfig


def is_norm_or_bias(name: str, param: nn.Parameter) -> bool:
    """1-D parameters are the norm gains and biases; decaying them towards 0 only fights their role."""
    return param.ndim < 2 or name.endswith(".bias")


def memory_value_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The shared value table, if the model has memory layers."""
    values = getattr(model, "memory_values", None)
    return list(values.parameters()) if values is not None else []


VALUE_LR_SCALE = {"adamw": 10.0, "adam": 10.0, "adagrad": 50.0}


def resolve_value_optimizer(memory: MemoryConfig, device_type: str) -> str:
    """`auto`: the fused row-wise Adagrad on GPUs; dense AdamW on CPU, where Triton would only run interpreted."""
    if memory.value_optimizer != "auto":
        return memory.value_optimizer
    from titanmem.models.lookup import available_lookups

    return "adagrad" if device_type == "cuda" and "triton" in available_lookups() else "adamw"


def resolve_value_slice_sharding(parallelism, kind: str) -> str:
    """`auto`: a row-wise optimizer updates whole slices in place, so `replicate`; dense AdamW, `fsdp`."""
    if parallelism.value_slice_sharding != "auto":
        return parallelism.value_slice_sharding
    return "fsdp" if kind == "adamw" else "replicate"


def resolve_value_lr(memory: MemoryConfig, optimizer: OptimizerConfig, kind: str) -> float:
    """The value table's peak lr: as set, or scaled from the dense lr for the chosen optimizer."""
    if memory.value_lr != -1:
        return memory.value_lr
    return VALUE_LR_SCALE[kind] * optimizer.lr


def build_param_groups(
    model: nn.Module, config: OptimizerConfig, memory: MemoryConfig | None = None, value_lr: float | None = None
) -> list[dict]:
    value_ids = {id(p) for p in memory_value_parameters(model)}
    decay, no_decay, values = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in value_ids:
            values.append(param)
        elif is_norm_or_bias(name, param) and not config.decay_norms_and_biases:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"name": "decay", "params": decay, "weight_decay": config.weight_decay}]
    if no_decay:
        groups.append({"name": "no_decay", "params": no_decay, "weight_decay": 0.0})
    if values:
        memory = memory or MemoryConfig()
        lr = value_lr if value_lr is not None else resolve_value_lr(memory, config, "adamw")
        groups.append({"name": "memory_values", "params": values, "lr": lr, "weight_decay": memory.value_weight_decay})
    return groups


def build_optimizer(
    model: nn.Module, config: OptimizerConfig, memory: MemoryConfig, device: torch.device, value_lr: float | None = None
) -> torch.optim.Optimizer:
    implementation = config.implementation
    if implementation == "auto":
        implementation = "fused" if device.type == "cuda" else "foreach"
    return torch.optim.AdamW(
        build_param_groups(model, config, memory, value_lr),
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        eps=config.eps,
        fused=implementation == "fused",
        foreach=implementation == "foreach",
    )


def build_optimizers(
    model: nn.Module,
    config: JobConfig,
    device: torch.device,
    replica_group=None,
    slice_group=None,
    data_parallel_size: int = 1,
) -> tuple[torch.optim.Optimizer, RowWiseValueOptimizer | None]:
    """AdamW for everything autograd trains, plus the fused row-wise optimizer of the value table when
    `[memory] value_optimizer` asks for one (the table then leaves AdamW's groups). On several processes the row-wise
    optimizer gathers its records over `replica_group` (the ranks with the same slice of the table) and sums row norms
    over `slice_group` (the ranks with the other columns)."""
    value_optimizer = None
    values = getattr(model, "memory_values", None)
    memory = config.memory
    kind = resolve_value_optimizer(memory, device.type)
    value_lr = resolve_value_lr(memory, config.optimizer, kind)  # sgd without a value_lr fails the config checks
    if values is not None and kind != "adamw":
        value_optimizer = RowWiseValueOptimizer(
            values,
            kind,
            lr=value_lr,
            weight_decay=memory.value_weight_decay,
            betas=(config.optimizer.beta1, config.optimizer.beta2),
            eps=config.optimizer.eps,
            state_dtype=torch.bfloat16 if memory.value_state_dtype == "bf16" else torch.float32,
            replica_group=replica_group,
            slice_group=slice_group,
            data_parallel_size=data_parallel_size,
        )
    return build_optimizer(model, config.optimizer, memory, device, value_lr), value_optimizer
