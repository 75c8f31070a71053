"""The optimizers of a run, as one Stateful container.

AdamW trains everything autograd gives a gradient: matrices and embeddings decay, norms and biases do not (by
default), and the memory value table, when AdamW trains it too, has a group of its own with its own lr and weight
decay. When a row-wise value optimizer trains the table instead (`titanmem.components.value_optimizer`), the table
leaves AdamW's groups. `Optimizers` owns both: zero_grad, the two clip norms (the table is clipped on its own), the
averaging of the table's gradient over its replicas where FSDP does not do it, the step or its skip on a non-finite
loss, and one state_dict for checkpoints.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from titanmem.components.value_optimizer import RowWiseValueOptimizer, clip_coefficient
from titanmem.config.sections import JobConfig
from titanmem.config.sections import Optimizer as OptimizerConfig
from titanmem.distributed.lookup import ReadRecorder
from titanmem.distributed.parallel_dims import ParallelDims
from titanmem.registry import VALUE_OPTIMIZERS
from titanmem.utils import PhaseTimer, local_tensor, timed_phase

_STATE_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def is_norm_or_bias(name: str, param: nn.Parameter) -> bool:
    """1-D parameters are the norm gains and biases; decaying them towards 0 only fights their role."""
    return param.ndim < 2 or name.endswith(".bias")


def memory_value_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The shared value table, if the model has memory layers."""
    values = getattr(model, "memory_values", None)
    return list(values.parameters()) if values is not None else []


def build_param_groups(model: nn.Module, config: OptimizerConfig, value_lr: float | None = None,
                       value_weight_decay: float = 0.0) -> list[dict]:
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
        groups.append({"name": "memory_values", "params": values, "lr": value_lr if value_lr is not None else config.lr,
                       "weight_decay": value_weight_decay})
    return groups


def clip_grad_norm(params: list[torch.Tensor], max_norm: float, device: torch.device | None = None) -> torch.Tensor:
    """Total gradient norm of `params` (fp32, over every rank's shards), clipped to `max_norm` unless it is 0; 0 on
    `device` when none has a gradient (every parameter frozen)."""
    by_mesh: dict = {}
    for p in params:
        if p.grad is not None:
            by_mesh.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p)
    squares = []
    # Gradients on different meshes (FSDP only, FSDP × TP) cannot share one foreach op: one group per mesh.
    for group in by_mesh.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group], norm_type=2.0, foreach=True)
        if isinstance(norm, DTensor):
            # Sharded gradients give a partial norm per rank; the full tensor reduces it over the mesh.
            norm = norm.full_tensor()
        squares.append(norm.float() ** 2)
    total = torch.stack(squares).sum().sqrt() if squares else torch.zeros((), device=device)
    for group in by_mesh.values():
        torch.nn.utils.clip_grads_with_norm_(group, max_norm or math.inf, total, foreach=True)
    return total


def all_finite(values: list[float]) -> bool:
    """Whether a step's loss and gradient norms allow its update."""
    return all(math.isfinite(v) for v in values)


class Optimizers:
    """AdamW plus, when `value_optimizer` is row-wise, the fused optimizer of the value table (Stateful)."""

    def __init__(
        self,
        model: nn.Module,
        config: JobConfig,
        dims: ParallelDims,
        *,
        value_optimizer: str | None,
        value_lr: float | None,
        implementation: str,
        value_layout: str | None,
        recorder: ReadRecorder | None,
    ):
        """`value_layout`: the plan's `value_slice_sharding` (how the ranks that hold the same slice keep it)."""
        self.model = model
        self.config = config
        values = getattr(model, "memory_values", None)
        self.values: RowWiseValueOptimizer | None = None
        rows = value_layout == "rows" and dims.get_mesh("value_grid") is not None
        if values is not None and value_optimizer is not None and VALUE_OPTIMIZERS.get(value_optimizer).rowwise:
            optimizer = config.optimizer
            self.values = RowWiseValueOptimizer(
                values, recorder, value_optimizer, lr=value_lr, weight_decay=config.memory.value_weight_decay,
                betas=(optimizer.beta1, optimizer.beta2), eps=optimizer.eps,
                state_dtype=torch.bfloat16 if config.memory.value_state_dtype == "bf16" else torch.float32,
                replica_group=None if rows else dims.get_group("mp_replicas"), slice_group=dims.get_group("mp"),
                data_parallel_size=dims.dp,
                rounding_seed=config.training.seed if config.memory.value_rounding == "stochastic" else None,
                rows_group=dims.get_group("mp_replicas") if rows else None,
            )
        self.dense = torch.optim.AdamW(
            build_param_groups(model, config.optimizer, value_lr, config.memory.value_weight_decay),
            lr=config.optimizer.lr,
            betas=(config.optimizer.beta1, config.optimizer.beta2),
            eps=config.optimizer.eps,
            fused=implementation == "fused",
            foreach=implementation == "foreach",
        )
        value_ids = {id(p) for p in memory_value_parameters(model)}
        # The table's gradient, when autograd makes one (dense AdamW); a row-wise optimizer trains it without one.
        self.value_params = [p for p in model.parameters() if id(p) in value_ids and p.requires_grad]
        # Frozen parameters (finetuning) have no gradient to clip and no state.
        self.dense_params = [p for p in model.parameters() if id(p) not in value_ids and p.requires_grad]
        self.device = next(model.parameters()).device
        # A table slice that FSDP leaves whole on each rank gets its gradient averaged over the slice's copies here (a
        # rows-sharded block's gradient already is the global mean: no other rank holds its rows).
        self.replica_group = dims.get_group("mp_replicas") if value_layout == "replicate" else None
        # Times the row-wise value optimizer's work as the phase "value update" (the trainer's `phase_timer`).
        self.phase_timer: PhaseTimer | None = None

    def zero_grad(self) -> None:
        self.dense.zero_grad(set_to_none=True)

    def grad_norms(self) -> list[torch.Tensor]:
        """The step's pre-clip gradient norms, [dense] or [dense, values], as device tensors (no host sync). The dense
        gradients (and a table gradient of AdamW's) are clipped in place; a row-wise optimizer applies its clip in
        `step`."""
        if self.replica_group is not None:
            for param in self.value_params:
                if param.grad is not None:
                    torch.distributed.all_reduce(local_tensor(param.grad), op=torch.distributed.ReduceOp.AVG,
                                                 group=self.replica_group)
        norms = [clip_grad_norm(self.dense_params, self.config.training.max_norm, self.device)]
        # The value table is clipped on its own: its sparse, large-lr gradient would otherwise dominate the norm.
        if self.values is not None:
            with timed_phase(self.phase_timer, "value update"):
                value_norm = self.values.grad_norm(self.config.training.deterministic)
            norms.append(value_norm.float())
        elif self.value_params:
            norms.append(clip_grad_norm(self.value_params, self.config.memory.value_max_norm, self.device))
        return norms

    @property
    def skips_on_device(self) -> bool:
        """Whether the device itself can drop a non-finite step, so that a step needs no host sync: fused AdamW reads
        its `found_inf`, and the row-wise value optimizer its `apply` flag. AdamW's other implementations decide on
        the host (`step`)."""
        return bool(self.dense.defaults["fused"]) or not self.dense_trains

    def step_unless_nonfinite(self, scalars: torch.Tensor) -> None:
        """Apply the update unless a value of `scalars` ([loss, *grad_norms()], on the device) is not finite; the
        device decides, the host does not wait. A dropped step leaves the weights, moments and step counts as they
        were."""
        finite = scalars.isfinite().all()
        if not self.dense_trains:
            self.dense.step()  # no parameter to update; stepped so that the lr schedule follows a stepped optimizer
        else:
            self.dense.found_inf = (~finite).float()
            try:
                self.dense.step()
            finally:
                del self.dense.found_inf
        if self.values is not None:
            self._step_values(scalars[2], finite)

    def step(self, loss: float, norms: list[float]) -> bool:
        """Apply the update, or drop it when the loss or a norm is not finite; returns whether it was applied."""
        if not all_finite([loss, *norms]):
            if self.values is not None:
                self.values.discard()
            self.zero_grad()
            return False
        self.dense.step()
        if self.values is not None:
            self._step_values(torch.tensor(norms[1], device=self.device), True)
        return True

    def _step_values(self, norm: torch.Tensor, apply: torch.Tensor | bool) -> None:
        # The table follows the same schedule multiplier as every AdamW group (set by the lr scheduler).
        group = self.dense.param_groups[0]
        clip = clip_coefficient(norm, self.config.memory.value_max_norm)
        with timed_phase(self.phase_timer, "value update"):
            self.values.step(group["lr"] / group["initial_lr"], clip, apply)

    @property
    def dense_trains(self) -> bool:
        """Whether AdamW trains anything (not when finetuning freezes all but a row-wise trained table)."""
        return any(group["params"] for group in self.dense.param_groups)

    def state_dict(self) -> dict:
        # Only tensors (moments, step counts): the hyperparameters come from the config at every start.
        if not self.dense_trains:
            return {"dense": {}, **({"values": self.values.state_dict()} if self.values is not None else {})}
        fresh = not self.dense.state
        dense = get_optimizer_state_dict(self.model, self.dense, options=_STATE_OPTIONS)
        if fresh:
            # No update has been applied yet (every step so far was skipped): torch made the state with a zero-lr
            # step, which leaves the moments at zero but counts as a step. Uncount it, or a resume would be one step
            # ahead in AdamW's bias correction.
            for step in [state["step"] for state in self.dense.state.values()] + [
                    value for key, value in dense.items() if key.endswith(".step")]:
                if isinstance(step, torch.Tensor):
                    step.zero_()
        state = {"dense": {key: value for key, value in dense.items() if key.startswith("state.")}}
        if self.values is not None:
            state["values"] = self.values.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore moments and step counts; the hyperparameters stay those of the current config."""
        if self.dense_trains:
            current = get_optimizer_state_dict(self.model, self.dense, options=_STATE_OPTIONS)
            current.update(state["dense"])
            set_optimizer_state_dict(self.model, self.dense, current, options=_STATE_OPTIONS)
        if self.values is not None:
            self.values.load_state_dict(state.get("values", {}))
