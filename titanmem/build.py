"""The one build path: a run assembled from its plan, for a purpose (train, eval, generate, export).

`build_run` does, in this order:
1. process setup: the device of this rank, seeds and deterministic mode, the process group and the device mesh;
2. the tokenizer, and for training the data loader (its errors, a wrong column or too few documents, come before the
   model, which takes minutes to build at scale);
3. the model (`build_model`): constructed on the meta device, parallelized there by `parallelize_model` (so each
   rank only ever allocates its shard), materialised on the device, and initialised so that its full weights depend
   on the seed alone, not on the plan.

Training also gets the `ReadRecorder` that a row-wise value optimizer trains from. Readers of a run (eval, generate,
export) get the same model with the weights of the plan's checkpoint, read-only
(`titanmem.components.checkpoint.load_model_weights`).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from titanmem.components.checkpoint import load_model_weights
from titanmem.components.run_lock import RunLock, acquire_run_lock
from titanmem.components.watchdog import BACKSTOP_SECONDS, set_backstop_timeouts, set_flight_recorder_env
from titanmem.data.dataloader import build_dataloader
from titanmem.data.tokenizer import Tokenizer, build_tokenizer
from titanmem.distributed.initialize import init_model_weights
from titanmem.distributed.lookup import ReadRecorder
from titanmem.distributed.parallelize import parallelize_model
from titanmem.models.args import ModelArgs
from titanmem.models.llama import Transformer
from titanmem.plan import Purpose, RunPlan


@dataclass
class Run:
    plan: RunPlan
    device: torch.device
    rank: int
    tokenizer: Tokenizer
    model: Transformer
    dataloader: object | None = None
    """Training only: this data-parallel rank's resumable loader."""
    recorder: ReadRecorder | None = None
    """Training with a row-wise value optimizer only: the reads it trains from."""
    lock: RunLock | None = None
    """Training only, on rank 0: the dump folder's lock, held until the run is closed."""


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed every generator; in deterministic mode also restrict torch to deterministic kernels."""
    if deterministic:
        # cuBLAS reads this when its handle is created; it must be set before the first GPU matmul.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup_process(plan: RunPlan) -> torch.device:
    """This rank's device, seeds, and (on several processes) the process group and the mesh."""
    device = plan.device
    if device.type == "cuda":
        torch.cuda.set_device(device)
        limit = plan.config.training.gpu_memory_limit_gb * 1e9
        if limit:
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total), device)
    seed_everything(plan.config.training.seed, plan.config.training.deterministic)
    training = plan.purpose == "train"
    if plan.parallel.distributed and not dist.is_initialized():
        # NCCL between GPUs, gloo between CPU ranks; torchrun describes the group in the environment.
        timeout = None
        if training:
            # The flight recorder is read from the environment when the group is created. Readers of a run write
            # nothing into its folder, and keep torch's timeouts.
            set_flight_recorder_env(plan.config.comm, plan.config.job.dump_folder, device)
            timeout = timedelta(seconds=plan.config.comm.init_timeout_seconds + BACKSTOP_SECONDS)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None, timeout=timeout)
    plan.build_mesh(device.type)
    if training and plan.parallel.distributed:
        set_backstop_timeouts(plan.config.comm)
    return device


def build_model(args: ModelArgs, device: torch.device | str, seed: int = 0, parallelize=None) -> Transformer:
    """Construct on the meta device (no memory, no init work), apply `parallelize` there, then materialise on
    `device` and initialise from `seed` (the same full weights whatever `parallelize` did). With `device` meta, the
    parallelized model stays there: its shapes, not its values (the planner's view)."""
    device = torch.device(device)
    with torch.device("meta"):
        model = Transformer(args)
    if parallelize is not None:
        parallelize(model)
    if device.type != "meta":
        model.to_empty(device=device)
        init_model_weights(model, seed)
    return model


def build_planned_model(plan: RunPlan, device: torch.device, recorder: ReadRecorder | None = None) -> Transformer:
    """The plan's model on this rank: parallelized as the plan says, materialised on `device` and initialised."""

    def parallelize(model: Transformer) -> None:
        parallelize_model(model, plan.parallel, plan.config, bf16=plan.autocast_dtype == torch.bfloat16,
                          value_layout=plan.value_slice_sharding, recorder=recorder)

    return build_model(plan.model_args, device, plan.config.training.seed, parallelize)


def build_run(plan: RunPlan, purpose: Purpose | None = None) -> Run:
    """Everything a run needs before its loop, built from `plan` for `purpose` (default: the plan's)."""
    purpose = purpose or plan.purpose
    config = plan.config
    device = setup_process(plan)
    rank = dist.get_rank() if dist.is_initialized() else 0
    # Training writes into its dump folder: one run at a time. Readers only read.
    lock = acquire_run_lock(config.job.dump_folder, rank) if purpose == "train" else None
    try:
        tokenizer = build_tokenizer(config.tokenizer)
        dataloader = recorder = None
        if purpose == "train":
            dp_rank, dp_size = plan.parallel.data_parallel_position()
            dataloader = build_dataloader(config, plan.data_source, tokenizer, dp_rank, dp_size, device)
            if plan.value_optimizer_spec is not None and plan.value_optimizer_spec.rowwise:
                recorder = ReadRecorder()
        model = build_planned_model(plan, device, recorder)
        if purpose in ("eval", "generate", "export"):
            load_model_weights(model, plan.checkpoint_to_load, verify=config.checkpoint.verify_on_load,
                               threads=config.checkpoint.io_threads)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return Run(plan=plan, device=device, rank=rank, tokenizer=tokenizer, model=model, dataloader=dataloader,
               recorder=recorder, lock=lock)
