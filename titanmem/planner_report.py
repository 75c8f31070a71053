"""Will this config train on this cluster, and on which mesh? Per-GPU memory of its plan, the meshes that fit ranked
by estimated step time, and the paper's layout of the same model for comparison (titanmem/planner.py; docs/planner.md
explains every line).

    titanmem-plan --nodes 1 --gpus_per_node 8 --gb_per_gpu 80 \\
        --job.config_file train_configs/llama_8b_memory_128b.toml [--section.key value ...]

`--dry_run` only builds the mesh and the parallelized model of the whole world on this CPU, under a fake process
group, and prints what rank 0 holds: proof that the plan is constructible, with no GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings

from titanmem.config import ConfigError, build_config
from titanmem.entry import ends_in_one_line
from titanmem.planner import (
    GB, HEADROOM_FRACTION, HEADROOM_MIN_BYTES, Cluster, Estimate, build_meta, estimate_config, fake_world,
    paper_layout, paper_layout_gpus, rank_plans, resolve_for,
)
from titanmem.utils import print_error

# The mesh's HSDP view slices a flattened dim, which torch announces it will deprecate: noise in a report.
warnings.filterwarnings("ignore", message="Slicing a flattened dim from root mesh")


def gb(value: float) -> str:
    return f"{value / GB:,.1f}"


def print_estimate(found: Estimate, cluster: Cluster) -> None:
    print("| per GPU | GB | what |")
    print("| --- | ---: | --- |")
    for what, size, how in found.rows:
        print(f"| {what} | {gb(size)} | {how} |")
    print(f"| **needed** | **{gb(found.needed)}** | |")
    print(f"| allocator headroom | {gb(found.headroom)} | {HEADROOM_FRACTION:.0%} of the GPU, at least "
          f"{HEADROOM_MIN_BYTES / GB:.0f} GB: CUDA context, NCCL, fragmentation |")
    verdict = "fits" if found.fits(cluster) else "does NOT fit"
    print(f"| **total** | **{gb(found.total)}** | of {cluster.gb_per_gpu:g} GB: **{verdict}** |")


def describe_model(found: Estimate) -> str:
    args = found.plan.model_args
    text = f"{found.plan.config.model.name}/{found.plan.config.model.flavor}: dim {args.dim}, {args.n_layers} layers"
    if args.memory is not None:
        m = args.memory
        text += (f"; memory layers in blocks {list(m.layers)}, {m.n_values:,} values × {m.v_dim} "
                 f"({m.n_values * m.v_dim / 1e9:,.1f}B value parameters)")
    training = found.plan.config.training
    tokens = found.plan.tokens_per_step
    return text + f"; {tokens:,} tokens per step ({training.local_batch_size} × {training.seq_len} per rank)"


def dry_run(config, cluster: Cluster) -> None:
    plan = resolve_for(config, cluster.world)
    with fake_world(cluster.world) if cluster.world > 1 else contextlib.nullcontext():
        model = build_meta(plan)
        dims = plan.parallel
        shape, names = dims.mesh_shape()
        print(f"built on a fake process group of {cluster.world} ranks: mesh {dict(zip(names, shape))}")
        table = model.memory_values.weight if model.memory_values is not None else None
        for name, parameter in model.named_parameters():
            if parameter is table or name.endswith(("layers.0.attention.wq.weight", "output.weight",
                                                    "tok_embeddings.weight")):
                local = parameter.to_local() if hasattr(parameter, "to_local") else parameter
                placements = getattr(parameter, "placements", None)
                print(f"  {name}: global {list(parameter.shape)}, rank 0 holds {list(local.shape)}"
                      + (f" ({', '.join(map(str, placements))})" if placements else ""))


@ends_in_one_line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=True)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus_per_node", type=int, default=8)
    parser.add_argument("--gb_per_gpu", type=float, default=80.0, help="memory per GPU (80 for an H100)")
    parser.add_argument("--dry_run", action="store_true", help="only build the mesh and the parallelized model")
    parser.add_argument("--no_search", action="store_true", help="only the config's own plan, no ranking")
    parser.add_argument("--top", type=int, default=10, help="how many fitting meshes to list")
    args, overrides = parser.parse_known_args(argv)
    if args.nodes < 1 or args.gpus_per_node < 1 or args.gb_per_gpu <= 0:
        print_error("--nodes, --gpus_per_node and --gb_per_gpu must be positive")
        return 2
    cluster = Cluster(args.nodes, args.gpus_per_node, args.gb_per_gpu)
    config, _ = build_config(overrides)
    if args.dry_run:
        dry_run(config, cluster)
        return 0
    own = estimate_config(config, cluster)
    print(f"# {config.job.config_file or 'default config'} on {cluster.describe()} ({cluster.world} GPUs)\n")
    print(describe_model(own) + "\n")
    print(f"Its plan: {own.layout()}\n")
    print_estimate(own, cluster)
    if not args.no_search:
        print_ranking(config, cluster, args.top)
    if own.plan.model_args.memory is not None:
        print_paper_layout(config, cluster)
    return 0


def print_ranking(config, cluster: Cluster, top: int) -> None:
    fitting, failing = rank_plans(config, cluster)
    print(f"\n## Meshes that fit, fastest first ({len(fitting)} of {len(fitting) + len(failing)} that resolve)\n")
    print("Estimated step time: compute at the rates measured on one GPU (titanmem/step_model.py: matmuls, "
          "elementwise work, lookups, optimizer, value update), plus TP exchanges and the value table's exchanges by "
          "its layout (critical path), plus FSDP traffic the compute cannot hide; NVLink 450 GB/s within a node, "
          "50 GB/s per GPU between nodes. Ranked by tokens/s per GPU, since tp ranks share a batch.\n")
    print("| # | mesh | GB per GPU | tokens per step | step s (est.) | of which exchanges s | tokens/s per GPU (est.) |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for index, found in enumerate(fitting[:top], start=1):
        print(f"| {index} | {found.layout()} | {gb(found.total)} | {found.plan.tokens_per_step:,} | "
              f"{found.step_seconds:.2f} | {found.comm_seconds:.2f} | {found.tokens_per_gpu_second:,.0f} |")
    if len(fitting) > top:
        print(f"\n({len(fitting) - top} more fit; --top N lists more.)")
    if failing:
        closest = failing[0]
        print(f"\nClosest that does not fit: {closest.layout()}, {gb(closest.total)} GB per GPU.")


def print_paper_layout(config, cluster: Cluster) -> None:
    print("\n## The paper's layout: fp32 table, a whole column slice per GPU, dense gradient and dense AdamW\n")
    paper = paper_layout(config)
    here = None
    try:
        here = estimate_config(paper, cluster)
        print(f"On {cluster.describe()}: {here.layout()}: {gb(here.total)} GB per GPU: "
              f"{'fits' if here.fits(cluster) else 'does NOT fit'}.")
        table = next((size for what, size, _ in here.rows if what == "value-table slice"), 0)
        print(f"  of which the table slice {gb(table)} GB and its gradient and AdamW moments "
              f"{gb(sum(size for what, size, _ in here.rows if what in ('value gradients', 'value optimizer state')))} GB")
    except ConfigError as e:
        print(f"On {cluster.describe()}: does not resolve ({e.problem})")
    if here is not None and here.fits(cluster):
        return
    needed = paper_layout_gpus(config, cluster)
    if needed is None:
        print("It fits on no world of up to 64 such nodes (with the columns split over every GPU of a world whose size "
              "divides v_dim).")
    else:
        print(f"It first fits on {needed.plan.world_size} GPUs ({needed.plan.world_size // cluster.gpus_per_node} "
              f"node(s)), with the columns split over all of them: {gb(needed.total)} GB per GPU.")


if __name__ == "__main__":
    sys.exit(main())
