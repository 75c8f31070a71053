"""Check that a plan's full initial weights equal one process's, bit for bit, and time the initialisation.

    titanmem-check-init --reference FILE [config overrides]                      # one process: writes FILE
    torchrun --nproc_per_node N -m titanmem.check_init --reference FILE [...]    # any plan: compares with FILE
    titanmem-check-init --time [config overrides]                                # one process: init time only

Builds the model through the run's build path (the plan's parallelism applied on the meta device, then each rank
draws only its shards), gathers the full weights, and prints one markdown row: the plan, the parameters compared,
how many are bit-identical, the largest difference, and the seconds the build took.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from titanmem.build import build_planned_model, setup_process
from titanmem.config import build_config
from titanmem.entry import ends_in_one_line
from titanmem.plan import resolve_plan


@ends_in_one_line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference", help="file of the one-process weights: written on 1 process, read on N")
    parser.add_argument("--time", action="store_true", help="only time the initialisation")
    args, overrides = parser.parse_known_args(argv)
    config, _ = build_config(overrides)
    plan = resolve_plan(config, "dry_run")
    device = setup_process(plan)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    model = build_planned_model(plan, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    rank = dist.get_rank() if dist.is_initialized() else 0
    p = plan.parallel
    name = f"dp_replicate {p.dp_replicate} × dp_shard {p.dp_shard} × tp {p.tp}, mp {p.mp}"
    if args.time:
        params = sum(t.numel() for t in model.parameters())
        if rank == 0:
            print(f"| {config.model.flavor} | {name} | {params / 1e9:.2f}B | {seconds:.2f} s |")
        return 0
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        if plan.world_size == 1:
            torch.save(full, args.reference)
            print(f"| {name} (reference) | {len(full)} | {len(full)} | 0 | {seconds:.2f} s |")
        else:
            reference = torch.load(args.reference)
            equal = sum(torch.equal(full[k], reference[k]) for k in reference)
            worst = max((full[k].double() - reference[k].double()).abs().max().item() for k in reference)
            print(f"| {name} | {len(reference)} | {equal} | {worst:.3g} | {seconds:.2f} s |")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
