"""The training entry point: `python -m titanmem.train --job.config_file FILE [--section.key value ...]`.

Order of work: parse and check the whole config (no side effects), then build tokenizer, model, data, optimizer,
schedule, metrics and checkpointing, resume if a complete checkpoint exists, and train.
"""

from __future__ import annotations

import logging
import math
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from titanmem.components.checkpoint import CheckpointManager, TrainState
from titanmem.components.lr_scheduler import build_lr_scheduler
from titanmem.components.metrics import MetricsLogger
from titanmem.components.optimizer import (
    build_optimizers,
    memory_value_parameters,
    resolve_value_lr,
    resolve_value_optimizer,
    resolve_value_slice_sharding,
)
from titanmem.components.value_optimizer import clip_coefficient
from titanmem.config import ConfigError, JobConfig, build_config, format_config, format_help
from titanmem.config.manager import check_parallelism, write_config
from titanmem.data import build_dataloader, build_tokenizer
from titanmem.distributed.memory_parallel import apply_memory_parallel, average_over_replicas
from titanmem.distributed.parallelize import (
    apply_activation_checkpointing,
    apply_compile,
    apply_fsdp,
    apply_tp,
    build_mesh,
    data_parallel_rank,
    init_distributed,
    local_world,
)
from titanmem.models import build_model, build_model_args
from titanmem.eval.runner import Evaluator
from titanmem.eval.telemetry import MemoryTelemetry, memory_layer_names
from titanmem.models.accounting import count_parameters, flops_per_token
from titanmem.utils import autocast, autocast_dtype, pick_device, seed_everything, setup_logging

logger = logging.getLogger("titanmem")


class NonFiniteLossError(RuntimeError):
    pass


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Total gradient norm of `params` (fp32, over every rank's shards), clipped to `max_norm` unless it is 0."""
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
    total = torch.stack(squares).sum().sqrt() if squares else torch.zeros(())
    for group in by_mesh.values():
        torch.nn.utils.clip_grads_with_norm_(group, max_norm or math.inf, total, foreach=True)
    return total


class Trainer:
    def __init__(self, config: JobConfig):
        self.config = config
        self.rank, self.world_size = local_world()
        self.parallel_dims = check_parallelism(config, self.world_size)
        training = config.training
        self.device = pick_device(training.device)
        seed_everything(training.seed, training.deterministic)
        self.mesh = None
        if self.world_size > 1:
            init_distributed(self.device)
            self.mesh = build_mesh(self.parallel_dims, self.device.type)
        self.dp_rank, self.dp_world_size = data_parallel_rank(self.mesh)
        self.value_optimizer_kind = resolve_value_optimizer(config.memory, self.device.type)
        self.value_slice_sharding = resolve_value_slice_sharding(config.parallelism, self.value_optimizer_kind)

        # Tokenizer and data first: their errors (a wrong column, too few documents) must come before the model,
        # which takes minutes to build at scale.
        self.tokenizer = build_tokenizer(config.tokenizer)
        self.dataloader = build_dataloader(config, self.tokenizer, self.dp_rank, self.dp_world_size, self.device)
        self.model_args = build_model_args(config, self.tokenizer.vocab_size, self.device.type)
        self.autocast_dtype = autocast_dtype(training.mixed_precision, self.device)
        self.model = build_model(self.model_args, self.device, self._parallelize)
        self.param_counts = count_parameters(self.model)
        self.flops_per_token = flops_per_token(self.model_args, self.param_counts, training.seq_len)

        global_batch = training.global_batch_size
        if global_batch == -1:
            global_batch = training.local_batch_size * self.dp_world_size
        self.accumulation_steps = global_batch // (training.local_batch_size * self.dp_world_size)
        self.tokens_per_step = global_batch * training.seq_len

        self.optimizer, self.value_optimizer = build_optimizers(
            self.model, config, self.device, **self._value_groups())
        value_ids = {id(p) for p in memory_value_parameters(self.model)}
        # The table's gradient, when autograd makes one (dense AdamW); a row-wise optimizer trains it without one.
        self.value_params = [p for p in self.model.parameters() if id(p) in value_ids and p.requires_grad]
        self.dense_params = [p for p in self.model.parameters() if id(p) not in value_ids]
        self.lr_scheduler = build_lr_scheduler(self.optimizer, config.lr_scheduler, training.steps)
        self.train_state = TrainState()
        self.metrics = MetricsLogger(
            config.metrics,
            config.job.dump_folder,
            self.rank,
            training.steps,
            self.flops_per_token,
            self.device,
            bf16=self.autocast_dtype == torch.bfloat16,
        )
        self.checkpointer = CheckpointManager(
            config.checkpoint,
            config.job.dump_folder,
            self.model,
            self.optimizer,
            self.lr_scheduler,
            self.dataloader,
            self.train_state,
            value_optimizer=self.value_optimizer,
            total_steps=training.steps,
            rank=self.rank,
            dp_rank=self.dp_rank,
        )
        self.telemetry = self._build_telemetry()
        self.evaluator: Evaluator | None = None  # built at the first evaluation
        # Every step's loss, for callers (tests, sweeps) that want the curve without parsing logs.
        self.loss_history: dict[int, float] = {}
        self._log_setup()

    def _parallelize(self, model) -> None:
        """The plan, applied on the meta device in the documented order (titanmem/distributed/parallelize.py)."""
        dims = self.parallel_dims
        tp_mesh = self.mesh.world["tp"] if self.mesh is not None and dims.tp > 1 else None
        mp_mesh = self.mesh.world["mp"] if self.mesh is not None and dims.mp > 1 else None
        if tp_mesh is not None:
            apply_tp(model, tp_mesh)
        if model.memory_values is not None and (tp_mesh is not None or mp_mesh is not None):
            apply_memory_parallel(model, mp_mesh, tp_mesh)
        ac = self.config.activation_checkpoint
        apply_activation_checkpointing(model, ac.mode, ac.selective_layer_stride)
        if self.config.compile.enable:
            apply_compile(model, self.config.compile.backend)
        if self.mesh is not None:
            apply_fsdp(model, self.mesh, bf16=self.autocast_dtype == torch.bfloat16,
                       shard_value_slices=self.value_slice_sharding == "fsdp")

    def _build_telemetry(self) -> MemoryTelemetry | None:
        values = self.model.memory_values
        if values is None or self.config.metrics.memory_telemetry_freq == 0:
            return None
        names = memory_layer_names(self.model)
        telemetry = MemoryTelemetry(self.model_args.memory.n_values, sorted(set(names.values())), self.device)
        knn = self.model_args.memory.knn
        values.observer = lambda layer, indices, weights: telemetry.observe(names[id(layer)], indices, weights, knn)
        return telemetry

    def _value_groups(self) -> dict:
        """Where a row-wise value optimizer exchanges: see `build_optimizers`."""
        if self.mesh is None:
            return {}
        return dict(
            replica_group=self.mesh.replicas.get_group() if self.mesh.replicas is not None else None,
            slice_group=self.mesh.world["mp"].get_group() if self.parallel_dims.mp > 1 else None,
            data_parallel_size=self.dp_world_size,
        )

    def _log_setup(self) -> None:
        if self.rank != 0:
            return
        c, a = self.param_counts, self.model_args
        if self.config.job.description:
            logger.info(self.config.job.description)
        logger.info(
            "model %s/%s: %s params: %s dense, %s embedding, %s memory keys/projections, %s memory values; "
            "dim %d, %d layers, %d heads (%d kv), vocab %d",
            self.config.model.name, self.config.model.flavor, f"{c['total']:,}", f"{c['dense']:,}",
            f"{c['embedding']:,}", f"{c['memory']:,}", f"{c['memory_values']:,}", a.dim, a.n_layers, a.n_heads,
            a.kv_heads, a.vocab_size,
        )
        if a.memory is not None:
            m = a.memory
            kind = self.value_optimizer_kind
            logger.info(
                "memory layers in blocks %s: %s values × %d (n_keys %d), %d heads × top-%d, k_dim %d, lookup %s%s%s; "
                "values trained by %s at lr %.1e",
                list(m.layers), f"{m.n_values:,}", m.v_dim, m.n_keys, m.heads, m.knn, m.k_dim, m.lookup,
                ", swilu" if m.swilu else "", ", qk-norm" if m.qk_norm else "", kind,
                resolve_value_lr(self.config.memory, self.config.optimizer, kind),
            )
            if self.world_size > 1:
                d = self.parallel_dims
                copies = d.dp // d.mp
                layout = ("one copy of each slice" if copies == 1 else
                          f"each slice {'row-sharded by FSDP' if self.value_slice_sharding == 'fsdp' else 'replicated'}"
                          f" over {copies} ranks")
                logger.info("value table: columns split over mp = %d; %s", d.mp, layout)
        logger.info(
            "device %s, precision %s; %s tokens/step (%d accumulation steps); %.3g training FLOPs/token",
            self.device, "bf16 autocast" if self.autocast_dtype else "fp32", f"{self.tokens_per_step:,}",
            self.accumulation_steps,
            self.flops_per_token,
        )
        write_config(self.config, self.config.job.dump_folder)

    def forward_backward(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.autocast_dtype):
            logits = self.model(inputs)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        (loss / self.accumulation_steps).backward()
        return loss.detach()

    def train_step(self, batches) -> dict[str, float]:
        """One optimizer step over `accumulation_steps` micro-batches; returns the step's scalar metrics."""
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device)
        for _ in range(self.accumulation_steps):
            batch = next(batches)
            inputs = batch["input"].to(self.device, non_blocking=True)
            labels = batch["labels"].to(self.device, non_blocking=True)
            loss_sum += self.forward_backward(inputs, labels)
        if self.value_slice_sharding == "replicate" and self.mesh is not None and self.mesh.replicas is not None:
            for param in self.value_params:
                average_over_replicas(param, self.mesh.replicas.get_group())
        norms = [clip_grad_norm(self.dense_params, self.config.training.max_norm)]
        # The value table is clipped on its own: its sparse, large-lr gradient would otherwise dominate the norm.
        if self.value_optimizer is not None:
            norms.append(self.value_optimizer.grad_norm(self.config.training.deterministic).float())
        elif self.value_params:
            norms.append(clip_grad_norm(self.value_params, self.config.memory.value_max_norm))
        mean_loss = loss_sum / self.accumulation_steps
        if self.dp_world_size > 1:
            # Every rank holds the same number of tokens, so the mean of the rank means is the global mean.
            dist.all_reduce(mean_loss, op=dist.ReduceOp.AVG, group=self.mesh.dp.get_group())
        # One host sync per step: it decides between update and skip, and feeds the metrics.
        loss, *norm_values = torch.stack([mean_loss, *norms]).tolist()
        values = {"loss": loss, "grad_norm": norm_values[0], "lr": self.lr_scheduler.get_last_lr()[0]}
        if len(norm_values) > 1:
            values["value_grad_norm"] = norm_values[1]
        if all(math.isfinite(v) for v in (loss, *norm_values)):
            self.optimizer.step()
            if self.value_optimizer is not None:
                multiplier = self.lr_scheduler.lr_lambdas[0](self.lr_scheduler.last_epoch)
                self.value_optimizer.step(multiplier, clip_coefficient(norm_values[1], self.config.memory.value_max_norm))
        else:
            if self.value_optimizer is not None:
                self.value_optimizer.discard()
            self._handle_nonfinite(loss, norm_values)
        # The schedule follows the step count, skipped or not, so a skip does not shift later lrs.
        self.lr_scheduler.step()
        return values

    def _handle_nonfinite(self, loss: float, norm: list[float]) -> None:
        step = self.train_state.step
        training = self.config.training
        if training.on_nonfinite_loss == "abort":
            raise NonFiniteLossError(
                f"step {step}: loss {loss}, grad norms {norm} not all finite; lower optimizer.lr, check the data, or "
                "set training.on_nonfinite_loss = 'skip'"
            )
        self.train_state.nonfinite_skips += 1
        logger.warning("step %d: loss %s, grad norms %s; update skipped (%d so far)", step, loss, norm,
                       self.train_state.nonfinite_skips)
        if self.train_state.nonfinite_skips > training.max_nonfinite_skips:
            raise NonFiniteLossError(
                f"{self.train_state.nonfinite_skips} non-finite steps exceed training.max_nonfinite_skips "
                f"({training.max_nonfinite_skips}); stopping at step {step}"
            )
        self.optimizer.zero_grad(set_to_none=True)

    def train(self) -> dict[int, float]:
        state = self.train_state
        total = self.config.training.steps
        resumed = self.checkpointer.load()
        if self.rank == 0:
            logger.info("resumed at step %d of %d" % (resumed, total) if resumed is not None else "starting at step 0")
        batches = iter(self.dataloader)
        self.model.train()
        # Throughput windows start here, after checkpoint loading and loader start-up.
        self.metrics.reset_window()
        while state.step < total:
            state.step += 1
            values = self.train_step(batches)
            state.tokens_seen += self.tokens_per_step
            self.loss_history[state.step] = values["loss"]
            values["nonfinite_skips"] = state.nonfinite_skips
            # Per GPU: tensor-parallel ranks share their data-parallel rank's tokens.
            self.metrics.step_done(state.step, self.tokens_per_step // self.world_size, values)
            if self.telemetry is not None and state.step % self.config.metrics.memory_telemetry_freq == 0:
                self.metrics.log_memory_telemetry(state.step, *self.telemetry.summarize())
            interval = self.config.eval.interval
            if interval and (state.step % interval == 0 or state.step == total):
                self.evaluate()
            self.checkpointer.maybe_save(state.step)
        if self.rank == 0:
            logger.info("training done: %d steps, %s tokens", state.step, f"{state.tokens_seen:,}")
        return self.loss_history

    def evaluate(self) -> dict:
        """Held-out perplexity and fact recall of the current model (titanmem/eval/runner.py)."""
        if self.evaluator is None:
            self.evaluator = Evaluator(self.config, self.tokenizer, self.device, self.autocast_dtype, self.rank)
        results = self.evaluator.run(self.model, self.train_state.step)
        self.metrics.log_scalars(self.train_state.step, self.evaluator.scalars(results))
        return results

    def close(self) -> None:
        self.metrics.close()
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    try:
        config, command_line = build_config(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if command_line.help:
        print(format_help())
        return 0
    if command_line.print_config:
        print(format_config(config))
        return 0
    try:
        trainer = Trainer(config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        trainer.train()
    except ConfigError as e:
        # Some settings can only be checked against a checkpoint or the data stream, after start-up.
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        logger.error("%s", e)
        return 1
    finally:
        trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
