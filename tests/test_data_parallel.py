"""FSDP2/HSDP data parallelism, tensor and memory parallelism on gloo CPU ranks give the same initial weights (bit
for bit), losses and gradients as one process, each plan starting from its own initialisation."""

import json

import pytest
import torch
from helpers import assert_close_in_scale, data_parallel_worker, full_weights, launch_ranks
from titanmem.train import Trainer

STEPS, GLOBAL_BATCH, SEQ = 3, 4, 16
# fp32 on CPU. The plans compute the same sums as one process, in another order: a batch split over ranks, matmuls
# sharded over tp or mp (each blocked by MKL in its own way), then cross-rank sums. A gradient passes through the
# backward of all 6 blocks (sums of 256 to 768 terms each) before its own sum over the batch, so its rounding is
# that of a long chain: seen up to 1.1e-4 of a gradient's largest element (the embedding's, whose rows sum each
# token's occurrences), with and without OpenBLAS's Haswell setting, bounded here relative to that element
# (helpers.assert_close_in_scale) since terms cancel. Steps 2 and 3 start from weights that AdamW moved by
# lr · g / (|g| + eps): for an element whose gradient is at rounding level, a rounding difference moves the weight by
# up to lr · δg / eps; seen to stay below step 1's. A fault (a rank's share lost, a wrong scale) moves a gradient by
# a sizeable fraction of its largest element.
GRADIENT_BOUND = 1e-3
# Tables after an update: Adagrad and Adam normalise by a per-row (per-element) RMS, and a rounding-level table
# gradient stays rounding-level in the update (lazy Adam's eps is raised where it is used, see there); the table's
# elements are all of one magnitude (v_dim^-0.5), so an element-wise bound fits.
TABLE_TOLERANCE = dict(rtol=1e-4, atol=1e-5)


def assert_gradients_match(got_steps: list[dict], expected_steps: list[dict], first_step: int = 1) -> None:
    assert len(got_steps) == len(expected_steps)
    for step, (got, expected) in enumerate(zip(got_steps, expected_steps), start=first_step):
        assert got.keys() == expected.keys()
        for name in expected:
            assert_close_in_scale(got[name], expected[name], GRADIENT_BOUND, f"step {step} {name}")


_REFERENCES: dict[str, tuple] = {}


def single_process_reference(small_config, sections, batches_path):
    trainer = Trainer(small_config(**sections))
    data = torch.load(batches_path)
    initial = full_weights(trainer.model)
    losses, grads, value_norms = [], [], []
    for batch in data["batches"]:
        metrics = trainer.train_step(iter([{"input": batch[:, :-1], "labels": batch[:, 1:]}]))
        losses.append(metrics["loss"])
        value_norms.append(metrics.get("value_grad_norm"))
        grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
    table = trainer.model.memory_values.weight.detach().clone()
    trainer.close()
    return initial, losses, grads, table, value_norms


def run_both(tmp_path, small_config, world, plan, memory, optimizer=None, finetune=None):
    """The same 3 steps of the debug Memory+ model on one process and under `plan`, each from its own
    initialisation with the same seed: (reference, result). The initial full weights must be equal bit for bit."""
    sections = dict(
        training={"steps": STEPS, "seq_len": SEQ, "local_batch_size": GLOBAL_BATCH},
        memory=dict(memory, enabled=True),
        optimizer={"lr": 1e-3, **(optimizer or {})},
        finetune=finetune or {},
    )
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 4096, (GLOBAL_BATCH, SEQ + 1), generator=generator) for _ in range(STEPS)]
    batches_path = str(tmp_path / "batches.pt")
    torch.save({"batches": batches}, batches_path)

    # Plans of the same sections share one reference (the same seeds and batches): computed once per module.
    key = json.dumps(sections, sort_keys=True)
    if key not in _REFERENCES:
        _REFERENCES[key] = single_process_reference(small_config, sections, batches_path)
    initial, *reference = _REFERENCES[key]

    dp = world // plan.get("tp", 1)
    ranked = dict(sections, training=dict(sections["training"], local_batch_size=GLOBAL_BATCH // dp),
                  parallelism=plan)
    launch_ranks(data_parallel_worker, world, str(tmp_path), ranked, batches_path)
    result = torch.load(tmp_path / "result.pt")
    assert result["initial"].keys() == initial.keys()
    for name, tensor in initial.items():
        assert torch.equal(result["initial"][name], tensor), f"{name}: initial weights differ from one process's"
    return reference, result


@pytest.mark.parametrize(
    "world, plan",
    [(2, {"dp_shard": 2, "value_slice_sharding": "fsdp"}), (4, {"dp_replicate": 2, "dp_shard": 2}),
     (2, {"tp": 2, "dp_shard": 1}), (4, {"tp": 2, "dp_shard": 2}), (2, {"dp_shard": 2, "mp": 2}),
     (4, {"dp_shard": 4, "mp": 2, "value_slice_sharding": "fsdp"}), (4, {"tp": 2, "dp_shard": 2, "mp": 2}),
     (4, {"dp_replicate": 2, "dp_shard": 2, "mp": 2, "value_slice_sharding": "fsdp"}),
     (2, {"dp_shard": 2, "value_slice_sharding": "replicate"})],
    ids=["fsdp2", "hsdp2x2", "tp2", "fsdp2xtp2", "mp2", "fsdp4xmp2", "tp2xmp2", "hsdp2x2xmp2", "fsdp2-replicated"],
)
def test_data_parallel_matches_one_process(tmp_path, small_config, world, plan):
    # Dense AdamW on the table (the CPU default): `auto` lays value slices out in row blocks where the slice has
    # replicas; FSDP's gathered slices and replicated ones are named. All four dims at once, on 8 ranks, are in
    # tests/test_rows_sharding.py.
    (losses, grads, _, _), result = run_both(tmp_path, small_config, world, plan, memory={})
    # Sub-keys are stored sharded over dp_shard (so over each mp group too) and split by heads over tp.
    assert result["subkey_share"] == 1 / (plan["dp_shard"] * plan.get("tp", 1))

    # The losses of steps 2 and 3 also check the updates (the weights themselves are not compared: AdamW turns
    # rounding-level differences of near-zero gradients into lr-sized steps).
    assert result["losses"] == pytest.approx(losses, rel=1e-5)
    assert_gradients_match(result["grads"], grads)


def test_fused_adamw_with_the_device_side_skip_matches_one_process(tmp_path, small_config):
    """Fused AdamW gets the step's non-finite flag as a device tensor (`found_inf`); on FSDP's DTensor parameters it
    must take it as a replicated scalar and train as on one process."""
    (losses, _, _, _), result = run_both(tmp_path, small_config, 2, {"dp_shard": 2}, memory={},
                                         optimizer={"implementation": "fused"})
    assert result["losses"] == pytest.approx(losses, rel=1e-5)


@pytest.mark.parametrize("memory", [{"gated": True}, {"swilu": False}], ids=["gated-memory+", "plain-pkm"])
def test_tensor_parallel_memory_variants_match_one_process(tmp_path, small_config, memory):
    """A gated Memory+ layer reduces W2 in full before its gate; a plain PKM layer runs whole on each tp rank."""
    (losses, grads, _, _), result = run_both(tmp_path, small_config, 2, {"tp": 2, "dp_shard": 1}, memory=memory)
    assert result["losses"] == pytest.approx(losses, rel=1e-5)
    assert_gradients_match(result["grads"], grads)


@pytest.mark.parametrize(
    "world, plan, optimizer",
    [(2, {"dp_shard": 2}, "adagrad"), (2, {"dp_shard": 2, "mp": 2}, "adagrad"),
     (4, {"dp_shard": 4, "mp": 4}, "adagrad"),
     (4, {"dp_replicate": 2, "dp_shard": 2, "mp": 2}, "adagrad"), (4, {"tp": 2, "dp_shard": 2, "mp": 2}, "adam")],
    ids=["fsdp2-adagrad", "mp2-adagrad", "mp4-adagrad", "hsdp2x2xmp2-adagrad", "tp2xmp2-adam"],
)
def test_row_wise_value_optimizer_matches_one_process(tmp_path, small_config, world, plan, optimizer):
    """The fused row-wise optimizers on several processes, each slice replicated whole: the table's records are
    gathered over its replicas and its row norms summed over mp, so the updated table and the losses equal one
    process's. (Row blocks: tests/test_rows_sharding.py.)"""
    plan = dict(plan, value_slice_sharding="replicate")
    # A small table and bag: on CPU the Triton kernels run interpreted, one Python step per program (a touched row).
    memory = {"value_optimizer": optimizer, "n_keys": 5, "knn": 4}
    # Lazy Adam moves an element by lr · g / (|g| + eps): where g is at the level of the summation's rounding, the
    # update's sensitivity lr / eps turns a 1e-10 difference of g into 1e-5 of the table. A larger eps keeps rounding
    # at rounding level, so the tolerance below stays that of fp32 sums.
    eps = {"eps": 1e-6} if optimizer == "adam" else {}
    (losses, grads, table, value_norms), result = run_both(tmp_path, small_config, world, plan, memory=memory,
                                                           optimizer=eps)
    assert result["losses"] == pytest.approx(losses, rel=1e-5)
    # The norm the table is clipped by: Adagrad and Adam are blind to the gradient's scale, this is not.
    assert result["value_grad_norms"] == pytest.approx(value_norms, rel=1e-4)
    # Row-wise Adagrad and Adam divide by a per-row (per-element) RMS, so a rounding-level gradient difference stays
    # rounding-level in the update.
    torch.testing.assert_close(result["table"], table, **TABLE_TOLERANCE)
    assert "memory_values.weight" not in grads[0]
    assert_gradients_match(result["grads"][-1:], grads[-1:], first_step=STEPS)


@pytest.mark.parametrize(
    "plan, memory, finetune",
    [({"dp_shard": 2}, {}, {"mode": "values_only"}),
     ({"dp_shard": 2, "mp": 2}, {"value_optimizer": "adagrad", "n_keys": 5, "knn": 4},
      {"mode": "sparse_memory", "top_t": 4})],
    ids=["fsdp2-values-only", "mp2-sparse-memory"],
)
def test_finetune_modes_match_one_process(tmp_path, small_config, plan, memory, finetune):
    """Frozen parameters under FSDP, the read-out gradients of a frozen key path exchanged over mp, and a row
    selection that every rank must make alike: the same losses, gradients and table as one process."""
    from titanmem.components.read_counts import ReadCounts, save_read_counts

    if finetune["mode"] == "sparse_memory":
        rows = memory["n_keys"] ** 2
        generator = torch.Generator().manual_seed(0)
        documents_reading = torch.randint(0, 11, (rows,), generator=generator)
        save_read_counts(ReadCounts(documents_reading * 3, documents_reading, 10, 5),
                         tmp_path / "background.safetensors")
        finetune = dict(finetune, background_counts=str(tmp_path / "background.safetensors"))
    # values_only trains the table with dense AdamW, whose update lr · g / (|g| + eps) turns a rounding-level
    # difference of a near-zero gradient element into up to lr / eps times it: a larger eps keeps that at rounding
    # level, so that the table compares element-wise.
    optimizer = {"eps": 1e-6} if finetune["mode"] == "values_only" else None
    (losses, grads, table, _), result = run_both(tmp_path, small_config, 2, plan, memory=memory, finetune=finetune,
                                                 optimizer=optimizer)
    assert result["losses"] == pytest.approx(losses, rel=1e-5)
    torch.testing.assert_close(result["table"], table, **TABLE_TOLERANCE)
    moved = (result["table"] != result["initial"]["memory_values.weight"]).any(dim=1)
    if finetune["mode"] == "sparse_memory":  # at most top_t rows a step, of the 25 the steps read
        assert 0 < int(moved.sum()) <= STEPS * finetune["top_t"] < moved.numel()
    # values_only: the table's gradient alone; sparse_memory: none (the row-wise optimizer trains from reads).
    assert all(got.keys() == ({"memory_values.weight"} if finetune["mode"] == "values_only" else set())
               for got in result["grads"])
    assert_gradients_match(result["grads"], grads)


@pytest.mark.parametrize(
    "plan, memory",
    [({"dp_shard": 2, "value_slice_sharding": "rows"}, {}),
     ({"dp_shard": 2, "mp": 2}, {"value_optimizer": "adam", "n_keys": 5, "knn": 4})],
    ids=["rows2-adamw", "mp2-lazy-adam"],
)
def test_sharded_checkpoint_resume_reproduces_the_losses(tmp_path, plan, memory):
    from helpers import launch_ranks, train_worker

    def launch(folder, steps, name):
        sections = dict(
            training={"steps": steps, "seq_len": SEQ, "local_batch_size": 2, "deterministic": True},
            memory=dict(memory, enabled=True),
            checkpoint={"enable": True, "interval": 2},
            parallelism=plan,
        )
        launch_ranks(train_worker, 2, str(folder), sections, name)
        return torch.load(folder / name)

    # Steps 1-2 fall in the 4-step warmup, whose lrs do not depend on the run's length: stopping after 2 steps and
    # relaunching for 4 must then reproduce the 4-step run exactly (with lazy Adam, its column-split moments too).
    straight = launch(tmp_path / "straight", 4, "losses.pt")
    launch(tmp_path / "resumed", 2, "first.pt")
    resumed = launch(tmp_path / "resumed", 4, "second.pt")
    assert sorted(resumed) == [3, 4]
    assert [resumed[s] for s in (3, 4)] == [straight[s] for s in (3, 4)]
