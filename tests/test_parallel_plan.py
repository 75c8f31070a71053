"""The parallel plan's checks: every invalid plan fails before any model or process group exists."""

import pathlib
import sys

import pytest

from helpers import check_command_line
from titanmem.config import ConfigError, build_config
from titanmem.distributed import ParallelDims
from titanmem.plan import resolve_plan

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


@pytest.mark.parametrize(
    "world, argv, field, words",
    [
        (4, ["--parallelism.dp_shard", "3"], "parallelism", "3 × 1 = 3 must equal the world size 4"),
        (4, ["--parallelism.dp_replicate", "3"], "parallelism.dp_shard", "not divisible by dp_replicate × tp"),
        (8, ["--parallelism.tp", "3"], "parallelism.dp_shard", "not divisible"),
        (4, ["--parallelism.dp_replicate", "2", "--parallelism.dp_shard", "4"], "parallelism", "must equal"),
        (4, ["--memory.enabled", "--parallelism.mp", "3"], "parallelism.mp", "must divide dp_shard = 4"),
        (4, ["--memory.enabled", "--parallelism.tp", "2", "--parallelism.mp", "4"], "parallelism.mp",
         "must divide dp_shard = 2"),
        (2, ["--parallelism.mp", "2"], "parallelism.mp", "no memory layers"),
        (4, ["--memory.enabled", "--memory.v_dim", "250", "--parallelism.mp", "4"], "parallelism.mp",
         "v_dim (250)"),
        (8, ["--model.flavor", "134m", "--parallelism.tp", "8"], "parallelism.tp", "n_heads (12)"),
        (3, ["--parallelism.tp", "3"], "parallelism.tp", "n_heads (8)"),
        (4, ["--memory.enabled", "--memory.heads", "3", "--parallelism.tp", "4"], "parallelism.tp",
         "memory heads (3)"),
        (2, ["--memory.enabled", "--memory.v_dim", "255", "--parallelism.tp", "2"], "parallelism.tp",
         "memory v_dim (255)"),
        (2, ["--training.seq_len", "255", "--parallelism.tp", "2"], "training.seq_len", "divisible by parallelism.tp"),
        (2, ["--memory.enabled", "--memory.value_optimizer", "adagrad", "--parallelism.value_slice_sharding", "fsdp"],
         "parallelism.value_slice_sharding", "updates whole slices in place"),
        (2, ["--parallelism.value_slice_sharding", "grid"], "parallelism.value_slice_sharding", "'grid'"),
        (3, ["--memory.enabled", "--memory.n_keys", "2", "--memory.knn", "2", "--parallelism.value_slice_sharding",
             "rows"], "parallelism.value_slice_sharding", "leaves a rank none"),
        (8, ["--parallelism.tp", "16"], "parallelism.dp_shard", "not divisible"),
    ],
)
def test_invalid_plans_fail_with_the_field_named(world, argv, field, words, monkeypatch):
    # As torchrun would launch it: the world size comes from the environment, and the check runs in build_config.
    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(ConfigError) as info:
        check_command_line(argv)
    assert info.value.field == field
    assert words in str(info.value)


@pytest.mark.parametrize("world", ["four", "0", ""])
def test_a_bad_world_size_is_one_clear_line(world, monkeypatch, capsys):
    from titanmem.train import main

    monkeypatch.setenv("WORLD_SIZE", world)
    assert main([]) == 2
    assert capsys.readouterr().err.strip().startswith("error: config error in WORLD_SIZE: ")


def test_valid_plans_resolve_and_lay_out_the_mesh():
    dims = ParallelDims.resolve(dp_replicate=2, dp_shard=-1, tp=2, mp=2, world_size=8)
    assert (dims.dp_shard, dims.dp) == (2, 4)
    assert dims.mesh_shape() == ((2, 1, 2, 2), ("dp_replicate", "dp_shard_out", "mp", "tp"))
    config, _ = build_config(["--memory.enabled"])
    config.parallelism.mp = 2
    plan = resolve_plan(config, world_size=2)
    # One copy of each column slice: nothing to split by rows (for AdamW, `fsdp` and `rows` would both be that).
    assert plan.parallel.mp == 2 and plan.value_slice_sharding == "fsdp"
    config.memory.value_optimizer = "adagrad"
    plan = resolve_plan(config, world_size=2)
    assert plan.parallel.mp == 2 and plan.value_slice_sharding == "replicate"
    # With replicas of each slice, `auto` takes the cheapest layout: row blocks for a row-wise optimizer; for dense
    # AdamW on this small table (4096 rows) against 2048 tokens per rank, gathering the slice beats routing the reads.
    assert resolve_plan(config, world_size=4).value_slice_sharding == "rows"
    config.memory.value_optimizer = "adamw"
    assert resolve_plan(config, world_size=4).value_slice_sharding == "fsdp"
    config.memory.n_keys = 1024
    assert resolve_plan(config, world_size=4).value_slice_sharding == "rows"
    config.parallelism.value_slice_sharding = "rows"
    assert resolve_plan(config, world_size=2).value_slice_sharding == "replicate"


def test_every_package_folder_is_installed():
    root = pathlib.Path(__file__).parents[1]
    declared = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "titanmem").rglob("__init__.py")}
    assert found | {"titanmem.kernels"} == declared
