"""The memory training recipe: the value table's own param group, lr schedule and gradient clipping."""

import pytest
import torch

from titanmem.train import Trainer


def value_group(trainer):
    (group,) = [g for g in trainer.optimizer.param_groups if g["name"] == "memory_values"]
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
    dense = [g for g in trainer.optimizer.param_groups if g["name"] == "decay"][0]
    assert all(p is not trainer.model.memory_values.weight for g in trainer.optimizer.param_groups
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
