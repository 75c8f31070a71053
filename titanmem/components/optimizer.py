"""AdamW over parameter groups: matrices and embeddings decay, norms and biases do not (by default)."""

from __future__ import annotations

import torch
from torch import nn

from titanmem.config.sections import Optimizer as OptimizerConfig


def is_norm_or_bias(name: str, param: nn.Parameter) -> bool:
    """1-D parameters are the norm gains and biases; decaying them towards 0 only fights their role."""
    return param.ndim < 2 or name.endswith(".bias")


def build_param_groups(model: nn.Module, config: OptimizerConfig) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = is_norm_or_bias(name, param) and not config.decay_norms_and_biases
        (no_decay if exempt else decay).append(param)
    groups = [{"name": "decay", "params": decay, "weight_decay": config.weight_decay}]
    if no_decay:
        groups.append({"name": "no_decay", "params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, config: OptimizerConfig, device: torch.device) -> torch.optim.Optimizer:
    implementation = config.implementation
    if implementation == "auto":
        implementation = "fused" if device.type == "cuda" else "foreach"
    return torch.optim.AdamW(
        build_param_groups(model, config),
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        eps=config.eps,
        fused=implementation == "fused",
        foreach=implementation == "foreach",
    )
