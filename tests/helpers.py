"""Shared test helpers: a small CPU config, and a worker that runs training steps as one rank of a gloo group."""

import os
import socket

from titanmem.config import JobConfig


# fp32's unit roundoff: one rounding errs by at most this fraction of its result.
FP32_UNIT = 2.0**-24


def assert_close_in_scale(actual, expected, relative: float, msg: str = "") -> None:
    """Every element of `actual` within `relative` × max|expected| of `expected` (both compared in float64).

    Floating-point sums err relative to the magnitude of their terms, not of their result: a gradient element that
    comes out small because large terms cancel carries their rounding error. Another summation order (another BLAS,
    another blocking of a matmul, a batch split over ranks) moves such an element by far more than an element-wise
    rtol allows, though nothing is wrong. So the bound scales with the tensor's largest element, and `relative`
    follows from the arithmetic (how many fp32 roundings can add up, times FP32_UNIT, with a margin; for the long
    chains of a whole model's backward, what was seen, with a margin), stated where the check is made. A real fault (a missing term, a wrong scale, a swapped row) moves elements by a sizeable fraction
    of the scale, far above such bounds. An all-zero `expected` must be matched exactly."""
    import torch

    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=0, atol=relative * scale,
                               msg=lambda m: f"{msg + ': ' if msg else ''}{m}\n(bound {relative:g} × max|expected| "
                                             f"{scale:.4g})")


def free_port() -> int:
    """A free TCP port on this host for a gloo group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_command_line(argv: list[str], purpose: str = "train"):
    """Parse `argv` and resolve its run plan, as every entry point does before building anything."""
    from titanmem.config import build_config
    from titanmem.plan import resolve_plan

    config, _ = build_config(argv)
    return resolve_plan(config, purpose)


def make_config(dump_folder, **sections) -> JobConfig:
    """A small CPU run on the bundled corpus; `sections` maps a section name to field overrides."""
    config = JobConfig()
    config.job.dump_folder = str(dump_folder)
    config.training.steps = 20
    config.training.seq_len = 64
    config.training.local_batch_size = 4
    config.training.device = "cpu"
    config.optimizer.lr = 3e-3
    config.lr_scheduler.warmup_steps = 4
    config.metrics.log_freq = 5
    config.metrics.enable_tensorboard = False
    config.checkpoint.enable = False
    for section, values in sections.items():
        for key, value in values.items():
            setattr(getattr(config, section), key, value)
    return config


def train_tiny_run(folder, **sections) -> None:
    """Train the debug Memory+ model (or the `memory` section given) for 3 steps of 2 × 32 tokens in this process,
    saving checkpoints into `folder` (per `sections`, e.g. checkpoint={"enable": True, "interval": 3})."""
    from titanmem.train import Trainer

    sections = {"memory": {"enabled": True}, **sections}
    trainer = Trainer(make_config(folder, training={"steps": 3, "seq_len": 32, "local_batch_size": 2}, **sections))
    trainer.train()
    trainer.close()


def crash_after(trainer, step: int) -> None:
    """Make `trainer` raise KeyboardInterrupt at the start of its first step past `step`: a crash between steps."""
    original = trainer.train_step

    def crashing(batches):
        if trainer.train_state.step > step:
            raise KeyboardInterrupt
        return original(batches)

    trainer.train_step = crashing


def train_run(config, crash_after_step: int | None = None):
    """Train `config` in this process, optionally crashing (KeyboardInterrupt) after `crash_after_step`; returns the
    losses by step and the closed trainer."""
    from titanmem.train import Trainer

    trainer = Trainer(config)
    if crash_after_step is not None:
        crash_after(trainer, crash_after_step)
    try:
        return trainer.train(), trainer
    finally:
        trainer.close()


def reader_argv(folder, *extra) -> list[str]:
    """The command line of a reader (eval, generate) of a `train_tiny_run` folder."""
    return ["--job.dump_folder", str(folder), "--memory.enabled", "--training.device", "cpu", "--training.seq_len",
            "32", "--checkpoint.enable", *extra]


def run_as_rank(rank: int, world: int, port: int, body) -> None:
    """Run `body()` as rank `rank` of a gloo group on this host, then leave the process at once."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist

    # The ranks share this machine's cores: more threads each than cores to go round only contend.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    code = 0
    try:
        body()
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        # Processes that used gloo collectives sometimes abort at interpreter exit ("terminate called without an
        # active exception"); leaving at once avoids it.
        os._exit(code)


def full_weights(model) -> dict:
    """The model's full (unsharded) weights by name, on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {name: tensor.detach().clone() for name, tensor in state.items()}


def data_parallel_worker(rank: int, world: int, port: int, folder: str, sections: dict, batches_path: str) -> None:
    """One rank: train on its slice of each global batch, from the plan's own initialisation; rank 0 saves the
    initial full weights, the losses and every step's full (unsharded) gradients into result.pt."""
    run_as_rank(rank, world, port, lambda: _train_and_record(rank, folder, sections, batches_path,
                                                             os.path.join(folder, "result.pt")))


def data_parallel_runs_worker(rank: int, world: int, port: int, folder: str, runs: dict[str, dict],
                              batches_path: str) -> None:
    """`data_parallel_worker` for several runs in one launch (named `runs`, each with a process group of its own):
    rank 0 saves result-NAME.pt for each. Spawning and importing once saves seconds per run."""

    def next_port():
        # Agreed on over the closing run's group: a port chosen in advance could be taken by then (by that group's
        # own connections, say).
        import torch.distributed as dist

        chosen = [free_port() if rank == 0 else None]
        dist.broadcast_object_list(chosen, src=0)
        os.environ["MASTER_PORT"] = str(chosen[0])

    def body():
        for name, sections in runs.items():
            _train_and_record(rank, os.path.join(folder, name), sections, batches_path,
                              os.path.join(folder, f"result-{name}.pt"), before_close=next_port)

    run_as_rank(rank, world, port, body)


def _train_and_record(rank: int, folder: str, sections: dict, batches_path: str, result_path: str,
                      before_close=None) -> None:
    import torch
    from torch.distributed.tensor import DTensor

    from titanmem.train import Trainer
    from titanmem.utils import local_tensor

    def full(t):
        return t.full_tensor() if isinstance(t, DTensor) else t

    trainer = Trainer(make_config(os.path.join(folder, f"rank{rank}"), **sections))
    data = torch.load(batches_path)
    initial = full_weights(trainer.model)
    losses, grads, value_norms = [], [], []
    for batch in data["batches"]:
        # Data-parallel peers split the batch; tensor-parallel peers share their slice.
        share = batch.shape[0] // trainer.dp_world_size
        mine = batch[trainer.dp_rank * share : (trainer.dp_rank + 1) * share]
        metrics = trainer.train_step(iter([{"input": mine[:, :-1], "labels": mine[:, 1:]}]))
        losses.append(metrics["loss"])
        value_norms.append(metrics.get("value_grad_norm"))
        grads.append({n: full(p.grad).clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
    # The table after the last update: the only trace of a row-wise optimizer's work (no autograd gradient).
    table = full(trainer.model.memory_values.weight.detach()).clone()
    # The share of the sub-keys this rank stores (they are sharded over dp_shard, which holds the mp groups), and of
    # the value table.
    subkeys = next(p for n, p in trainer.model.named_parameters() if n.endswith("subkeys"))
    table_share = local_tensor(trainer.model.memory_values.weight).numel() / table.numel()
    if rank == 0:
        torch.save({"initial": initial, "losses": losses, "grads": grads, "table": table,
                    "value_grad_norms": value_norms, "subkey_share": local_tensor(subkeys).numel() / subkeys.numel(),
                    "table_share": table_share, "layout": trainer.plan.value_slice_sharding},
                   result_path)
    if before_close is not None:
        before_close()
    trainer.close()


def train_worker(rank: int, world: int, port: int, folder: str, sections: dict, result_name: str) -> None:
    """One rank of a full `Trainer.train()` run (data loader, checkpoints and all); rank 0 saves the losses."""

    def body():
        import torch

        from titanmem.train import Trainer

        trainer = Trainer(make_config(folder, **sections))
        losses = trainer.train()
        if rank == 0:
            torch.save(losses, os.path.join(folder, result_name))
        trainer.close()

    run_as_rank(rank, world, port, body)


def count_reads_worker(rank: int, world: int, port: int, argv: list[str]) -> None:
    """One rank of titanmem-count-reads (as torchrun would start it); a non-zero exit fails the rank."""

    def body():
        from titanmem import count_memory_reads

        code = count_memory_reads.main(argv)
        if code:
            raise SystemExit(f"count_memory_reads exited with {code}")

    run_as_rank(rank, world, port, body)


def column_parallel_worker(rank: int, world: int, port: int, folder: str) -> None:
    """One rank of the column-parallel lookup check: its tokens, its column slice; saves out and grads."""

    def body():
        import torch
        import torch.distributed as dist

        from titanmem.distributed.memory_parallel import column_parallel_lookup
        from titanmem.models.lookup import torch_weighted_bag

        dist.init_process_group("gloo")
        data = torch.load(os.path.join(folder, "inputs.pt"))
        columns = data["values"].shape[1] // world
        values = data["values"][:, rank * columns : (rank + 1) * columns].clone().requires_grad_(True)
        weights = data["weights"][rank].clone().requires_grad_(True)
        out = column_parallel_lookup(values, data["indices"][rank], weights, dist.group.WORLD, torch_weighted_bag)
        out.backward(data["grad_out"][rank])
        torch.save({"out": out.detach(), "grad_values": values.grad, "grad_weights": weights.grad},
                   os.path.join(folder, f"rank{rank}.pt"))

    run_as_rank(rank, world, port, body)


def full_training_state(trainer) -> dict:
    """The model's full weights and the optimizers' full states (dense AdamW moments and step counts, and the
    row-wise value optimizer's tables), by name, on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    from torch.distributed.tensor import DTensor

    options = StateDictOptions(full_state_dict=True, flatten_optimizer_state_dict=True)
    dense = get_optimizer_state_dict(trainer.model, trainer.optimizers.dense, options=options)
    state = {f"model.{name}": tensor for name, tensor in full_weights(trainer.model).items()}
    state.update({f"optimizer.{key}": value.detach().clone() for key, value in dense.items()
                  if key.startswith("state.")})
    values = trainer.optimizers.values
    if values is not None:
        for name in ("first", "second"):
            table = values._as_table(getattr(values, name))
            state[f"values.{name}"] = (table.full_tensor() if isinstance(table, DTensor) else table).clone()
        state["values.steps"] = int(values.steps)
    return state


def resume_worker(rank: int, world: int, port: int, folder: str, sections: dict, batches_path: str,
                  phase: str) -> None:
    """One rank of a save on one plan (`phase` "save": 2 steps, save, then the 3rd step) or of its load on another
    ("load": restore, then the 3rd step); rank 0 writes the full state and the 3rd step's loss to `<phase>.pt`."""

    def body():
        import torch

        from titanmem.train import Trainer

        trainer = Trainer(make_config(folder, **sections))
        batches = torch.load(batches_path)["batches"]

        def step(batch):
            share = batch.shape[0] // trainer.dp_world_size
            mine = batch[trainer.dp_rank * share : (trainer.dp_rank + 1) * share]
            trainer.train_state.step += 1
            return trainer.train_step(iter([{"input": mine[:, :-1], "labels": mine[:, 1:]}]))["loss"]

        if phase == "save":
            for batch in batches[:2]:
                step(batch)
            trainer.checkpointer.save(trainer.train_state.step)
        else:
            assert trainer.checkpointer.load(trainer.plan.checkpoint_to_load) == 2
        state = full_training_state(trainer)
        loss = step(batches[2])
        if rank == 0:
            torch.save({"state": state, "loss": loss}, os.path.join(folder, f"{phase}.pt"))
        trainer.close()

    run_as_rank(rank, world, port, body)


def resave_worker(rank: int, world: int, port: int, folder: str, sections: dict) -> None:
    """One rank of a run that starts from `checkpoint.initial_load_path` (its whole state) and saves it again at
    once, under this run's plan."""

    def body():
        from titanmem.train import Trainer

        trainer = Trainer(make_config(folder, **sections))
        trainer._initial_load(trainer.plan.initial_load)
        trainer.checkpointer.save(trainer.train_state.step)
        trainer.close()

    run_as_rank(rank, world, port, body)


def write_config_error(folder: str, rank: int, attempt, success: str) -> None:
    """Run `attempt()` and write the config error it raised, or `success`, to `<folder>/rank<N>.txt`."""
    from titanmem.config import ConfigError

    try:
        attempt()
        message = success
    except ConfigError as e:
        message = str(e)
    with open(os.path.join(folder, f"rank{rank}.txt"), "w") as handle:
        handle.write(message)


def refused_trainer_worker(rank: int, world: int, port: int, folder: str, sections: dict) -> None:
    """One rank of a run expected to be refused at start-up: writes the config error it got to `rank<N>.txt`."""

    def body():
        from titanmem.train import Trainer

        write_config_error(folder, rank, lambda: Trainer(make_config(folder, **sections)).close(), "started")

    run_as_rank(rank, world, port, body)


def disagreeing_load_worker(rank: int, world: int, port: int, folder: str) -> None:
    """One rank of a load whose ranks planned different checkpoints (rank r: the r-th complete one, as nodes that see
    the folder differently would): writes the config error it got to `rank<N>.txt`."""

    def body():
        import torch.distributed as dist

        from titanmem.components.checkpoint import CheckpointManager, complete_checkpoint_steps
        from titanmem.config.sections import Checkpoint

        dist.init_process_group("gloo")
        checkpoints = os.path.join(folder, "checkpoint")
        step = complete_checkpoint_steps(checkpoints)[rank]
        manager = CheckpointManager(Checkpoint(), checkpoints, {}, total_steps=10, rank=rank)
        write_config_error(folder, rank, lambda: manager.load(os.path.join(checkpoints, f"step-{step}")), "loaded")

    run_as_rank(rank, world, port, body)


def local_shapes_worker(rank: int, world: int, port: int, folder: str, argv: list, device_type: str) -> None:
    """One rank of a real (gloo) build of the plan of `argv`: rank 0 saves every parameter's local shape."""

    def body():
        import torch

        from titanmem.build import build_planned_model
        from titanmem.config import build_config
        from titanmem.plan import resolve_plan

        config, _ = build_config(argv)
        plan = resolve_plan(config, "dry_run", world_size=world, device_type=device_type)
        import torch.distributed as dist

        dist.init_process_group("gloo")
        plan.build_mesh("cpu")
        model = build_planned_model(plan, torch.device("meta"))
        shapes = {name: tuple((p.to_local() if hasattr(p, "to_local") else p).shape)
                  for name, p in model.named_parameters()}
        if rank == 0:
            torch.save(shapes, os.path.join(folder, "shapes.pt"))

    run_as_rank(rank, world, port, body)


def decode_worker(rank: int, world: int, port: int, folder: str, sections: dict, prompts: list) -> None:
    """One rank: greedy decoding of `prompts` with the KV cache by the plan's model (collective); rank 0 saves the
    tokens, the model's full weights and its args, for a one-process reference."""

    def body():
        import torch

        from titanmem.eval.decode import generate
        from titanmem.train import Trainer

        trainer = Trainer(make_config(folder, **sections))
        trainer.model.eval()
        decoded = generate(trainer.model, prompts, 6, trainer.run.tokenizer.eos_id, trainer.device, batch_size=3,
                           sequence_multiple=trainer.dims.tp)
        weights = full_weights(trainer.model)
        if rank == 0:
            torch.save({"decoded": decoded, "weights": weights, "args": trainer.plan.model_args,
                        "eos_id": trainer.run.tokenizer.eos_id}, os.path.join(folder, "decoded.pt"))
        trainer.close()

    run_as_rank(rank, world, port, body)


def launch_ranks(worker, world: int, *args) -> None:
    """Run `worker(rank, world, port, *args)` as `world` local processes and wait for them all (an error if one
    failed). The processes fork from a server process that imported titanmem's trainer once (multiprocessing's
    forkserver), so a rank starts at once instead of spending seconds importing torch, DCP, datasets and Triton;
    unlike fork, no rank inherits the test process's threads or state. Each rank gets this process's environment as
    it is now, as a spawned one would; only what the preloaded modules read at import comes from the server's start
    (the conftest's settings)."""
    import multiprocessing

    import torch.multiprocessing as mp

    # What every rank would import: the trainer, and what it imports on first use (dynamo, Triton and its kernels).
    multiprocessing.get_context("forkserver").set_forkserver_preload(
        ["helpers", "titanmem.train", "torch._dynamo", "titanmem.kernels.embedding_bag", "titanmem.kernels.row_update",
         "titanmem.components.row_update_torch"])
    mp.start_processes(_rank_in_environment, args=(dict(os.environ), worker, world, free_port(), *args), nprocs=world,
                       join=True, start_method="forkserver")


def _rank_in_environment(rank: int, environment: dict, worker, world: int, port: int, *args) -> None:
    os.environ.clear()
    os.environ.update(environment)
    worker(rank, world, port, *args)


def poison_gradients_at(trainer, bad_step):
    """Make step `bad_step` non-finite: a NaN in the first parameter's gradient."""
    original = trainer.forward_backward

    def forward_backward(inputs, labels):
        loss = original(inputs, labels)
        if trainer.train_state.step == bad_step:
            next(trainer.model.parameters()).grad.fill_(float("nan"))
        return loss

    trainer.forward_backward = forward_backward
