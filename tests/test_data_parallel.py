"""FSDP2/HSDP data parallelism and tensor parallelism on gloo CPU ranks give the same losses and gradients as one
process."""

import pytest
import torch
import torch.multiprocessing as mp

from helpers import free_port, data_parallel_worker
from titanmem.train import Trainer

STEPS, GLOBAL_BATCH, SEQ = 3, 4, 16
# fp32 on CPU. The only differences are the order of the sums (per-rank matmuls, then a cross-rank average):
# seen up to 2e-6 absolute on gradients of the order of 1e-2.
TOLERANCE = dict(rtol=1e-4, atol=1e-5)


def single_process_reference(small_config, sections, batches_path):
    trainer = Trainer(small_config(**sections))
    data = torch.load(batches_path)
    trainer.model.load_state_dict(data["weights"])
    losses, grads = [], []
    for batch in data["batches"]:
        losses.append(trainer.train_step(iter([{"input": batch[:, :-1], "labels": batch[:, 1:]}]))["loss"])
        grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
    trainer.close()
    return losses, grads


@pytest.mark.parametrize(
    "world, plan",
    [(2, {"dp_shard": 2}), (4, {"dp_replicate": 2, "dp_shard": 2}), (2, {"tp": 2, "dp_shard": 1}),
     (4, {"tp": 2, "dp_shard": 2}), (2, {"dp_shard": 2, "mp": 2}), (4, {"dp_shard": 4, "mp": 2}),
     (4, {"tp": 2, "dp_shard": 2, "mp": 2}), (4, {"dp_replicate": 2, "dp_shard": 2, "mp": 2})],
    ids=["fsdp2", "hsdp2x2", "tp2", "fsdp2xtp2", "mp2", "fsdp4xmp2", "tp2xmp2", "hsdp2x2xmp2"],
)
def test_data_parallel_matches_one_process(tmp_path, small_config, world, plan):
    sections = dict(
        training={"steps": STEPS, "seq_len": SEQ, "local_batch_size": GLOBAL_BATCH},
        memory={"enabled": True},  # the debug Memory+ model: its value table is sharded by FSDP too
        optimizer={"lr": 1e-3},
    )
    torch.manual_seed(0)
    reference_model = Trainer(small_config(**sections))
    weights = {k: v.clone() for k, v in reference_model.model.state_dict().items()}
    reference_model.close()
    batches = [torch.randint(0, 4096, (GLOBAL_BATCH, SEQ + 1)) for _ in range(STEPS)]
    batches_path = str(tmp_path / "batches.pt")
    torch.save({"weights": weights, "batches": batches}, batches_path)

    losses, grads = single_process_reference(small_config, sections, batches_path)

    dp = world // plan.get("tp", 1)
    ranked = dict(sections, training=dict(sections["training"], local_batch_size=GLOBAL_BATCH // dp),
                  parallelism=plan)
    mp.start_processes(data_parallel_worker, args=(world, free_port(), str(tmp_path), ranked, batches_path),
                       nprocs=world, join=True, start_method="spawn")
    result = torch.load(tmp_path / "result.pt")

    # The losses of steps 2 and 3 also check the updates (the weights themselves are not compared: AdamW turns
    # rounding-level differences of near-zero gradients into lr-sized steps).
    assert result["losses"] == pytest.approx(losses, rel=1e-5)
    for step, (got, expected) in enumerate(zip(result["grads"], grads), start=1):
        assert got.keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], **TOLERANCE, msg=lambda m, n=name, s=step: f"step {s} {n}: {m}")


def test_sharded_checkpoint_resume_reproduces_the_losses(tmp_path):
    from helpers import train_worker

    def launch(folder, steps, name):
        sections = dict(
            training={"steps": steps, "seq_len": SEQ, "local_batch_size": 2, "deterministic": True},
            memory={"enabled": True},
            checkpoint={"enable": True, "interval": 2},
            parallelism={"dp_shard": 2},
        )
        mp.start_processes(train_worker, args=(2, free_port(), str(folder), sections, name), nprocs=2, join=True,
                           start_method="spawn")
        return torch.load(folder / name)

    # Steps 1-2 fall in the 4-step warmup, whose lrs do not depend on the run's length: stopping after 2 steps and
    # relaunching for 4 must then reproduce the 4-step run exactly.
    straight = launch(tmp_path / "straight", 4, "losses.pt")
    launch(tmp_path / "resumed", 2, "first.pt")
    resumed = launch(tmp_path / "resumed", 4, "second.pt")
    assert sorted(resumed) == [3, 4]
    assert [resumed[s] for s in (3, 4)] == [straight[s] for s in (3, 4)]

