import dataclasses
import sys

import pytest

from titanmem import train
from titanmem.config import ConfigError, build_config, format_config, format_help
from titanmem.config.manager import field_docs, section_classes
from helpers import check_command_line

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


def write_toml(tmp_path, text: str) -> str:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return str(path)


def test_every_field_has_a_docstring():
    for section, cls in section_classes().items():
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name, "").strip(), f"{section}.{f.name} has no docstring"


def test_help_lists_every_field_with_its_doc():
    text = format_help("python -m titanmem.train")
    for section, cls in section_classes().items():
        for f in dataclasses.fields(cls):
            assert f"--{section}.{f.name}" in text
    assert "Peak learning rate" in text


def test_toml_then_overrides_in_both_forms(tmp_path):
    path = write_toml(tmp_path, "[training]\nsteps = 7\nseq_len = 32\n[optimizer]\nlr = 0.01\n")
    config, _ = build_config(
        ["--job.config_file", path, "--training.seq_len", "48", "--optimizer.lr=2e-3", "--training.deterministic"]
    )
    assert config.training.steps == 7  # from the file
    assert config.training.seq_len == 48  # space form wins over the file
    assert config.optimizer.lr == pytest.approx(2e-3)  # = form
    assert config.training.deterministic is True  # bare boolean flag
    assert config.job.config_file == path


def test_boolean_words_and_later_override_wins():
    config, _ = build_config(["--metrics.enable_tensorboard", "false", "--training.steps=3", "--training.steps=5"])
    assert config.metrics.enable_tensorboard is False
    assert config.training.steps == 5


def test_print_config_is_valid_toml_that_reproduces_the_config(tmp_path):
    config, _ = build_config(["--training.steps", "11", "--job.description", 'quote " and é'])
    text = format_config(config)
    reloaded, _ = build_config(["--job.config_file", write_toml(tmp_path, text)])
    reloaded.job.config_file = config.job.config_file
    assert reloaded == config
    assert tomllib.loads(text)["training"]["steps"] == 11


@pytest.mark.parametrize(
    "argv, field, words",
    [
        (["--trainig.steps", "3"], "trainig", "did you mean 'training'"),
        (["--training.stepz", "3"], "training.stepz", "did you mean 'training.steps'"),
        (["--training.steps", "abc"], "training.steps", "expects an integer"),
        (["--training.steps", "0"], "training.steps", "must be >= 1"),
        (["--training.max_norm", "-1"], "training.max_norm", "must be >= 0"),
        (["--optimizer.beta2", "1.0"], "optimizer.beta2", "must be < 1"),
        (["--lr_scheduler.min_lr_factor", "2"], "lr_scheduler.min_lr_factor", "must be <= 1"),
        (["--training.global_batch_size", "-2"], "training.global_batch_size", "(or -1)"),
        (["--training.deterministic", "maybe"], "training.deterministic", "expects a boolean"),
        (["--lr_scheduler.decay_type", "exp"], "lr_scheduler.decay_type", "one of 'linear', 'cosine', 'constant'"),
        (["--training.steps"], "training.steps", "missing its value"),
        (["training.steps=3"], "training.steps=3", "--section.key"),
        (["--model.flavor", "debgu"], "model.flavor", "did you mean 'debug'"),
        (["--training.global_batch_size", "6"], "training.global_batch_size", "multiple of training.local_batch_size"),
        (["--tokenizer.path", "nope.tiktoken"], "tokenizer.path", "no such file"),
        (["--tokenizer.path", ""], "tokenizer", "tokenizer.name"),
        (["--data.path", "nope/*.jsonl", "--data.format", "json"], "data.path", "no local file"),
        (["--data.facts_fraction", "0.1", "--data.facts_path", "nope.jsonl"], "data.facts_path", "no such file"),
        (["--data.facts_fraction", "1.0"], "data.facts_fraction", "< 1.0"),
        (["--eval.interval", "5", "--eval.perplexity_path", "nope.jsonl"], "eval.perplexity_path", "no such file"),
        (["--generate.top_p", "0"], "generate.top_p", "> 0.0"),
        (["--metrics.memory_telemetry_freq", "-1"], "metrics.memory_telemetry_freq", ">= 0"),
        (["--parallelism.tp", "2"], "parallelism.dp_shard", "world size 1 is not divisible"),
        (["--parallelism.dp_shard", "2"], "parallelism", "must equal the world size 1"),
        (["--job.config_file"], "job.config_file", "expects a path"),
        (["--job.config_file", "missing.toml"], "job.config_file", "file not found"),
        (["--memory.layers", "[1,"], "memory.layers", "such as [1, 2]"),
        (["--job.config_file", str(ROOT / "train_configs")], "job.config_file", "is a folder"),
        (["--optimizer.learning_rate", "3"], "optimizer.learning_rate", "valid names: optimizer.beta1"),
        (["--training.foo", "1"], "training.foo", "valid names: training.deterministic"),
        (["--memory.enabled", "--memory.n_keys", "100000"], "memory.n_keys", "GB per rank"),
        (["--job.dump_folder", str(ROOT / "README.md" / "run")], "job.dump_folder", "README.md is a file"),
    ],
)
def test_command_line_errors_name_the_field(argv, field, words):
    with pytest.raises(ConfigError) as info:
        check_command_line(argv)
    assert info.value.field == field
    assert words in str(info.value)


@pytest.mark.parametrize(
    "toml, field, words",
    [
        ("[trainin]\nsteps = 3\n", "trainin", "did you mean 'training'"),
        ("[training]\nsteeps = 3\n", "training.steeps", "did you mean 'training.steps'"),
        ("[optimizer]\nseq_len = 3\n", "optimizer.seq_len", "did you mean 'training.seq_len'"),
        ("[training]\nsteps = \"3\"\n", "training.steps", "expects an integer"),
        ("[training]\nsteps = 2.5\n", "training.steps", "expects an integer"),
        ("[training]\ndeterministic = 1\n", "training.deterministic", "expects a boolean"),
        ("[optimizer]\nlr = true\n", "optimizer.lr", "expects a number"),
        ("steps = 3\n", "steps", "must be a [section] table"),
        ("[training\nsteps = 3\n", "job.config_file", "not valid TOML"),
    ],
)
def test_toml_errors_name_the_field(tmp_path, toml, field, words):
    with pytest.raises(ConfigError) as info:
        check_command_line(["--job.config_file", write_toml(tmp_path, toml)])
    assert info.value.field == field
    assert words in str(info.value)


def test_a_toml_file_that_is_not_utf8_is_one_clear_line(tmp_path, capsys):
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[job]\ndescription = "caf\xe9"\n')
    assert train.main(["--job.config_file", str(path)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: config error in job.config_file: {path} is not UTF-8 text "
                                               "(byte 24); TOML files are UTF-8")


def test_toml_int_is_accepted_for_a_float_field(tmp_path):
    config, _ = build_config(["--job.config_file", write_toml(tmp_path, "[optimizer]\nlr = 1\n")])
    assert config.optimizer.lr == 1.0 and isinstance(config.optimizer.lr, float)


def test_missing_load_step_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        check_command_line(["--job.dump_folder", str(tmp_path), "--checkpoint.load_step", "5"])
    assert info.value.field == "checkpoint.load_step"


def test_config_errors_stop_main_before_any_model_is_built(monkeypatch, capsys):
    def must_not_run(*args, **kwargs):
        raise AssertionError("a model was built despite a config error")

    import titanmem.build

    monkeypatch.setattr(titanmem.build, "build_model", must_not_run)
    monkeypatch.setattr(titanmem.build, "build_tokenizer", must_not_run)
    assert train.main(["--training.stepz", "3"]) == 2
    assert "did you mean 'training.steps'" in capsys.readouterr().err


def test_main_help_and_print_config_do_not_train(monkeypatch, capsys):
    monkeypatch.setattr(train, "Trainer", lambda *a, **k: pytest.fail("Trainer built for --help/--print_config"))
    assert train.main(["--help"]) == 0
    assert "--training.steps" in capsys.readouterr().out
    assert train.main(["--print_config", "--training.steps", "90", "--memory.enabled"]) == 0
    printed = capsys.readouterr().out
    assert tomllib.loads(printed)["training"]["steps"] == 90
    # What `auto` and -1 resolved to on this machine follows, as comments.
    resolved = printed[printed.index("# Resolved on this machine"):]
    for line in ("parallelism.dp_shard = 1", "model.vocab_size = 4160", "memory.n_keys = 64", "memory.lookup = 'torch'",
                 "memory.value_optimizer = 'adamw'", "memory.value_lr = 0.003", "lr_scheduler.decay_steps = 70"):
        assert line in resolved, line


@pytest.mark.parametrize("entry_point, command, required", [
    ("titanmem.train", "python -m titanmem.train", []),
    ("titanmem.eval.__main__", "python -m titanmem.eval", []),
    ("titanmem.generate", "python -m titanmem.generate", ["--generate.prompts JSON"]),
    ("titanmem.export", "python -m titanmem.export", ["--export.folder DIR"]),
    ("titanmem.count_memory_reads", "python -m titanmem.count_memory_reads", []),
])
def test_every_entry_point_names_itself_in_its_help(entry_point, command, required, capsys):
    import importlib
    import re

    assert importlib.import_module(entry_point).main(["--help"]) == 0
    usage = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("usage: "))
    assert usage.startswith(f"usage: {command} "), usage
    outside_brackets = re.sub(r"\[[^]]*\]", "", usage)
    for argument in required:
        assert argument in outside_brackets, usage


def test_help_into_a_pipe_that_is_closed_ends_without_a_traceback():
    """`python -m titanmem.train --help | head -1`: the reader is gone before the help is written."""
    import os
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run([sys.executable, "-m", "titanmem.train", "--help"], stdout=write_end,
                              stderr=subprocess.PIPE, timeout=120)
    finally:
        os.close(write_end)
    stderr = done.stderr.decode()
    assert done.returncode == 0 and "Traceback" not in stderr, stderr


def test_shipped_train_configs_parse_and_build_on_meta():
    from pathlib import Path

    import torch

    from titanmem.models.accounting import count_parameters
    from titanmem.models.llama import Transformer
    from titanmem.plan import resolve_plan

    configs = sorted((Path(__file__).parents[1] / "train_configs").glob("*.toml"))
    assert len(configs) >= 11, "expected the debug pair and the paper's dense/Memory+ configs"
    for path in configs:
        assert path.read_text().startswith("# "), f"{path.name} lacks its one-line comment"
        config, _ = build_config(["--job.config_file", str(path)])
        # As on the GPUs the presets are written for: one, or the world their [parallelism] section spells out.
        p = config.parallelism
        world = p.dp_replicate * max(p.dp_shard, 1) * p.tp
        plan = resolve_plan(config, "dry_run", world_size=world, device_type="cuda", tokenizer_vocab_size=4097)
        with torch.device("meta"):
            counts = count_parameters(Transformer(plan.model_args))
        assert (counts["memory_values"] > 0) == ("memory" in path.stem or path.stem == "debug_model"), path.name


def test_docs_config_reference_is_up_to_date():
    from pathlib import Path

    from titanmem.config.manager import format_markdown_reference

    committed = (Path(__file__).parents[1] / "docs" / "config.md").read_text()
    assert committed == format_markdown_reference(), "docs/config.md is stale: run python tools/config_reference.py"
