"""The training entry point: `python -m titanmem.train --job.config_file FILE [--section.key value ...]`.

Order of work: parse and check the config, resolve and check the run plan (no side effects), build the run
(`titanmem.build`), then the optimizers, schedule, metrics and checkpointing; resume if a complete checkpoint exists,
and train. The life of one step is in docs/architecture.md.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F

from titanmem.build import build_run
from titanmem.components.checkpoint import (CheckpointManager, CheckpointWriteError, complete_checkpoint_steps,
                                            load_model_weights, resume_hint)
from titanmem.components.disk_space import check_checkpoint_space, checkpoint_bytes
from titanmem.components.faults import crash_point
from titanmem.components.finetune import build_row_selector, finetune_warnings, freeze_for_finetune
from titanmem.components.lr_scheduler import build_lr_scheduler
from titanmem.components.metrics import MetricsLogger
from titanmem.components.optimizer import Optimizers, all_finite
from titanmem.components.watchdog import BACKSTOP_SECONDS, CommWatchdog
from titanmem.components.states import DataLoaderState, ModelState, RNGState, SchedulerState, TrainState
from titanmem.config import ConfigError, JobConfig  # noqa: F401 (what Trainer raises for bad settings)
from titanmem.config.manager import write_config
from titanmem.entry import run_command
from titanmem.eval.runner import Evaluator
from titanmem.eval.telemetry import MemoryTelemetry, memory_layer_names
from titanmem.components.profiling import RunOutOfMemory, memory_snapshot, out_of_memory, step_profiler
from titanmem.models.accounting import count_parameters, flops_per_token
from titanmem.plan import RunPlan, resolve_plan
from titanmem.utils import (PhaseTimer, autocast, exit_with, leave_in_error_file, print_error, storage_failure,
                            timed_phase)

logger = logging.getLogger("titanmem")

USAGE = "python -m titanmem.train [--job.config_file FILE] [--print_config] [--section.key VALUE ...]"


class NonFiniteLossError(RuntimeError):
    pass


# Steps whose metrics may wait on the device before the trainer reads them anyway: bounds how late a non-finite step
# is noticed when logging is rare.
MAX_UNSETTLED_STEPS = 25


class StepMetrics(Mapping):
    """A step's scalar metrics (loss, grad_norm, value_grad_norm, lr), read from the device on first access. Reading
    them settles every earlier step of the trainer too, so that skips are accounted in order."""

    def __init__(self, trainer: "Trainer", step: int, lr: float):
        self.trainer, self.step, self.lr = trainer, step, lr
        self.scalars: torch.Tensor | None = None  # on the device until read
        self.values: dict[str, float] | None = None
        self.norms: list[float] = []
        self.applied = True

    def read(self, loss: float, norms: list[float], applied: bool) -> None:
        self.scalars, self.norms, self.applied = None, norms, applied
        self.values = {"loss": loss, "grad_norm": norms[0], "lr": self.lr}
        if len(norms) > 1:
            self.values["value_grad_norm"] = norms[1]

    def _settled(self) -> dict[str, float]:
        if self.values is None:
            self.trainer.settle()
        return self.values

    def __getitem__(self, key: str) -> float:
        return self._settled()[key]

    def __iter__(self):
        return iter(self._settled())

    def __len__(self) -> int:
        return len(self._settled())


def build_watchdog(config: JobConfig, plan: RunPlan) -> CommWatchdog:
    """The run's watchdog, from start-up on: a rank that stops or dies ends the run with one line on the others."""
    return CommWatchdog(config.comm, plan.world_size, config.job.dump_folder,
                        lambda: resume_hint(plan.checkpoint_folder),
                        device_event=torch.cuda.Event if plan.device_type == "cuda" else None)


class Trainer:
    """The training run of a config: its build, optimizers, schedule, metrics and checkpoints, and the loop.

    `phase_timer` (for benchmarks and tools) times the phases of each `train_step`: it is called with a phase's name
    and returns the context manager that the phase runs in. The phases are "forward" (the model's forward, inside
    "forward+backward", once per micro-batch), "forward+backward" (the loss and its backward too), "optimizer norms"
    (the gradient norms and clipping), "optimizer step" (the update) and "value update" (the row-wise value
    optimizer's share of the norms and of the update, inside those two). Without it (None) nothing is timed."""

    def __init__(self, config: JobConfig, plan: RunPlan | None = None, watchdog: CommWatchdog | None = None,
                 phase_timer: PhaseTimer | None = None):
        self.config = config
        self.plan = plan or resolve_plan(config, "train")
        self.phase_timer = phase_timer
        self.watchdog = watchdog or build_watchdog(config, self.plan)
        try:
            self.run = build_run(self.plan, "train")
        except BaseException as error:
            self.watchdog.end_if_peer_lost(error)
            self.watchdog.close()
            raise
        if self.run.lock is not None:
            # A hung run's process ends without its teardown: the relaunch finds the folder free.
            self.watchdog.at_exit(self.run.lock.release)
        try:
            self._assemble(config)
        except BaseException as error:
            self.watchdog.end_if_peer_lost(error)
            self.watchdog.close()
            if self.run.lock is not None:
                self.run.lock.release()
            raise

    def _assemble(self, config: JobConfig) -> None:
        """Everything of the trainer around the built run: optimizers, schedule, metrics, checkpointing."""
        self.model, self.dataloader, self.device = self.run.model, self.run.dataloader, self.run.device
        self.rank, self.world_size = self.run.rank, self.plan.world_size
        self.dims = self.plan.parallel
        self.dp_rank, self.dp_world_size = self.dims.data_parallel_position()
        self.param_counts = count_parameters(self.model)
        self.flops_per_token = flops_per_token(self.plan.model_args, self.param_counts, config.training.seq_len)

        # Before the optimizers: what is frozen gets no optimizer state.
        self.frozen_params = freeze_for_finetune(self.model, config.finetune.mode)
        self.optimizers = Optimizers(
            self.model, config, self.dims, value_optimizer=self.plan.value_optimizer, value_lr=self.plan.value_lr,
            implementation=self.plan.optimizer_implementation,
            value_layout=self.plan.value_slice_sharding, recorder=self.run.recorder,
        )
        self.optimizers.phase_timer = self.phase_timer
        self.row_selector = None
        if self.optimizers.values is not None:
            self.row_selector = build_row_selector(config.finetune, self.plan.model_args.memory.n_values, self.device)
            self.optimizers.values.row_selector = self.row_selector
        self.lr_scheduler = build_lr_scheduler(self.optimizers.dense, config.lr_scheduler, self.plan.lr_decay_steps)
        self.train_state = TrainState()
        self.metrics = MetricsLogger(
            config.metrics, config.job.dump_folder, self.rank, config.training.steps, self.flops_per_token,
            self.device, bf16=self.plan.autocast_dtype == torch.bfloat16,
        )
        self.checkpointer = CheckpointManager(
            config.checkpoint, self.plan.checkpoint_folder,
            {
                "model": ModelState(self.model),
                "optimizer": self.optimizers,
                "lr_scheduler": SchedulerState(self.lr_scheduler),
                "dataloader": DataLoaderState(self.dataloader, self.dp_rank, self.dims.get_group("dp"),
                                              config.data.on_reshard),
                "rng": RNGState(self.rank),
                "train_state": self.train_state,
            },
            total_steps=config.training.steps, rank=self.rank,
            # Per-process state of ranks the saving run did not have, another kind of value optimizer's state, and
            # AdamW's state of parameters a finetuning mode froze in the saving run, start fresh (with a warning).
            optional=("dataloader", "rng", "optimizer.values", "optimizer.dense"),
            comm_timeout_seconds=config.comm.init_timeout_seconds + BACKSTOP_SECONDS,
        )
        if config.checkpoint.enable:
            folder = self.checkpointer.folder
            self.checkpointer.expected_bytes = checkpoint_bytes(self.model, self.optimizers)
            check_checkpoint_space(folder, self.checkpointer.expected_bytes, config.checkpoint.keep_latest_k,
                                   len(complete_checkpoint_steps(folder)))
        self.telemetry = self._build_telemetry()
        self.evaluator: Evaluator | None = None  # built at the first evaluation
        # Every step's loss, for callers (tests, sweeps) that want the curve without parsing logs.
        self.loss_history: dict[int, float] = {}
        self._unsettled: list[StepMetrics] = []  # launched steps whose metrics are still on the device
        self._unread_losses: list[StepMetrics] = []  # launched steps of train() whose losses are not recorded yet
        self._evaluating = False  # for the out-of-memory message: was it the eval that ran out?
        # Whether train_step may leave a step's numbers on the device until they are needed (`settle`). `train` turns
        # it on for its loop; a caller of train_step sees every step settled unless it turns it on too.
        self.read_late = False
        self._log_setup()

    def _build_telemetry(self) -> MemoryTelemetry | None:
        values = self.model.memory_values
        if values is None or self.config.metrics.memory_telemetry_freq == 0:
            return None
        names = memory_layer_names(self.model)
        memory = self.plan.model_args.memory
        telemetry = MemoryTelemetry(memory.n_values, sorted(set(names.values())), self.device)
        values.observer = lambda layer, indices, weights: telemetry.observe(names[id(layer)], indices, weights,
                                                                            memory.knn)
        return telemetry

    def _log_setup(self) -> None:
        if self.rank != 0:
            return
        c, a, plan = self.param_counts, self.plan.model_args, self.plan
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
            logger.info(
                "memory layers in blocks %s: %s values × %d (n_keys %d), %d heads × top-%d, k_dim %d, key search %s, lookup %s%s%s; "
                "values trained by %s at lr %.1e",
                list(m.layers), f"{m.n_values:,}", m.v_dim, m.n_keys, m.heads, m.knn, m.k_dim, m.key_search, m.lookup,
                ", swilu" if m.swilu else "", ", qk-norm" if m.qk_norm else "", plan.value_optimizer, plan.value_lr,
            )
            if self.world_size > 1:
                copies = self.dims.slice_copies
                how = {"fsdp": "row-sharded by FSDP (gathered for the step)", "replicate": "replicated",
                       "rows": "split in row blocks (each rank updates its own rows)"}[plan.value_slice_sharding]
                layout = "one copy of each slice" if copies == 1 else f"each slice {how} over {copies} ranks"
                logger.info("value table: columns split over mp = %d; %s", self.dims.mp, layout)
        if self.config.finetune.mode != "full":
            logger.info("finetune %s: %d parameter tensors frozen; the value table trains%s", self.config.finetune.mode,
                        self.frozen_params, f", {self.row_selector.describe()}" if self.row_selector else "")
            resuming = self.plan.checkpoint_to_load is not None
            for warning in finetune_warnings(self.config.finetune, self.plan.initial_load, resuming,
                                             self.row_selector):
                logger.warning(warning)
        logger.info(
            "device %s, precision %s; %s tokens/step (%d accumulation steps); %.3g training FLOPs/token",
            self.device, "bf16 autocast" if plan.autocast_dtype else "fp32", f"{plan.tokens_per_step:,}",
            plan.accumulation_steps, self.flops_per_token,
        )
        write_config(self.config, self.config.job.dump_folder)

    def forward_backward(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.plan.autocast_dtype):
            with timed_phase(self.phase_timer, "forward"):
                logits = self.model(inputs)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        (loss / self.plan.accumulation_steps).backward()
        return loss.detach()

    def train_step(self, batches) -> StepMetrics:
        """One optimizer step over the plan's accumulation steps; returns the step's scalar metrics.

        With `read_late`, and where the device itself can skip a non-finite step (`Optimizers.skips_on_device`),
        nothing here waits for the device: the metrics are read on first access or when the steps are settled, and so
        is the decision, taken on the device, whether the update was applied."""
        self.optimizers.zero_grad()
        accumulation = self.plan.accumulation_steps
        loss_sum = torch.zeros((), device=self.device)
        for _ in range(accumulation):
            self.watchdog.doing("reading its batch")
            crash_point("batch", self.train_state.step)
            batch = next(batches)
            self.watchdog.doing("computing")
            inputs = batch["input"].to(self.device, non_blocking=True)
            labels = batch["labels"].to(self.device, non_blocking=True)
            with timed_phase(self.phase_timer, "forward+backward"):
                micro_loss = self.forward_backward(inputs, labels)
            loss_sum += micro_loss
        with timed_phase(self.phase_timer, "optimizer norms"):
            norms = self.optimizers.grad_norms()
        mean_loss = loss_sum / accumulation
        dp_group = self.dims.get_group("dp")
        if dp_group is not None:
            # Every rank holds the same number of tokens, so the mean of the rank means is the global mean.
            dist.all_reduce(mean_loss, op=dist.ReduceOp.AVG, group=dp_group)
        scalars = torch.stack([mean_loss, *norms]).float()  # [loss, grad norm(, value grad norm)]
        metrics = StepMetrics(self, self.train_state.step, self.lr_scheduler.get_last_lr()[0])
        if self.optimizers.skips_on_device:
            with timed_phase(self.phase_timer, "optimizer step"):
                self.optimizers.step_unless_nonfinite(scalars)
            metrics.scalars = scalars
        else:
            # A host sync: the row-wise value optimizer decides between update and skip on the host.
            loss, *norm_values = scalars.tolist()
            with timed_phase(self.phase_timer, "optimizer step"):
                applied = self.optimizers.step(loss, norm_values)
            metrics.read(loss, norm_values, applied=applied)
        self._unsettled.append(metrics)
        # The schedule follows the step count, skipped or not, so a skip does not shift later lrs.
        self.lr_scheduler.step()
        if metrics.scalars is None or not self.read_late or len(self._unsettled) >= MAX_UNSETTLED_STEPS:
            self.settle()
        return metrics

    def settle(self) -> None:
        """Read the metrics of the steps launched since the last call (one host sync for all of them), and account
        their skips in order: a non-finite step counts as skipped, or stops the run as `training` says."""
        unsettled, self._unsettled = self._unsettled, []
        on_device = [m for m in unsettled if m.scalars is not None]
        if on_device:
            rows = torch.stack([m.scalars for m in on_device]).tolist()
            for metrics, (loss, *norms) in zip(on_device, rows):
                metrics.read(loss, norms, applied=all_finite([loss, *norms]))
        for metrics in unsettled:
            if not metrics.applied:
                self._handle_nonfinite(metrics.step, metrics["loss"], metrics.norms)

    def _handle_nonfinite(self, step: int, loss: float, norm: list[float]) -> None:
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

    def train(self) -> dict[int, float]:
        """Resume (or start), train to `training.steps`, and wait for the last save; returns every step's loss. A rank
        that stops or dies ends the run here, on every rank that waited for it (`CommWatchdog`)."""
        try:
            return self._train()
        except BaseException as error:
            self.watchdog.end_if_peer_lost(error)
            raise

    def _train(self) -> dict[int, float]:
        state = self.train_state
        total = self.config.training.steps
        # The newest checkpoint, if damaged, gives way to the one before (not below checkpoint.load_step); the one a
        # launch goes back to by number does not.
        load_step = self.config.checkpoint.load_step
        resumed = self.checkpointer.load(self.plan.checkpoint_to_load, load_step=load_step)
        if self.rank == 0 and resumed is not None and load_step != -1 and resumed > load_step:
            logger.warning("checkpoint.load_step %d: an earlier launch of this command already went back to step-%d "
                           "and saved newer checkpoints; resuming from step-%d instead of going back again (to go "
                           "back to step-%d once more, first move the checkpoints newer than it out of %s)", load_step,
                           load_step, resumed, load_step, self.checkpointer.folder)
        if self.rank == 0:
            logger.info("resumed at step %d of %d" % (resumed, total) if resumed is not None else "starting at step 0")
        if resumed is not None:
            crash_point("resumed", resumed)
        elif self.plan.initial_load is not None:
            self._initial_load(self.plan.initial_load)
        batches = iter(self.dataloader)
        self.model.train()
        # Throughput windows start here, after checkpoint loading and loader start-up.
        self.metrics.reset_window()
        self.read_late = True
        profiler = step_profiler(self.config.profiling, self.config.job.dump_folder, self.rank, state.step)
        snapshot = memory_snapshot(self.config.profiling, self.config.job.dump_folder, self.rank, self.device)
        try:
            with profiler:
                self._loop(total, batches, profiler, snapshot)
            # The last background save may write for long on a slow disk; the device's steps stay watched.
            self.watchdog.begin_unwatched("the end of the run")
            self._read_losses()
        except torch.cuda.OutOfMemoryError as error:
            raise out_of_memory(state.step, error, snapshot.dump_oom(state.step), self._evaluating) from error
        finally:
            self.read_late = False
            snapshot.close()
        # The last save may still be writing in the background: the run is done once it is complete.
        self.checkpointer.wait()
        if self.rank == 0:
            logger.info("training done: %d steps, %s tokens", state.step, f"{state.tokens_seen:,}")
        return self.loss_history

    def _read_losses(self) -> None:
        """Settle the launched steps and record their losses in loss_history."""
        self.settle()
        for metrics in self._unread_losses:
            self.loss_history[metrics.step] = metrics["loss"]
        self._unread_losses.clear()

    def _loop(self, total: int, batches, profiler, snapshot) -> None:
        state = self.train_state
        while state.step < total:
            state.step += 1
            self.watchdog.begin_step(state.step)
            self._unread_losses.append(self.train_step(batches))
            self.watchdog.end_step(state.step)
            crash_point("step", state.step)
            state.tokens_seen += self.plan.tokens_per_step
            interval = self.config.eval.interval
            evaluate = interval and (state.step % interval == 0 or state.step == total)
            values = None
            # The host waits for the device only where it needs the numbers: to log them, and before an
            # evaluation or a save, so that a checkpoint's skip count is that of its step.
            if (self.metrics.should_log(state.step) or evaluate or self.checkpointer.due(state.step)
                    or state.step == total or len(self._unread_losses) >= MAX_UNSETTLED_STEPS):
                values = dict(self._unread_losses[-1])
                self._read_losses()
                values["nonfinite_skips"] = state.nonfinite_skips
            # Per GPU: tensor-parallel ranks share their data-parallel rank's tokens.
            self.metrics.step_done(state.step, self.plan.tokens_per_step // self.world_size, values)
            if self.telemetry is not None and state.step % self.config.metrics.memory_telemetry_freq == 0:
                self.metrics.log_memory_telemetry(state.step, *self.telemetry.summarize())
            if evaluate:
                self.watchdog.begin(f"the evaluation after step {state.step}")
                self.evaluate()
            if self.checkpointer.due(state.step):
                self.watchdog.begin(f"the save of step-{state.step}")
                self.checkpointer.save(state.step)
            profiler.step()
            snapshot.step(state.step)

    def _initial_load(self, path) -> None:
        """A new run's start from another run's checkpoint or an exported model (`checkpoint.initial_load_path`)."""
        if self.config.checkpoint.initial_load_model_only:
            load_model_weights(self.model, path, field="checkpoint.initial_load_path",
                               verify=self.config.checkpoint.verify_on_load, threads=self.config.checkpoint.io_threads)
            what = "model weights"
        else:
            self.checkpointer.load(path, fall_back=False)
            what = f"whole training state (step {self.train_state.step})"
        if self.rank == 0:
            logger.info("started from %s of %s", what, path)

    def evaluate(self) -> dict:
        """Held-out perplexity and fact recall of the current model (titanmem/eval/runner.py)."""
        if self.evaluator is None:
            self.evaluator = Evaluator(self.config, self.run.tokenizer, self.device, self.plan.autocast_dtype,
                                       self.rank, results_folder=f"{self.config.job.dump_folder}/eval")
        # Left set if the eval fails: the error that ends the run then says where it happened.
        self._evaluating = True
        results = self.evaluator.run(self.model, self.train_state.step)
        self._evaluating = False
        self.metrics.log_scalars(self.train_state.step, self.evaluator.scalars(results))
        return results

    def close(self) -> None:
        """Finish a background save (whose failure is raised here, after the rest is released), then release the
        metrics, the run lock and the process group."""
        try:
            self.checkpointer.close()
        except BaseException as error:
            # A background save whose collective lost a rank: named before the process group is torn down.
            self.watchdog.end_if_peer_lost(error)
            raise
        finally:
            self.watchdog.close()
            self.metrics.close()
            if self.run.lock is not None:
                self.run.lock.release()
            if self.world_size > 1 and dist.is_initialized():
                dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    return run_command(argv, "train", USAGE, train)


def train(config: JobConfig, plan: RunPlan) -> int:
    """Build the trainer and run it to the end: 0, or 1 after a failure that its line (or log) names. A config error,
    also one found only against a checkpoint or the data stream after start-up, is left to the caller."""
    try:
        trainer = Trainer(config, plan)
        try:
            trainer.train()
        finally:
            trainer.close()  # which waits for a background save: its failure is reported below too
    except (NonFiniteLossError, RunOutOfMemory) as e:
        logger.error("%s", e)
        leave_in_error_file(str(e))
        return 1
    except CheckpointWriteError as e:
        print_error(e)
        return 1
    except OSError as e:  # a write of the run's own (its lock, config, events, traces) on a full or failing disk
        line = storage_failure(e, config.job.dump_folder)
        if line is None:
            raise
        print_error(f"{line}; {resume_hint(plan.checkpoint_folder)}")
        return 1
    return 0


if __name__ == "__main__":
    exit_with(main())
