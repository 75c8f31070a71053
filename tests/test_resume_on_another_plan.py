"""A checkpoint saved under one plan loads under another of the same model: the restored full weights and optimizer
states equal the saved ones exactly, and the next step's loss equals that of going on under the saving plan."""

import pytest
import torch
from helpers import launch_ranks, resume_worker

STEPS, GLOBAL_BATCH, SEQ = 3, 4, 16
ROW_WISE = {"n_keys": 5, "knn": 4}  # a small table: the Triton kernels run interpreted on CPU

FSDP2_MP2 = (4, {"dp_shard": 4, "mp": 2})
TP2_MP2 = (4, {"tp": 2, "dp_shard": 2, "mp": 2})
HSDP2x2 = (4, {"dp_replicate": 2, "dp_shard": 2})
ONE = (1, {})


def launch(folder, world, plan, memory, batches_path, phase):
    dp = world // plan.get("tp", 1)
    sections = dict(
        training={"steps": STEPS, "seq_len": SEQ, "local_batch_size": GLOBAL_BATCH // dp},
        memory=dict(memory, enabled=True),
        optimizer={"lr": 1e-3},
        checkpoint={"enable": True},
        parallelism=plan,
    )
    launch_ranks(resume_worker, world, str(folder), sections, batches_path, phase)
    return torch.load(folder / f"{phase}.pt")


@pytest.mark.parametrize(
    "saving, loading, memory",
    [
        (FSDP2_MP2, ONE, {}),
        (FSDP2_MP2, (2, {"tp": 2, "dp_shard": 1}), {}),
        (FSDP2_MP2, (4, {"dp_shard": 4}), {"value_optimizer": "adagrad", **ROW_WISE}),
        (HSDP2x2, (2, {"dp_shard": 2, "mp": 2}), {}),
        (TP2_MP2, (2, {"dp_shard": 2}), {"value_optimizer": "adam", **ROW_WISE}),
        (ONE, FSDP2_MP2, {"value_optimizer": "adam", **ROW_WISE}),
        ((4, {"dp_shard": 4, "mp": 2, "value_slice_sharding": "rows"}),
         (2, {"dp_shard": 2, "value_slice_sharding": "replicate"}), {"value_optimizer": "adagrad", **ROW_WISE}),
        ((2, {"dp_shard": 2, "value_slice_sharding": "replicate"}),
         (4, {"dp_shard": 4, "value_slice_sharding": "rows"}),
         {"value_optimizer": "adam", "value_dtype": "bf16", "value_state_dtype": "bf16", **ROW_WISE}),
    ],
    ids=["fsdp2xmp2-to-1", "fsdp2xmp2-to-tp2", "fsdp2xmp2-to-fsdp4-adagrad", "hsdp2x2-to-mp2",
         "tp2xmp2-to-fsdp2-lazy-adam", "1-to-fsdp2xmp2-lazy-adam", "rows2xmp2-to-replicated-adagrad",
         "replicated-to-rows4-bf16-lazy-adam"],
)
def test_resume_on_another_plan(tmp_path, saving, loading, memory):
    generator = torch.Generator().manual_seed(7)
    batches = [torch.randint(0, 4096, (GLOBAL_BATCH, SEQ + 1), generator=generator) for _ in range(STEPS)]
    batches_path = str(tmp_path / "batches.pt")
    torch.save({"batches": batches}, batches_path)
    saved = launch(tmp_path, *saving, memory, batches_path, "save")
    loaded = launch(tmp_path, *loading, memory, batches_path, "load")

    assert loaded["state"].keys() == saved["state"].keys()
    assert any(key.startswith("optimizer.state.") for key in saved["state"])
    for key, value in saved["state"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(loaded["state"][key], value), f"{key} differs after the load"
        else:
            assert loaded["state"][key] == value, key
    # fp32 on CPU: the plans differ only in the order of their sums.
    assert loaded["loss"] == pytest.approx(saved["loss"], rel=1e-5)
