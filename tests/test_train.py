import math
import os

import pytest
import torch

from helpers import FP32_UNIT, assert_close_in_scale, poison_gradients_at, train_run as run
from titanmem.components.checkpoint import complete_checkpoint_steps
from titanmem.components.lr_scheduler import WarmupDecay
from titanmem.components.optimizer import build_param_groups
from titanmem.config.sections import LRScheduler, Optimizer
from titanmem.train import NonFiniteLossError, Trainer


@pytest.mark.parametrize("memory", [{}, {"enabled": True}, {"enabled": True, "qk_norm": True}], ids=str)
def test_loss_falls_on_the_bundled_corpus_dense_and_memory_plus(small_config, memory):
    losses, trainer = run(small_config(training={"steps": 30}, memory=memory))
    assert (trainer.model.memory_values is not None) == bool(memory)
    first, last = losses[1], sum(losses[s] for s in range(26, 31)) / 5
    assert math.log(4096) - 1 < first < math.log(4096) + 1.5
    assert last < first - 1.0, f"loss did not fall enough: {first:.3f} -> {last:.3f}"


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_after_a_crash_reproduces_the_uninterrupted_losses(tmp_path, small_config, num_workers):
    sections = dict(
        training={"steps": 12, "deterministic": True, "local_batch_size": 2, "global_batch_size": 4},
        data={"num_workers": num_workers},
        checkpoint={"enable": True, "interval": 3, "keep_latest_k": 0},
    )
    straight_config = small_config(**sections)
    straight_config.job.dump_folder = str(tmp_path / "straight")
    straight, _ = run(straight_config)

    config = small_config(**sections)
    config.job.dump_folder = str(tmp_path / "crashed")
    with pytest.raises(KeyboardInterrupt):
        run(config, crash_after_step=7)
    folder = tmp_path / "crashed" / "checkpoint"
    assert complete_checkpoint_steps(folder) == [3, 6]
    # Debris of a crash mid-save must be ignored: a partial save and a folder without DCP metadata.
    (folder / "step-9.partial").mkdir()
    (folder / "step-9.partial" / "__0_0.distcp").write_bytes(b"garbage")
    (folder / "step-8").mkdir()

    resumed, trainer = run(config)
    assert sorted(resumed) == list(range(7, 13)), "did not resume from step 6"
    assert trainer.train_state.tokens_seen == 12 * 4 * 64
    for step in range(7, 13):
        assert resumed[step] == straight[step], f"step {step}: {resumed[step]} != {straight[step]}"


def test_keep_latest_k_and_no_partial_leftovers(small_config):
    config = small_config(training={"steps": 5}, checkpoint={"enable": True, "interval": 1, "keep_latest_k": 2})
    run(config)
    folder = os.path.join(config.job.dump_folder, "checkpoint")
    assert complete_checkpoint_steps(folder) == [4, 5]
    assert sorted(os.listdir(folder)) == ["step-4", "step-5"]


def test_a_save_never_stops_on_a_name_that_is_taken_and_deletes_nothing_it_did_not_write(small_config):
    """A `step-N.deleting` that an earlier delete could not remove (here a file, which rmtree leaves) and a `step-N`
    folder that is no checkpoint (no .metadata: left by hand, or a half copy): the purge and the save go around them,
    and the folder left by hand is kept."""
    config = small_config(training={"steps": 2, "seq_len": 16}, checkpoint={"enable": True, "interval": 1,
                                                                             "keep_latest_k": 1})
    folder = os.path.join(config.job.dump_folder, "checkpoint")
    os.makedirs(os.path.join(folder, "step-2"))
    with open(os.path.join(folder, "step-2", "notes.txt"), "w") as handle:
        handle.write("mine")
    with open(os.path.join(folder, "step-1.deleting"), "w") as handle:
        handle.write("stuck")
    losses, _ = run(config)
    assert sorted(losses) == [1, 2]
    # step-1 went by way of step-1.deleting.2.
    assert sorted(os.listdir(folder)) == ["step-1.deleting", "step-2", "step-2.replaced"]
    with open(os.path.join(folder, "step-2.replaced", "notes.txt")) as handle:
        assert handle.read() == "mine"


def test_finished_run_relaunched_does_no_more_steps(small_config):
    config = small_config(training={"steps": 3}, checkpoint={"enable": True, "interval": 10})
    run(config)
    losses, trainer = run(config)
    assert losses == {} and trainer.train_state.step == 3


def test_gradient_accumulation_matches_one_big_batch(small_config):
    big, _ = run(small_config(training={"steps": 3, "local_batch_size": 4}))
    accumulated, _ = run(small_config(training={"steps": 3, "local_batch_size": 2, "global_batch_size": 4}))
    for step in big:
        assert accumulated[step] == pytest.approx(big[step], rel=1e-5)


# foreach: the host reads the loss and norms every step and decides; fused: the device drops the update itself
# (`found_inf`) and the host reads the numbers only when it logs, evaluates or saves.
IMPLEMENTATIONS = ["foreach", "fused"]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_nonfinite_step_is_skipped_without_touching_the_weights(small_config, implementation):
    trainer = Trainer(small_config(training={"steps": 3, "on_nonfinite_loss": "skip"},
                                   optimizer={"implementation": implementation}))
    poison_gradients_at(trainer, 3)
    trainer.config.training.steps = 2
    trainer.train()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    moments = {k: v.clone() for k, v in trainer.optimizers.state_dict()["dense"].items()}
    trainer.config.training.steps = 3
    trainer.train()
    assert trainer.train_state.nonfinite_skips == 1
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} changed in a skipped step"
    for name, value in trainer.optimizers.state_dict()["dense"].items():
        assert torch.equal(value, moments[name]), f"optimizer {name} changed in a skipped step"


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_nonfinite_step_aborts_with_the_step_named(small_config, implementation):
    trainer = Trainer(small_config(training={"steps": 4}, optimizer={"implementation": implementation}))
    poison_gradients_at(trainer, 2)
    with pytest.raises(NonFiniteLossError, match="step 2"):
        trainer.train()


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_too_many_skips_abort(small_config, implementation):
    trainer = Trainer(small_config(training={"steps": 4, "on_nonfinite_loss": "skip", "max_nonfinite_skips": 0},
                                   optimizer={"implementation": implementation}))
    poison_gradients_at(trainer, 2)
    with pytest.raises(NonFiniteLossError, match="max_nonfinite_skips"):
        trainer.train()


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_train_reads_every_step_by_its_end_and_train_step_alone_reads_its_own(small_config, implementation):
    """The run's length may change after the trainer is built (a resumed run with more steps): its last step is still
    read, a non-finite one included; and a caller of train_step sees each step accounted when it returns."""
    config = small_config(training={"steps": 5, "on_nonfinite_loss": "skip"}, metrics={"log_freq": 100},
                          optimizer={"implementation": implementation})
    trainer = Trainer(config)
    trainer.config.training.steps = 2
    poison_gradients_at(trainer, 2)
    try:
        assert sorted(trainer.train()) == [1, 2]
        assert trainer.train_state.nonfinite_skips == 1
        trainer.train_state.step = 2  # poisoned again: train_step alone, no loop around it
        metrics = trainer.train_step(iter(trainer.dataloader))
        assert trainer.train_state.nonfinite_skips == 2 and math.isnan(metrics["grad_norm"])
    finally:
        trainer.close()


def test_a_save_after_only_skipped_steps_counts_no_adamw_step(small_config):
    """Torch's state-dict helpers make a missing AdamW state with a zero-lr step; it must not count as a step."""
    trainer = Trainer(small_config(training={"steps": 1, "on_nonfinite_loss": "skip"},
                                   optimizer={"implementation": "foreach"}))
    poison_gradients_at(trainer, 1)
    try:
        trainer.train()
        trainer.optimizers.state_dict()
        steps = [state["step"].item() for state in trainer.optimizers.dense.state.values()]
        assert steps and set(steps) == {0.0}
    finally:
        trainer.close()


def test_steps_read_late_train_exactly_as_steps_read_at_once(small_config, monkeypatch):
    """The device-side skip and the late reads change when the host looks, not what is computed: the same losses,
    skips, weights and checkpointed skip count as a run that reads and decides every step on the host."""
    from titanmem.components.optimizer import Optimizers

    def train(read_late):
        monkeypatch.setattr(Optimizers, "skips_on_device", property(lambda self: read_late))
        trainer = Trainer(small_config(training={"steps": 7, "on_nonfinite_loss": "skip"},
                                       optimizer={"implementation": "fused"}, metrics={"log_freq": 5}))
        poison_gradients_at(trainer, 3)
        try:
            losses = trainer.train()
        finally:
            trainer.close()
        return losses, trainer.train_state.nonfinite_skips, trainer.model.state_dict()

    late, at_once = train(True), train(False)
    assert sorted(late[0]) == list(range(1, 8)) and late[0] == at_once[0]
    assert late[1] == at_once[1] == 1
    for name, value in late[2].items():
        assert torch.equal(value, at_once[2][name]), name


def test_tensorboard_gets_the_console_metrics(small_config):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = small_config(training={"steps": 5}, metrics={"enable_tensorboard": True, "log_freq": 5})
    run(config)
    (run_folder,) = [os.path.join(r, "") for r, _, files in os.walk(config.job.dump_folder) if files and "tb" in r]
    events = EventAccumulator(run_folder)
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "lr", "grad_norm", "tokens_per_second", "eta_seconds"} <= tags
    assert [e.step for e in events.Scalars("loss")] == [1, 5]


def test_metrics_line_has_the_promised_fields(small_config, caplog):
    caplog.set_level("INFO", logger="titanmem")
    run(small_config(training={"steps": 2}, metrics={"log_freq": 2}))
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("step 2"))
    for field in ("loss", "lr", "grad_norm", "tok/s", "eta"):
        assert field in line


def test_lr_schedule_shapes():
    # 14 updates (indices 0..13): 4 of warmup ending at the peak, then 10 of decay ending exactly at the floor.
    linear = WarmupDecay(LRScheduler(warmup_steps=4, decay_type="linear", min_lr_factor=0.1), decay_steps=10)
    assert [linear(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert linear(4) == pytest.approx(0.1 + 0.9 * 0.9)
    assert linear(8) == pytest.approx(0.55)
    assert linear(13) == pytest.approx(0.1) and linear(100) == pytest.approx(0.1)
    cosine = WarmupDecay(LRScheduler(warmup_steps=0, decay_type="cosine", min_lr_factor=0.0, decay_steps=10), 10)
    assert cosine(4) == pytest.approx(0.5) and cosine(9) == pytest.approx(0.0)
    constant = WarmupDecay(LRScheduler(warmup_steps=2, decay_type="constant"), 8)
    assert constant(1) == 1.0 and constant(7) == 1.0


def test_norms_and_biases_skip_weight_decay_unless_asked():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    groups = {g["name"]: g for g in build_param_groups(model, Optimizer(weight_decay=0.1))}
    assert [p.shape for p in groups["decay"]["params"]] == [torch.Size([4, 4])]
    assert len(groups["no_decay"]["params"]) == 3 and groups["no_decay"]["weight_decay"] == 0.0
    (only,) = build_param_groups(model, Optimizer(weight_decay=0.1, decay_norms_and_biases=True))
    assert len(only["params"]) == 4


def test_relaunch_with_more_steps_and_a_new_lr_follows_the_new_config(small_config):
    config = small_config(training={"steps": 6}, checkpoint={"enable": True, "interval": 6})
    run(config)
    longer = small_config(
        training={"steps": 12}, optimizer={"lr": 1e-3, "weight_decay": 0.05}, checkpoint={"enable": True, "interval": 6}
    )
    trainer = Trainer(longer)
    assert trainer.checkpointer.load(trainer.plan.checkpoint_to_load) == 6
    # 12 steps, 4 of warmup: the plan lays the decay over the other 8.
    assert trainer.plan.lr_decay_steps == 8
    schedule = WarmupDecay(longer.lr_scheduler, decay_steps=8)
    decay = [g for g in trainer.optimizers.dense.param_groups if g["name"] == "decay"][0]
    assert decay["lr"] == pytest.approx(1e-3 * schedule(6))
    assert decay["weight_decay"] == 0.05
    # The restored moments are the saved ones, not fresh zeros.
    state = trainer.optimizers.dense.state[trainer.model.output.weight]
    assert int(state["step"]) == 6 and state["exp_avg"].abs().sum() > 0
    trainer.close()


@pytest.mark.parametrize("on_reshard", ["continue", "restart"])
def test_resuming_with_other_loader_workers_deals_the_stream_out_again(small_config, caplog, on_reshard):
    """Loader workers are shards of the stream: another count continues the global position (tests/test_data_position.py
    counts the documents), or restarts the data order when asked to."""
    run(small_config(training={"steps": 2}, checkpoint={"enable": True, "interval": 2}))
    caplog.set_level("INFO")
    config = small_config(training={"steps": 4}, data={"num_workers": 2, "on_reshard": on_reshard},
                          checkpoint={"enable": True, "interval": 2})
    losses, _ = run(config)
    assert sorted(losses) == [3, 4]
    messages = " ".join(r.getMessage() for r in caplog.records)
    words = "continues on 2 (no document skipped" if on_reshard == "continue" else "starts the data order afresh"
    assert words in messages


def test_load_step_sets_newer_checkpoints_aside_and_crash_debris_is_cleaned(small_config):
    config = small_config(training={"steps": 4}, checkpoint={"enable": True, "interval": 1, "keep_latest_k": 0})
    run(config)
    folder = os.path.join(config.job.dump_folder, "checkpoint")
    os.makedirs(os.path.join(folder, "step-7.partial"))
    os.makedirs(os.path.join(folder, "step-1.deleting"))
    config.checkpoint.load_step = 2
    losses, _ = run(config)
    assert sorted(losses) == [3, 4]
    entries = sorted(os.listdir(folder))
    assert complete_checkpoint_steps(folder) == [1, 2, 3, 4]
    assert "step-3.abandoned-at-2" in entries and "step-4.abandoned-at-2" in entries
    assert not any(e.endswith((".partial", ".deleting")) for e in entries)


def test_a_file_of_another_format_is_a_config_error_before_the_model(small_config, monkeypatch):
    import titanmem.build
    from titanmem import train as train_module

    monkeypatch.setattr(titanmem.build, "build_model", lambda *a, **k: pytest.fail("model built before data checks"))
    with pytest.raises(train_module.ConfigError) as info:
        Trainer(small_config(data={"format": "parquet"}))
    assert info.value.field == "data.format" and "as parquet cannot be read" in str(info.value)


def test_data_errors_come_before_the_model_is_built(small_config, monkeypatch, tmp_path):
    import titanmem.build
    from titanmem import train as train_module

    monkeypatch.setattr(titanmem.build, "build_model", lambda *a, **k: pytest.fail("model built before data checks"))
    path = tmp_path / "d.jsonl"
    path.write_text('{"body": "text"}\n')
    with pytest.raises(train_module.ConfigError) as info:
        Trainer(small_config(data={"path": str(path)}))
    assert info.value.field == "data.text_field"


@pytest.mark.parametrize("memory", [{}, {"value_optimizer": "adagrad", "key_search": "triton", "n_keys": 16,
                                         "knn": 8}],
                         ids=["adamw", "adagrad-fused-search"])
def test_activation_checkpointing_and_compile_leave_losses_and_gradients_unchanged(small_config, memory):
    """With a row-wise optimizer the table trains from recorded reads: a recomputed or compiled block must record
    each read once, with the same gradient, so the updated table is the same too."""
    def run_with(**sections):
        torch.manual_seed(0)
        # One step with the row-wise optimizer: the table after its update shows every recorded read (each of its
        # Triton kernels is interpreted on CPU, which makes a step slow); two with AdamW.
        trainer = Trainer(small_config(training={"steps": 1 if memory else 2, "seq_len": 16, "local_batch_size": 2},
                                       memory={"enabled": True, **memory}, **sections))
        losses = trainer.train()
        wrappers.append([type(block).__name__ for block in trainer.model.layers.values()])
        # Gradient names without the wrappers' prefixes (_checkpoint_wrapped_module., _orig_mod.).
        grads = {n.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", ""): p.grad.clone()
                 for n, p in trainer.model.named_parameters() if p.grad is not None}
        grads["memory_values.weight (after the steps)"] = trainer.model.memory_values.weight.detach().clone()
        trainer.close()
        return losses, grads

    wrappers = []
    plain_losses, plain_grads = run_with()
    plans = [{"activation_checkpoint": {"mode": "full"}},
             {"activation_checkpoint": {"mode": "selective", "selective_layer_stride": 2}},
             {"compile": {"enable": True, "backend": "aot_eager"}}]
    # The recorder sees recomputation or compile alike in every block: full AC and compile cover it.
    for sections in plans if not memory else plans[::2]:
        losses, grads = run_with(**sections)
        assert losses == pytest.approx(plain_losses, rel=1e-6), sections
        assert grads.keys() == plain_grads.keys()
        # Recomputation repeats the same ops; compile's decompositions may sum in another order. Either way a few
        # hundred roundings of the largest terms at most (the widest sums: 256-wide matmuls over 32 tokens; seen on
        # CPU: none at all).
        for name, grad in plain_grads.items():
            assert_close_in_scale(grads[name], grad, 300 * FP32_UNIT, f"{sections} {name}")
    # The plans were really applied: full, every other block, compiled.
    block, wrapped, compiled = "TransformerBlock", "CheckpointWrapper", "OptimizedModule"
    expected = [[block] * 6, [wrapped] * 6, [wrapped, block] * 3, [compiled] * 6]
    assert wrappers == (expected if not memory else [expected[0], expected[1], expected[3]])


def test_gpu_memory_limit_caps_the_process_at_its_share_of_the_device(monkeypatch):
    """`training.gpu_memory_limit_gb` becomes the allocator's per-process fraction of the device (at most all of
    it), set before anything is allocated; 0 sets no cap."""
    from types import SimpleNamespace

    from titanmem import build

    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=140e9))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda fraction, device: calls.append(fraction))
    for limit in (80.0, 200.0, 0.0):
        config = SimpleNamespace(training=SimpleNamespace(gpu_memory_limit_gb=limit, seed=0, deterministic=False))
        plan = SimpleNamespace(device=torch.device("cuda", 0), config=config, purpose="train",
                               parallel=SimpleNamespace(distributed=False), build_mesh=lambda device_type: None)
        build.setup_process(plan)
    assert calls == [pytest.approx(80 / 140), 1.0]
