"""Finetuning a trained model: what trains (`[finetune] mode`), and the row selection of sparse memory finetuning.

`full` trains everything, as pretraining does. `values_only` and `sparse_memory` freeze every parameter but the
memory value table before the optimizers are built, so the frozen ones get no gradient and no optimizer state. With
the key path frozen, the lookups still hand the value optimizer the read-out gradients it trains from
(`titanmem.distributed.lookup`). `sparse_memory` then trains, of the rows a step reads, only those a `RowSelector`
picks (`titanmem.components.row_selection`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from titanmem.components.optimizer import memory_value_parameters
from titanmem.components.read_counts import load_read_counts
from titanmem.components.row_selection import RowSelector
from titanmem.config.sections import Finetune as FinetuneConfig


def freeze_for_finetune(model: nn.Module, mode: str) -> int:
    """Freeze what `mode` does not train; returns how many parameters it froze."""
    if mode == "full":
        return 0
    values = {id(p) for p in memory_value_parameters(model)}
    frozen = 0
    for param in model.parameters():
        if id(param) not in values and param.requires_grad:
            param.requires_grad_(False)
            frozen += 1
    return frozen


def build_row_selector(config: FinetuneConfig, n_values: int, device: torch.device) -> RowSelector | None:
    """The selection of `sparse_memory` on `device`, from the counts files the plan checked; None for other modes."""
    if config.mode != "sparse_memory":
        return None
    background = load_read_counts(config.background_counts, "finetune.background_counts", n_values).to(device)
    dataset = None
    if config.selection == "per_dataset":
        dataset = load_read_counts(config.dataset_counts, "finetune.dataset_counts", n_values).to(device)
    return RowSelector(config.top_t, background, dataset)


def finetune_warnings(config: FinetuneConfig, start: Path | None, resuming: bool,
                      selector: RowSelector | None) -> list[str]:
    """What looks wrong in a finetuning setup without being an error: a fresh start from no model, counts made on
    another model than `start` (the initial load), a per-dataset selection that selects nothing."""
    if config.mode == "full":
        return []
    warnings = []
    if start is None and not resuming:
        warnings.append(f"finetune.mode {config.mode!r} starts from a freshly initialised model; set "
                        "checkpoint.initial_load_path to the model to finetune")
    if selector is not None:
        counted = selector.background.description.get("checkpoint")
        if start is not None and not resuming and counted and Path(counted).resolve() != start.resolve():
            warnings.append(f"finetune.background_counts were counted on {counted}, not on {start}, the model this "
                            "run starts from: its rows' background use may differ")
        if selector.fixed_rows is not None and selector.fixed_rows.numel() == 0:
            warnings.append("finetune.dataset_counts read no value row: no row will train")
    return warnings
