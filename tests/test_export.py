"""Export a checkpoint to safetensors and start from it again: the same bytes from any plan, the same logits after
the import, and eval and generate read the exported folder."""

import json

import pytest
import torch
from helpers import launch_ranks, make_config, reader_argv, resave_worker, train_tiny_run


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from titanmem.export import main

    root = tmp_path_factory.mktemp("export")
    train_tiny_run(root / "run", checkpoint={"enable": True, "interval": 3})
    assert main(reader_argv(root / "run", "--export.folder", str(root / "out"), "--export.max_shard_gb",
                            "0.01")) == 0
    return root


def test_the_folder_holds_sharded_weights_their_index_config_and_tokenizer(exported):
    out = exported / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all((out / f).is_file() for f in files)  # 10 MB shards of a 30 MB model
    assert all((out / f).stat().st_size <= 0.01e9 or sum(v == f for v in index["weight_map"].values()) == 1
               for f in files)
    config = json.loads((out / "config.json").read_text())
    assert config["step"] == 3 and config["model"]["memory"]["n_keys"] == 64 and config["dtype"] == "float32"
    assert (out / "tokenizer" / "titanmem4k.tiktoken").is_file()
    assert "memory_values.weight" in index["weight_map"]


@pytest.mark.parametrize("plan", [{"dp_shard": 2, "mp": 2}, {"dp_shard": 2, "value_slice_sharding": "rows"}],
                         ids=["columns-over-mp2", "row-blocks-over-2"])
def test_a_checkpoint_of_another_plan_exports_the_same_bytes(exported, plan):
    from titanmem.export import main

    name = "-".join(f"{key}{value}" for key, value in plan.items())
    sections = dict(training={"steps": 3, "seq_len": 32, "local_batch_size": 1}, memory={"enabled": True},
                    checkpoint={"enable": True, "initial_load_path": str(exported / "run" / "checkpoint" / "step-3"),
                                "initial_load_model_only": False},
                    parallelism=plan)
    launch_ranks(resave_worker, 2, str(exported / f"resaved-{name}"), sections)
    assert main(reader_argv(exported / f"resaved-{name}", "--export.folder", str(exported / f"out-{name}"),
                            "--export.max_shard_gb", "0.01")) == 0
    other = exported / f"out-{name}"
    first = sorted(p.name for p in (exported / "out").rglob("*") if p.is_file())
    assert first == sorted(p.name for p in other.rglob("*") if p.is_file())
    for file in first:
        path = next((exported / "out").rglob(file))
        assert path.read_bytes() == next(other.rglob(file)).read_bytes(), file


def test_an_imported_export_gives_the_same_logits_and_generation(exported, capsys):
    from titanmem.build import build_run
    from titanmem.config import build_config
    from titanmem.generate import main as generate_main
    from titanmem.plan import resolve_plan
    from titanmem.eval.__main__ import main as eval_main
    from titanmem.train import Trainer

    tokens = torch.randint(0, 4096, (2, 32), generator=torch.Generator().manual_seed(0))
    config, _ = build_config(reader_argv(exported / "run"))
    original = build_run(resolve_plan(config, "eval")).model  # the run's newest checkpoint: step-3
    # A new run that starts from the exported folder.
    trainer = Trainer(make_config(exported / "imported", training={"steps": 1, "seq_len": 32},
                                  memory={"enabled": True},
                                  checkpoint={"enable": True, "initial_load_path": str(exported / "out")}))
    trainer._initial_load(trainer.plan.initial_load)
    with torch.no_grad():
        assert torch.equal(trainer.model(tokens), original(tokens))
    trainer.close()

    prompt = ["--generate.prompts", '["The capital of France is"]', "--generate.max_new_tokens", "5"]
    assert generate_main(reader_argv(exported / "run", *prompt)) == 0
    from_checkpoint = capsys.readouterr().out
    assert generate_main(reader_argv(exported / "run", *prompt, "--generate.checkpoint", str(exported / "out"))) == 0
    assert capsys.readouterr().out == from_checkpoint
    assert eval_main(reader_argv(exported / "run", "--checkpoint.initial_load_path", str(exported / "out"),
                                 "--eval.facts_limit", "4", "--eval.perplexity_tokens", "64")) == 0


def test_export_refuses_a_folder_inside_the_run_or_not_empty(exported, capsys):
    from titanmem.export import main

    before = sorted(p.name for p in (exported / "run").rglob("*"))
    assert main(reader_argv(exported / "run", "--export.folder", str(exported / "run" / "out"))) == 2
    assert "export.folder" in capsys.readouterr().err
    assert main(reader_argv(exported / "run", "--export.folder", str(exported / "out"))) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert sorted(p.name for p in (exported / "run").rglob("*")) == before


def test_an_export_that_fails_midway_leaves_no_folder(exported, monkeypatch, capsys):
    import titanmem.export as export_entry

    original = export_entry.write_export

    def fails_after_the_shards(tensors, folder, **kwargs):
        original(tensors, folder, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_entry, "write_export", fails_after_the_shards)
    target = exported / "out-failed"
    assert export_entry.main(reader_argv(exported / "run", "--export.folder", str(target))) == 1
    printed = capsys.readouterr().err
    assert printed.startswith(f"error: {target}: No space left on device in ") and printed.count("\n") == 1, printed
    assert printed.rstrip().endswith("; free space on that filesystem")
    assert not target.exists() and not target.with_name("out-failed.partial").exists()
    # A kill leaves the partial folder; the next export clears it and completes.
    (target.with_name("out-failed.partial")).mkdir()
    (target.with_name("out-failed.partial") / "model-00001-of-00009.safetensors").write_bytes(b"half")
    monkeypatch.setattr(export_entry, "write_export", original)
    assert export_entry.main(reader_argv(exported / "run", "--export.folder", str(target), "--export.max_shard_gb",
                                         "0.01")) == 0
    assert target.is_dir() and not target.with_name("out-failed.partial").exists()
    assert sorted(p.name for p in target.rglob("*")) == sorted(p.name for p in (exported / "out").rglob("*"))


def test_a_file_or_link_where_the_partial_folder_goes_is_replaced_not_followed(exported, tmp_path):
    from titanmem.export import main

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("not the export's")
    for name, make in (("as-file", lambda p: p.write_text("stray")), ("as-link", lambda p: p.symlink_to(elsewhere))):
        target = exported / f"out-{name}"
        make(target.with_name(target.name + ".partial"))
        assert main(reader_argv(exported / "run", "--export.folder", str(target))) == 0
        assert (target / "model.safetensors.index.json").is_file()
        assert not target.with_name(target.name + ".partial").exists()
    assert [p.name for p in elsewhere.iterdir()] == ["keep.txt"]
