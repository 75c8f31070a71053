"""The memory training recipe: the value table's own param group, lr schedule and gradient clipping."""

import pytest
import torch

from helpers import crash_after, poison_gradients_at
from titanmem.config import ConfigError
from titanmem.train import Trainer


def value_group(trainer):
    (group,) = [g for g in trainer.optimizers.dense.param_groups if g["name"] == "memory_values"]
    return group


def test_value_group_has_its_own_lr_and_decay_and_follows_the_schedule(small_config):
    config = small_config(
        training={"steps": 6},
        lr_scheduler={"warmup_steps": 2},
        memory={"enabled": True, "value_lr": 2e-2, "value_weight_decay": 0.05},
    )
    trainer = Trainer(config)
    group = value_group(trainer)
    assert group["params"] == [trainer.model.memory_values.weight]
    assert group["weight_decay"] == 0.05
    dense = [g for g in trainer.optimizers.dense.param_groups if g["name"] == "decay"][0]
    assert all(p is not trainer.model.memory_values.weight for g in trainer.optimizers.dense.param_groups
               if g["name"] != "memory_values" for p in g["params"])
    batches = iter(trainer.dataloader)
    for step in range(5):
        multiplier = trainer.lr_scheduler.lr_lambdas[0](step)
        assert group["lr"] == pytest.approx(2e-2 * multiplier)
        assert dense["lr"] == pytest.approx(config.optimizer.lr * multiplier)
        trainer.train_step(batches)
        trainer.train_state.step += 1


def test_values_are_clipped_separately_from_the_dense_parameters(small_config):
    trainer = Trainer(small_config(training={"max_norm": 1e9}, memory={"enabled": True, "value_max_norm": 1e-6}))
    metrics = trainer.train_step(iter(trainer.dataloader))
    value_grad = trainer.model.memory_values.weight.grad
    dense_grads = [p.grad for p in trainer.model.parameters() if p is not trainer.model.memory_values.weight]
    # The reported norms are the pre-clip norms; the value gradient left behind is clipped, the dense one is not.
    assert metrics["value_grad_norm"] > 1e-4
    assert value_grad.norm().item() == pytest.approx(1e-6, rel=1e-3)
    dense_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in dense_grads])).item()
    assert dense_norm == pytest.approx(metrics["grad_norm"], rel=1e-5)


TINY_MEMORY = {"enabled": True, "n_keys": 8, "heads": 1, "knn": 4, "v_dim": 32}


@pytest.mark.parametrize("kind", ["sgd", "adagrad", "adam"])
def test_row_wise_value_optimizers_train_only_the_touched_rows(small_config, kind):
    config = small_config(
        training={"steps": 6, "seq_len": 16, "local_batch_size": 2},
        memory={**TINY_MEMORY, "value_optimizer": kind, "value_lr": 0.05},
    )
    trainer = Trainer(config)
    table = trainer.model.memory_values.weight
    assert not table.requires_grad
    assert all(p is not table for g in trainer.optimizers.dense.param_groups for p in g["params"])
    before = table.detach().clone()
    # Six steps on one batch: the loss must fall (on fresh batches of 32 tokens, six steps are noise).
    batch = next(iter(trainer.dataloader))
    losses = [trainer.train_step(iter([batch]))["loss"] for _ in range(6)]
    trainer.close()
    assert table.grad is None, "a dense gradient of the table was formed"
    moved = (table != before).any(dim=1)
    assert 0 < int(moved.sum()) <= table.shape[0]
    assert all(loss == loss for loss in losses)  # finite
    assert losses[-1] < losses[0]


def poison_at(trainer, bad_step, where):
    """Make step `bad_step` non-finite: a NaN in a dense gradient ("dense"), or in the value table's recorded read-out
    gradients alone ("values"), so that only its own norm is NaN."""
    if where == "dense":
        poison_gradients_at(trainer, bad_step)
        return
    values = trainer.optimizers.values
    original_merge = values._merge

    def merge():
        merged = original_merge()
        if trainer.train_state.step == bad_step and merged is not None:
            indices, weights, grad_out = merged
            merged = indices, weights, torch.full_like(grad_out, float("nan"))
        return merged

    values._merge = merge


def value_state(trainer) -> dict:
    values = trainer.optimizers.values
    return {"table": values._local_table().detach().clone(), "first": values.first.clone(),
            "second": values.second.clone(), "steps": values.steps.clone()}


@pytest.mark.parametrize("where", ["dense", "values"])
@pytest.mark.parametrize("kind", ["adagrad", "adam"])
@pytest.mark.parametrize("implementation", ["foreach", "fused"])
def test_a_nonfinite_step_leaves_the_table_and_its_optimizer_state_as_they_were(small_config, kind, implementation,
                                                                                where):
    """foreach: the host reads the norms and skips; fused: the device decides, for AdamW and the row-wise optimizer
    alike, and the host reads nothing until the step is settled. Either way a non-finite step, whichever norm it is
    in, moves no weight, no value row, no moment, accumulator or step count."""
    trainer = Trainer(small_config(training={"steps": 3, "seq_len": 16, "local_batch_size": 2,
                                             "on_nonfinite_loss": "skip"},
                                   memory={**TINY_MEMORY, "value_optimizer": kind, "value_lr": 0.05},
                                   optimizer={"implementation": implementation}))
    assert trainer.optimizers.skips_on_device == (implementation == "fused")
    poison_at(trainer, 3, where)
    try:
        trainer.config.training.steps = 2
        trainer.train()
        weights, state = {k: v.clone() for k, v in trainer.model.state_dict().items()}, value_state(trainer)
        assert int(state["steps"]) == 2
        trainer.config.training.steps = 3
        trainer.train()
    finally:
        trainer.close()
    assert trainer.train_state.nonfinite_skips == 1
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, weights[name]), f"{name} changed in a skipped step"
    for name, value in value_state(trainer).items():
        assert torch.equal(value, state[name]), f"the value optimizer's {name} changed in a skipped step"


@pytest.mark.parametrize("kind", ["adagrad", "adam"])
def test_row_wise_steps_decided_on_the_device_train_exactly_as_steps_decided_on_the_host(small_config, monkeypatch,
                                                                                         kind):
    """The device-side decision changes when the host looks, not what is computed: with a skipped step among them,
    the same losses, skips, weights, value rows and value optimizer state (Adam's bias correction follows the count
    of applied steps) as a run whose host reads and decides every step."""
    from titanmem.components.optimizer import Optimizers

    def train(on_device):
        monkeypatch.setattr(Optimizers, "skips_on_device", property(lambda self: on_device))
        trainer = Trainer(small_config(training={"steps": 6, "seq_len": 16, "local_batch_size": 2,
                                                 "on_nonfinite_loss": "skip"},
                                       memory={**TINY_MEMORY, "value_optimizer": kind, "value_lr": 0.05},
                                       optimizer={"implementation": "fused"}, metrics={"log_freq": 5}))
        poison_at(trainer, 2, "values")
        try:
            losses = trainer.train()
        finally:
            trainer.close()
        return losses, trainer.train_state.nonfinite_skips, trainer.model.state_dict(), value_state(trainer)

    on_device, on_host = train(True), train(False)
    assert sorted(on_device[0]) == list(range(1, 7)) and on_device[0] == on_host[0]
    assert on_device[1] == on_host[1] == 1
    assert int(on_device[3]["steps"]) == 5
    for name, value in on_device[2].items():
        assert torch.equal(value, on_host[2][name]), name
    for name, value in on_device[3].items():
        assert torch.equal(value, on_host[3][name]), name


def test_row_wise_adam_state_survives_a_crash_and_resume(tmp_path, small_config):
    sections = dict(
        training={"steps": 6, "seq_len": 16, "local_batch_size": 2, "deterministic": True},
        memory={**TINY_MEMORY, "value_optimizer": "adam", "value_lr": 0.05},
        checkpoint={"enable": True, "interval": 3},
    )
    straight = small_config(**sections)
    straight.job.dump_folder = str(tmp_path / "straight")
    expected = Trainer(straight).train()

    crashed = small_config(**sections)
    crashed.job.dump_folder = str(tmp_path / "crashed")
    trainer = Trainer(crashed)
    crash_after(trainer, 4)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    resumed = Trainer(crashed).train()
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step] == expected[step]


def test_auto_value_optimizer_and_lr_follow_the_device_and_the_dense_lr():
    from titanmem.config import build_config
    from titanmem.plan import resolve_plan

    config, _ = build_config(["--memory.enabled", "--optimizer.lr", "2e-4"])
    cpu, cuda = resolve_plan(config, device_type="cpu"), resolve_plan(config, device_type="cuda")
    assert (cpu.value_optimizer, cuda.value_optimizer) == ("adamw", "adagrad")
    assert cpu.value_lr == pytest.approx(2e-3)
    assert cuda.value_lr == pytest.approx(1e-2)
    # The lookup and precision follow the device too.
    assert (cpu.model_args.memory.lookup, cuda.model_args.memory.lookup) == ("torch", "triton")
    assert (cpu.autocast_dtype, cuda.autocast_dtype) == (None, torch.bfloat16)
    config, _ = build_config(["--memory.enabled", "--memory.value_optimizer", "adam", "--memory.value_lr", "5e-3"])
    plan = resolve_plan(config, device_type="cuda")
    assert (plan.value_optimizer, plan.value_lr) == ("adam", 5e-3)


def test_sgd_needs_an_explicit_value_lr():
    from helpers import check_command_line

    with pytest.raises(ConfigError) as info:
        check_command_line(["--memory.enabled", "--memory.value_optimizer", "sgd"])
    assert info.value.field == "memory.value_lr"


def test_switching_the_value_optimizer_on_resume_starts_its_state_fresh(small_config, caplog):
    sections = dict(training={"steps": 2, "seq_len": 16, "local_batch_size": 2}, checkpoint={"enable": True})
    Trainer(small_config(memory={**TINY_MEMORY, "value_optimizer": "adamw"}, **sections)).train()
    sections["training"] = dict(sections["training"], steps=3)
    caplog.set_level("WARNING")
    trainer = Trainer(small_config(memory={**TINY_MEMORY, "value_optimizer": "adagrad"}, **sections))
    losses = trainer.train()
    assert sorted(losses) == [3]
    assert any("optimizer.values state for adagrad" in r.getMessage() for r in caplog.records)
    assert trainer.optimizers.values.steps == 1


def test_a_bf16_table_trains_with_stochastic_rounding_and_resumes_bitwise(tmp_path, small_config):
    sections = dict(
        training={"steps": 4, "seq_len": 16, "local_batch_size": 2, "deterministic": True},
        memory={**TINY_MEMORY, "value_optimizer": "adagrad", "value_lr": 0.05, "value_dtype": "bf16"},
        checkpoint={"enable": True, "interval": 2},
    )
    straight = small_config(**sections)
    straight.job.dump_folder = str(tmp_path / "straight")
    trainer = Trainer(straight)
    assert trainer.model.memory_values.weight.dtype == torch.bfloat16
    initial = trainer.model.memory_values.weight.detach().clone()
    expected = trainer.train()
    table = trainer.model.memory_values.weight.detach().clone()
    trainer.close()
    assert not torch.equal(initial, table)

    halted = small_config(**{**sections, "training": {**sections["training"], "steps": 2}})
    halted.job.dump_folder = str(tmp_path / "resumed")
    Trainer(halted).train()
    resumed_config = small_config(**sections)
    resumed_config.job.dump_folder = str(tmp_path / "resumed")
    resumed = Trainer(resumed_config)
    losses = resumed.train()
    assert [losses[s] for s in (3, 4)] == [expected[s] for s in (3, 4)]
    assert torch.equal(resumed.model.memory_values.weight.detach(), table)  # the same random bits after the resume
    resumed.close()


def test_a_bf16_table_needs_a_row_wise_optimizer(small_config):
    with pytest.raises(ConfigError) as info:
        Trainer(small_config(memory={**TINY_MEMORY, "value_optimizer": "adamw", "value_dtype": "bf16"}))
    assert info.value.field == "memory.value_dtype" and "row-wise" in info.value.problem
