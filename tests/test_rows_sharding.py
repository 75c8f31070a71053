"""The value table split by rows over the slice's replicas and by columns over mp (`value_slice_sharding = "rows"`),
on gloo CPU ranks: every plan, from its own initialisation, gives the losses, value-gradient norms and updated table
of one process, with each value optimizer, while each rank holds only its block of the table."""

import json

import pytest
import torch
from helpers import assert_close_in_scale, data_parallel_runs_worker, launch_ranks, make_config

STEPS, GLOBAL_BATCH, SEQ = 3, 4, 16
# A small table and bag: on CPU the Triton kernels of the row-wise optimizers run interpreted, one Python step per
# program (one per touched row). 25 rows split unevenly: 13 + 12 over 2 blocks, 7 + 7 + 7 + 4 over 4.
SMALL = {"n_keys": 5, "knn": 4}
# The value optimizers as each plan runs them; bf16 tables are rounded stochastically (the default).
RUNS = {
    "sgd": {"value_optimizer": "sgd", "value_lr": 0.05, **SMALL},
    "adagrad": {"value_optimizer": "adagrad", **SMALL},
    "adam": {"value_optimizer": "adam", **SMALL},
    "adagrad-bf16": {"value_optimizer": "adagrad", "value_dtype": "bf16", **SMALL},
    "adam-bf16": {"value_optimizer": "adam", "value_dtype": "bf16", "value_state_dtype": "bf16", **SMALL},
    "sgd-bf16": {"value_optimizer": "sgd", "value_lr": 0.05, "value_dtype": "bf16", **SMALL},
    # Dense AdamW on this rank's block: the table gets an autograd gradient, scaled to the global mean in the
    # exchange's backward (no replica holds the same rows to average with).
    "adamw": {},
}
# AdamW (the dense weights) and lazy Adam move an element by lr · g / (|g| + eps): where g is at the level of the
# summation's rounding, lr / eps turns a 1e-10 difference of g into 1e-5 of the weight, and the next step's key
# search may then pick another row at a near-tie. A larger eps keeps rounding at rounding level.
OPTIMIZER = {"lr": 1e-3, "eps": 1e-6}
# Tables after an fp32 update: Adagrad and Adam normalise by a per-row (per-element) RMS, so a rounding-level
# gradient difference stays rounding-level in the update; the elements are all of one magnitude (v_dim^-0.5).
TABLE_TOLERANCE = dict(rtol=1e-4, atol=1e-5)
# bf16 tables: the update is computed in fp32 from gradients that differ at rounding level, then rounded to bf16 by
# the same random bits (drawn by the element's place in the whole table, whatever the layout): the result equals one
# process's or is its bf16 neighbour, when the fp32 values straddle a rounding threshold. One bf16 step at the
# table's largest magnitude bounds that; a missing or doubled update of a row moves it by lr-sized steps (≥ 0.01).
BF16_STEP = 2.0**-7
# Plan-vs-one-process gradients of the whole model (dense AdamW run): as in test_data_parallel.
GRADIENT_BOUND = 1e-3

_REFERENCES: dict[str, dict] = {}


def batches_file(tmp_path) -> str:
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 4096, (GLOBAL_BATCH, SEQ + 1), generator=generator) for _ in range(STEPS)]
    path = str(tmp_path / "batches.pt")
    torch.save({"batches": batches}, path)
    return path


def sections_of(run: str, finetune: dict | None = None) -> dict:
    return dict(training={"steps": STEPS, "seq_len": SEQ, "local_batch_size": GLOBAL_BATCH},
                memory=dict(RUNS[run], enabled=True), optimizer=OPTIMIZER, finetune=finetune or {})


def one_process(tmp_path, sections: dict, batches_path: str) -> dict:
    """The same steps on one process (computed once per module for each run's sections)."""
    from titanmem.train import Trainer
    from helpers import full_weights

    key = json.dumps(sections, sort_keys=True)
    if key not in _REFERENCES:
        trainer = Trainer(make_config(tmp_path / "one", **sections))
        initial = full_weights(trainer.model)
        losses, norms, grads = [], [], []
        for batch in torch.load(batches_path)["batches"]:
            metrics = trainer.train_step(iter([{"input": batch[:, :-1], "labels": batch[:, 1:]}]))
            losses.append(metrics["loss"])
            norms.append(metrics.get("value_grad_norm"))
            grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
        _REFERENCES[key] = {"initial": initial, "losses": losses, "value_grad_norms": norms, "grads": grads,
                            "table": trainer.model.memory_values.weight.detach().clone()}
        trainer.close()
    return _REFERENCES[key]


def launch(tmp_path, world: int, plan: dict, runs: dict[str, dict], batches_path: str) -> dict[str, dict]:
    """Each of `runs` (name: sections) under `plan`, in one launch of `world` gloo ranks: rank 0's results."""
    dp = world // plan.get("tp", 1)
    ranked = {name: dict(sections, training=dict(sections["training"], local_batch_size=GLOBAL_BATCH // dp),
                         parallelism=dict(plan, value_slice_sharding="rows"))
              for name, sections in runs.items()}
    launch_ranks(data_parallel_runs_worker, world, str(tmp_path), ranked, batches_path)
    return {name: torch.load(tmp_path / f"result-{name}.pt") for name in runs}


def assert_matches_one_process(name: str, got: dict, expected: dict, row_blocks: int, mp: int) -> None:
    assert got["layout"] == "rows", name
    # Each rank holds one block, rank 0 the first of ⌈rows / R⌉ rows × columns / mp.
    rows = expected["table"].shape[0]
    assert got["table_share"] == pytest.approx(-(-rows // row_blocks) / rows / mp), name
    for key, tensor in expected["initial"].items():
        assert torch.equal(got["initial"][key], tensor), f"{name}: initial {key} differs from one process's"
    # fp32: the plans differ only in the order of their sums. A bf16 table's read-out gradient is rounded to bf16, so
    # a rounding-level difference of the backward becomes a bf16 step of that gradient where it lies near a rounding
    # threshold, and the stochastic rounding carries some of those into the table: seen up to 1.4e-5 at step 3, with
    # replicated slices as with row blocks.
    bf16 = expected["table"].dtype == torch.bfloat16
    assert got["losses"] == pytest.approx(expected["losses"], rel=5e-5 if bf16 else 1e-5), name
    table, reference = got["table"], expected["table"]
    moved = (reference != expected["initial"]["memory_values.weight"]).any(dim=1)
    assert 0 < int(moved.sum()), f"{name}: the steps moved no row, the comparison would prove nothing"
    if bf16:
        assert_close_in_scale(table, reference, BF16_STEP, f"{name}: table")
    else:
        torch.testing.assert_close(table, reference, **TABLE_TOLERANCE, msg=lambda m: f"{name}: table: {m}")
    if "value_optimizer" not in RUNS[name]:  # dense AdamW: the gradients themselves
        for step, (mine, theirs) in enumerate(zip(got["grads"], expected["grads"]), start=1):
            assert mine.keys() == theirs.keys()
            for key in theirs:
                assert_close_in_scale(mine[key], theirs[key], GRADIENT_BOUND, f"{name}: step {step} {key}")
    else:
        # The norm the table is clipped by: Adagrad and Adam are blind to the gradient's scale, this is not.
        assert got["value_grad_norms"] == pytest.approx(expected["value_grad_norms"], rel=1e-4), name
        assert all("memory_values.weight" not in grads for grads in got["grads"]), name


# (world, plan, the runs under it): R = dp / mp row blocks × mp column slices. Each row-wise optimizer runs under
# R = 2, R = 4 and R = 2 × mp = 2, with fp32 or bf16 tables. Dense AdamW on row blocks is also what `auto` gives the
# CPU plans of tests/test_data_parallel.py with replicas (HSDP 2×2 and FSDP 2 × TP 2 among them).
PLANS = {
    "rows2": (2, {"dp_shard": 2}, ["sgd", "adagrad", "adam-bf16", "adamw"]),
    "rows4": (4, {"dp_shard": 4}, ["sgd-bf16", "adagrad", "adam"]),
    "rows2xmp2": (4, {"dp_shard": 4, "mp": 2}, ["sgd", "adagrad-bf16", "adam"]),
    # All four dims at once: HSDP 2 × 2, TP 2, and the row blocks over 2 × mp 2.
    "hsdp2x2xtp2-rows2xmp2": (8, {"dp_replicate": 2, "dp_shard": 2, "tp": 2, "mp": 2}, ["adagrad"]),
}


@pytest.mark.parametrize("plan_name", list(PLANS))
def test_rows_sharded_table_matches_one_process(tmp_path, plan_name):
    world, plan, run_names = PLANS[plan_name]
    batches_path = batches_file(tmp_path)
    results = launch(tmp_path, world, plan, {name: sections_of(name) for name in run_names}, batches_path)
    mp = plan.get("mp", 1)
    row_blocks = world // plan.get("tp", 1) // mp
    for name in run_names:
        expected = one_process(tmp_path, sections_of(name), batches_path)
        assert_matches_one_process(name, results[name], expected, row_blocks, mp)


def test_sparse_memory_finetuning_selects_the_same_rows_over_row_blocks(tmp_path):
    """Per-step TF-IDF selection of the top rows, ranked over every block's rows as one process ranks them all."""
    from titanmem.components.read_counts import ReadCounts, save_read_counts

    rows = SMALL["n_keys"] ** 2
    documents_reading = torch.randint(0, 11, (rows,), generator=torch.Generator().manual_seed(0))
    save_read_counts(ReadCounts(documents_reading * 3, documents_reading, 10, 5), tmp_path / "background.safetensors")
    finetune = {"mode": "sparse_memory", "top_t": 4, "background_counts": str(tmp_path / "background.safetensors")}
    sections = sections_of("adagrad", finetune)
    batches_path = batches_file(tmp_path)
    got = launch(tmp_path, 4, {"dp_shard": 4, "mp": 2}, {"sparse": sections}, batches_path)["sparse"]
    expected = one_process(tmp_path, sections, batches_path)
    assert got["losses"] == pytest.approx(expected["losses"], rel=1e-5)
    torch.testing.assert_close(got["table"], expected["table"], **TABLE_TOLERANCE)
    moved = (got["table"] != got["initial"]["memory_values.weight"]).any(dim=1)
    # At most top_t rows a step, of the 25 the steps read: the selection bites.
    assert 0 < int(moved.sum()) <= STEPS * finetune["top_t"] < moved.numel()
    assert torch.equal(moved, (expected["table"] != expected["initial"]["memory_values.weight"]).any(dim=1))
