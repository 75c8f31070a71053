"""The registry is the one statement of each pluggable choice: the config's choice lists, the plan's capabilities and
state sizes, the planner's memory model and what the optimizers allocate all follow it, and a new option is one entry
plus its code. Shown with a toy row-wise value optimizer and a toy data format registered here."""

import dataclasses
import gzip
import json
import typing

import pytest
import torch

from helpers import check_command_line, make_config
from titanmem.config import ConfigError
from titanmem.config.manager import section_classes
from titanmem.data.text import load_documents
from titanmem.plan import plan_from_command_line, resolve_plan, value_table_bytes
from titanmem.planner import Cluster, estimate_config
from titanmem.registry import DATA_FORMATS, VALUE_OPTIMIZERS, DataFormat, ValueOptimizer, all_kinds
from titanmem.train import Trainer

TINY_MEMORY = {"enabled": True, "n_keys": 8, "heads": 1, "knn": 4, "v_dim": 32}


def sign_rows(value, first, second, step):
    """A toy row-wise rule: sign SGD, counting each row's updates in its one fp32 state per row."""
    first[step.rows] += 1.0
    return value - step.lr * step.grad.sign()


def toy_documents(path, text_field):
    """A toy record reader: one document per line, `title<TAB>text`; a line without a tab is a bad record."""
    from titanmem.data.records import Record

    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            title, tab, text = line.rstrip("\n").partition("\t")
            yield Record(str(path), number, text) if tab else Record(str(path), number, problem="no tab")


@pytest.fixture
def toy_optimizer():
    entry = VALUE_OPTIMIZERS.register(ValueOptimizer(
        "toy_sign", f"{__name__}:sign_rows", needs_triton=True, rowwise=True, update_code=100, state=("row",),
        state_summary="toy sign SGD: an update count per row", lr_scale=5.0))
    yield entry
    VALUE_OPTIMIZERS.unregister(entry.name)


@pytest.fixture
def toy_format():
    entry = DATA_FORMATS.register(DataFormat("toy_lines", f"{__name__}:toy_documents", suffixes=(".toylines",)))
    yield entry
    DATA_FORMATS.unregister(entry.name)


def toy_corpus(folder, bad_line: bool = False):
    """The first documents of the bundled validation text as a toy_lines file, and their texts."""
    path = folder / "corpus.toylines"
    with gzip.open("assets/corpus/validation.jsonl.gz", "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"].replace("\n", " ").replace("\t", " ") for _, line in zip(range(40), f)]
    lines = [f"doc {i}\t{text}" for i, text in enumerate(texts)] + (["no tab here"] if bad_line else [])
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, texts


def test_a_registered_value_optimizer_and_data_format_train_end_to_end(tmp_path, toy_optimizer, toy_format):
    corpus, _ = toy_corpus(tmp_path)
    argv = ["--memory.enabled", "--memory.value_optimizer", "toy_sign", "--data.format", "toy_lines",
            "--data.path", str(corpus), "--training.device", "cpu"]
    assert check_command_line(argv).value_optimizer == "toy_sign"
    config = make_config(tmp_path, training={"steps": 3, "seq_len": 32, "local_batch_size": 2},
                         memory={**TINY_MEMORY, "value_optimizer": "toy_sign"}, data={"path": str(corpus)})
    plan = resolve_plan(config)
    assert plan.data_source.builder == "toy_lines"  # `auto` knows the format by its suffix
    assert plan.value_lr == pytest.approx(5.0 * config.optimizer.lr)
    # `--print_config` shows what every `auto` became.
    assert {key: plan.resolved()[key] for key in ("data.format", "memory.lookup", "memory.key_search")} == {
        "data.format": "toy_lines", "memory.lookup": "torch", "memory.key_search": "torch"}
    trainer = Trainer(config, plan)
    table = trainer.model.memory_values.weight
    before = table.detach().clone()
    losses = trainer.train()
    counts = trainer.optimizers.values.first
    trainer.close()
    assert sorted(losses) == [1, 2, 3] and all(loss == loss for loss in losses.values())
    assert counts.shape == (64,) and counts.max() == 3 and table.grad is None
    # Sign SGD moves each touched row by lr per update and per column, or less where the gradient is 0.
    moved = (table - before).abs()
    assert torch.equal(moved.sum(1) > 0, counts > 0)


def test_the_plan_and_the_planner_size_a_registered_optimizer_by_its_entry(tmp_path, toy_optimizer):
    config = make_config(tmp_path, memory={**TINY_MEMORY, "value_optimizer": "toy_sign"})
    estimate = estimate_config(config, Cluster(1, 1, 80))
    (state,) = [row for row in estimate.rows if row[0] == "value optimizer state"]
    assert state[1:] == (64 * 4, "toy sign SGD: an update count per row")
    memory, dims = estimate.plan.model_args.memory, estimate.plan.parallel
    assert value_table_bytes(memory, dims, "toy_sign", "fp32", "replicate") == 64 * 32 * 4 + 64 * 4


@pytest.mark.parametrize("kind, state_dtype", [("sgd", "fp32"), ("adagrad", "bf16"), ("adam", "fp32"),
                                               ("adam", "bf16")])
def test_the_plan_and_the_planner_count_what_a_row_wise_optimizer_allocates(tmp_path, kind, state_dtype):
    config = make_config(tmp_path, training={"steps": 3, "seq_len": 16, "local_batch_size": 2},
                         memory={**TINY_MEMORY, "value_optimizer": kind, "value_lr": 0.05,
                                 "value_state_dtype": state_dtype})
    trainer = Trainer(config)
    values = trainer.optimizers.values
    allocated = sum(t.numel() * t.element_size() for t in (values.first, values.second) if t.numel())
    table = trainer.model.memory_values.weight
    trainer.close()
    (state,) = [row for row in estimate_config(config, Cluster(1, 1, 80)).rows if row[0] == "value optimizer state"]
    assert state[1] == allocated
    plan = trainer.plan
    assert value_table_bytes(plan.model_args.memory, plan.parallel, kind, state_dtype, "replicate") == (
        table.numel() * table.element_size() + allocated)


def test_an_unregistered_name_is_one_line_naming_the_field_and_the_choices(tmp_path, capsys, toy_optimizer):
    assert check_command_line(["--memory.enabled", "--memory.value_optimizer", "toy_sign"]).value_optimizer == \
        "toy_sign"
    VALUE_OPTIMIZERS.unregister("toy_sign")
    try:
        with pytest.raises(ConfigError) as info:
            check_command_line(["--memory.value_optimizer", "toy_sign"])
        assert info.value.field == "memory.value_optimizer"
        assert info.value.problem == "expects one of 'auto', 'adamw', 'sgd', 'adagrad', 'adam', got 'toy_sign'"
        assert plan_from_command_line(["--data.format", "csv"], "train", "titanmem.train") == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and "data.format" in error and "'json', 'parquet'" in error
    finally:
        VALUE_OPTIMIZERS.register(toy_optimizer)
    # A value set in code, not parsed, is checked by the plan.
    config = make_config(tmp_path, memory={"enabled": True, "key_search": "fastest"})
    with pytest.raises(ConfigError, match="memory.key_search: expects one of 'auto', 'torch', 'select', 'triton'"):
        resolve_plan(config)


def test_a_registered_format_reads_records_with_the_bad_ones_named(tmp_path, toy_format):
    corpus, texts = toy_corpus(tmp_path, bad_line=True)
    config = make_config(tmp_path, data={"path": str(corpus), "format": "toy_lines"})
    source = resolve_plan(config).data_source
    with pytest.raises(ConfigError, match=r"corpus.toylines line 41: no tab; fix or remove it"):
        load_documents(config.data, source)
    config.data.on_bad_record = "skip"
    documents = load_documents(config.data, source)
    # The bad record keeps its row (empty), so that saved positions do not depend on on_bad_record.
    assert len(documents) == 41 and documents[0]["text"] == texts[0] and documents[40]["text"] is None


def test_every_kind_is_the_choice_list_of_its_config_field_and_loads_its_implementations():
    for kind in all_kinds():
        section, key = kind.field.split(".")
        cls = section_classes()[section]
        (field,) = [f for f in dataclasses.fields(cls) if f.name == key]
        assert field.metadata["kind"] is kind and typing.get_type_hints(cls)[key] is str
        assert field.default in kind.names()
        for name in kind.available():
            assert callable(kind.load(name)), (kind.name, name)
    with pytest.raises(ValueError, match="update_code 1 is taken"):
        VALUE_OPTIMIZERS.register(ValueOptimizer("clash", f"{__name__}:sign_rows", rowwise=True, update_code=1))
    with pytest.raises(ValueError, match="suffix .jsonl is taken"):
        DATA_FORMATS.register(DataFormat("clash", f"{__name__}:toy_documents", suffixes=(".jsonl",)))
    assert "clash" not in VALUE_OPTIMIZERS and "clash" not in DATA_FORMATS


def test_capabilities_not_names_decide_what_a_value_optimizer_may_do():
    dense = {e.name for e in VALUE_OPTIMIZERS.entries if e.name != "auto" and e.dense}
    assert dense == {"adamw"}
    for name, per_row, per_element in [("adamw", 0, 8), ("sgd", 0, 0), ("adagrad", 4, 0), ("adam", 0, 8)]:
        spec = VALUE_OPTIMIZERS.get(name)
        assert (spec.state_bytes_per_row, spec.state_bytes_per_element("fp32")) == (per_row, per_element), name
    # Lazy Adam's moments follow memory.value_state_dtype; AdamW's are torch's own fp32.
    assert VALUE_OPTIMIZERS.get("adam").state_bytes_per_element("bf16") == 4
    assert VALUE_OPTIMIZERS.get("adamw").state_bytes_per_element("bf16") == 8
