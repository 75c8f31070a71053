"""One GPU's share of a multi-GPU plan, trained for real on one GPU: the proof that a plan fits, before booking it.

The process joins a fake process group of the plan's world size as rank 0 (`titanmem.planner.fake_world`), so the
build path gives it exactly rank 0's shards: its FSDP share of the dense model, its column slice of the value table,
its optimizer states, and the activations of its micro-batch. The other ranks are stood in for by loopback
collectives: every all-gather fills the other ranks' parts with this rank's own shard, a reduce-scatter keeps this
rank's part of the input, and an all-to-all returns the input (recent torch's fake group does this itself; on one
that does not, the collectives are wrapped to). Every buffer a collective would fill is then
allocated and holds finite values of the right scale, so memory and per-rank compute are rank 0's, while
communication costs nothing (the planner's exchange estimate says what it adds). A rows-sharded table
(`value_slice_sharding = "rows"`) thus receives every rank's reads as copies of its own, and bags and updates the
pairs of its own row block among them, as its share of a real run does; a replicated slice gathers R copies of its
records and updates from all of them. The process is capped at `--gb_per_gpu` (80: an H100) with
`torch.cuda.set_per_process_memory_fraction`. Besides the step time it reports the value update's (the row-wise
optimizer's norm and fused update), the part of the step that grows with the slice's replicas under `replicate`.

    titanmem-weak-scale --world 8 --gb_per_gpu 80 --steps 20 \\
        --job.config_file train_configs/llama_8b_memory_128b.toml
    # the paper's layout of the same share: expect an out-of-memory report
    titanmem-weak-scale --world 8 --gb_per_gpu 80 --steps 3 --paper_layout \\
        --job.config_file train_configs/llama_8b_memory_128b.toml
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist

from titanmem.config import build_config
from titanmem.data.files import resolve_data_source
from titanmem.entry import ends_in_one_line
from titanmem.plan import resolve_plan
from titanmem.planner import Cluster, build_meta, estimate, fake_world, paper_layout
from titanmem.train import Trainer
from titanmem.utils import print_error


def _tensors_and_group(args: tuple, kwargs: dict, group_position: int):
    """(output, input, group) of a collective called positionally or by keyword, under any of torch's names."""
    output = args[0] if args else kwargs.get("output_tensor", kwargs.get("output"))
    input = args[1] if len(args) > 1 else kwargs.get("input_tensor", kwargs.get("input"))
    group = args[group_position] if len(args) > group_position else kwargs.get("group")
    return output, input, group


def fake_group_loops_back() -> bool:
    """Whether this torch's fake process group already fills an all-gather with the local input and keeps a
    reduce-scatter's local part (recent versions do)."""
    world = dist.get_world_size()
    output, scattered = torch.full((2 * world,), -1.0), torch.full((1,), -1.0)
    dist.all_gather_into_tensor(output, torch.ones(2))
    dist.reduce_scatter_tensor(scattered, torch.arange(float(world)))
    return bool((output == 1).all()) and scattered.item() == 0.0


def loopback_collectives() -> None:
    """Make the data collectives of a fake process group behave as if every rank held this rank's data (torch's
    names for them differ between versions: all are wrapped)."""

    def gathering(original):
        def all_gather(*args, **kwargs):
            output, input, group = _tensors_and_group(args, kwargs, 2)
            for part in output.view(-1).view(dist.get_world_size(group), -1):
                part.copy_(input.reshape(-1))
            return original(*args, **kwargs)
        return all_gather

    def scattering(original, group_position):
        def reduce_scatter(*args, **kwargs):
            output, input, group = _tensors_and_group(args, kwargs, group_position)
            output.view(-1).copy_(input.reshape(dist.get_world_size(group), -1)[0])
            return original(*args, **kwargs)
        return reduce_scatter

    def exchanging(original):
        def all_to_all(*args, **kwargs):
            output, input, _ = _tensors_and_group(args, kwargs, 4)
            output.copy_(input)
            return original(*args, **kwargs)
        return all_to_all

    for name in ("all_gather_into_tensor", "all_gather_single"):
        if hasattr(dist, name):
            setattr(dist, name, gathering(getattr(dist, name)))
    # Both take (output, input, op, group, ...).
    for name, group_position in (("reduce_scatter_tensor", 3), ("reduce_scatter_single", 3)):
        if hasattr(dist, name):
            setattr(dist, name, scattering(getattr(dist, name), group_position))
    dist.all_to_all_single = exchanging(dist.all_to_all_single)


@ends_in_one_line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, required=True, help="GPUs of the plan whose rank 0 this GPU holds")
    parser.add_argument("--gpus_per_node", type=int, default=8)
    parser.add_argument("--gb_per_gpu", type=float, default=80.0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: the same run on this CPU, without memory figures (how CI checks the tool)")
    parser.add_argument("--paper_layout", action="store_true",
                        help="the paper's layout of the same model: fp32 table, dense gradient and AdamW")
    args, overrides = parser.parse_known_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print_error("no GPU here; the weak-scaling run needs one (--device cpu runs it without memory figures)")
        return 2
    cap = args.gb_per_gpu * 1e9
    if cuda:
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / torch.cuda.get_device_properties(0).total_memory))
    else:
        overrides += ["--training.device", "cpu"]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE=str(args.world))
    # A scratch dump folder of its own: the measuring run must not write into (or lock) a real run's folder.
    scratch = tempfile.mkdtemp(prefix="titanmem_weak_scale_")
    try:
        config, _ = build_config([*overrides, "--training.steps", str(args.steps), "--checkpoint.enable", "false",
                                  "--eval.interval", "0", "--metrics.log_freq", "1", "--metrics.enable_tensorboard",
                                  "false", "--metrics.memory_telemetry_freq", "0", "--job.dump_folder", scratch])
        if args.paper_layout:
            config = paper_layout(config)
        cluster = Cluster(args.world // args.gpus_per_node or 1, min(args.world, args.gpus_per_node), args.gb_per_gpu)
        # dry_run: the paper's layout is to be tried for real, not refused by the pre-flight check.
        plan = resolve_plan(config, "dry_run", world_size=args.world, device_type=args.device)
        with fake_world(args.world):
            if not fake_group_loops_back():
                loopback_collectives()
            expected = estimate(plan, build_meta(plan), cluster)  # before the cap's allocations: on the meta device
            print(f"rank 0 of {args.world}: {expected.layout()}; planner: {expected.needed / 1e9:.1f} GB needed, "
                  f"{expected.total / 1e9:.1f} GB with headroom, of a {cap / 1e9:.0f} GB cap", flush=True)
            return train(config, plan, args.steps, cap, cuda)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def train(config, plan, steps: int, cap: float, cuda: bool) -> int:
    """Train `steps` steps of rank 0's share under the memory cap; print each step and, at the end, the peak memory
    and the median step and value-update times of the steady steps (the last three quarters)."""
    # A plan of its own (the estimate's holds CPU meshes), with the data a training plan resolves; not the training
    # plan's fit check, which would refuse the paper's layout before this run can show where it runs out.
    plan = resolve_plan(config, "dry_run", world_size=plan.world_size, device_type="cuda" if cuda else "cpu")
    plan = dataclasses.replace(plan, data_source=resolve_data_source(config.data))

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def peak() -> str:
        return f", peak {torch.cuda.max_memory_allocated() / 1e9:.2f} GB" if cuda else ""

    reset = torch.cuda.reset_peak_memory_stats
    if cuda:
        reset()
        torch.cuda.reset_peak_memory_stats = lambda *a, **k: None  # the whole run's peak, not the last window's
    times, update_times, trainer, built = [], [], None, 0

    @contextlib.contextmanager
    def time_value_update(phase: str):
        if phase != "value update":
            yield
            return
        sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            sync()
            update_times.append(time.perf_counter() - start)

    try:
        trainer = Trainer(config, plan, phase_timer=time_value_update)
        built = torch.cuda.memory_allocated() if cuda else 0
        batches = iter(trainer.dataloader)
        trainer.model.train()
        for step in range(1, steps + 1):
            sync()
            start = time.perf_counter()
            trainer.train_state.step = step
            metrics = trainer.train_step(batches)
            sync()
            times.append(time.perf_counter() - start)
            print(f"step {step}: loss {metrics['loss']:.4f}, {times[-1]:.3f} s{peak()}", flush=True)
    except torch.OutOfMemoryError as e:
        print(f"out of memory under the {cap / 1e9:.0f} GB cap at step {len(times) + 1}"
              f"{' (building the model)' if trainer is None else ''}, with {torch.cuda.memory_allocated() / 1e9:.1f} "
              f"GB allocated: {str(e).splitlines()[0]}", flush=True)
        return 1
    finally:
        torch.cuda.reset_peak_memory_stats = reset
        if trainer is not None:
            trainer.metrics.close()
            if trainer.run.lock is not None:
                trainer.run.lock.release()
    steady = times[len(times) // 4:]
    tokens = plan.config.training.local_batch_size * plan.config.training.seq_len
    memory = (f"after the build: {built / 1e9:.2f} GB allocated; peak over {steps} steps: "
              f"{torch.cuda.max_memory_allocated() / 1e9:.2f} GB allocated, "
              f"{torch.cuda.max_memory_reserved() / 1e9:.2f} GB reserved; ") if cuda else ""
    # Two timed calls a step (the norm, then the update): their sums per step, over the same steady steps.
    per_step = [sum(update_times[i:i + 2]) for i in range(0, len(update_times), 2)][len(times) - len(steady):]
    update = f", value update median {statistics.median(per_step) * 1e3:.1f} ms" if per_step else ""
    print(f"{memory}step time (steps {len(times) - len(steady) + 1}-{steps}): median {statistics.median(steady):.3f} s, "
          f"{tokens / statistics.median(steady):,.0f} tokens/s on this GPU (no communication){update}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
