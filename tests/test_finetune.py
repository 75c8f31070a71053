"""Sparse memory finetuning: read counts and their file, the TF-IDF selection against a plain reference, what each
`[finetune] mode` trains and freezes, a mid-finetune resume, the counting tool, and the config checks."""

import math

import pytest
import torch

from helpers import check_command_line, crash_after, launch_ranks
from titanmem.components.read_counts import ReadCounter, ReadCounts, load_read_counts, save_read_counts
from titanmem.components.row_selection import RowSelector, tfidf_scores, top_rows
from titanmem.config import ConfigError
from titanmem.kernels import row_segments
from titanmem.train import Trainer

# A table of 8² = 64 rows of 32 and one head of 4 slots: the interpreted Triton kernels stay quick on CPU.
TINY_MEMORY = {"enabled": True, "n_keys": 8, "heads": 1, "knn": 4, "v_dim": 32}
N_VALUES = 64


def random_counts(seed: int, n_values: int = N_VALUES, documents: int = 20) -> ReadCounts:
    generator = torch.Generator().manual_seed(seed)
    documents_reading = torch.randint(0, documents + 1, (n_values,), generator=generator)
    reads = documents_reading * torch.randint(1, 5, (n_values,), generator=generator)
    return ReadCounts(reads, documents_reading, documents, batches=documents // 2, tokens=documents * 64,
                      description={"seed": seed})


def reference_top_rows(reads: dict[int, int], background: ReadCounts, t: int) -> set[int]:
    """TF-IDF ranking written out plainly: score each row, sort by (score descending, row ascending), keep t."""
    total = sum(reads.values())
    scores = {row: count / total * math.log((background.documents + 1) / (int(background.documents_reading[row]) + 1))
              for row, count in reads.items()}
    return set(sorted(scores, key=lambda row: (-scores[row], row))[:t])


@pytest.mark.parametrize("t", [1, 5, 17, 1000])
def test_per_step_selection_matches_a_plain_tfidf_reference(t):
    background = random_counts(0)
    generator = torch.Generator().manual_seed(t)
    # Duplicate rows within a step, as the memory layers' reads have them.
    indices = torch.randint(0, N_VALUES, (13, 6), generator=generator)
    _, offsets, rows = row_segments(indices, N_VALUES)
    chosen = RowSelector(t, background)(rows, offsets)
    reads = {int(row): int((indices == row).sum()) for row in indices.unique()}
    assert set(rows[chosen].tolist()) == reference_top_rows(reads, background, t)
    assert int(chosen.sum()) == min(t, rows.numel())


def test_ties_go_to_the_lower_row_and_unread_background_rows_score_highest():
    background = ReadCounts(torch.tensor([5, 5, 0, 5]), torch.tensor([4, 4, 0, 4]), documents=4, batches=1)
    # Rows 0, 1 and 3 are read as often and by every background sequence: idf 0, all tied at 0.
    scores = tfidf_scores(torch.tensor([3, 3, 1, 3]), background.documents_reading, background.documents)
    assert scores[2] > 0 and scores[0] == scores[1] == scores[3] == 0
    assert top_rows(scores, 2).tolist() == [True, False, True, False]  # row 2 first, then the lowest of the ties


def test_per_dataset_selection_fixes_the_top_rows_of_the_whole_set():
    background, dataset = random_counts(1), random_counts(2)
    selector = RowSelector(9, background, dataset)
    read = {row: int(dataset.reads[row]) for row in range(N_VALUES) if dataset.reads[row] > 0}
    fixed = reference_top_rows(read, background, 9)
    assert set(selector.fixed_rows.tolist()) == fixed
    # A step trains the fixed rows it reads, and no other.
    indices = torch.arange(N_VALUES).reshape(8, 8)[:, :5]
    _, offsets, rows = row_segments(indices, N_VALUES)
    assert set(rows[selector(rows, offsets)].tolist()) == fixed & set(indices.flatten().tolist())


def test_read_counter_counts_reads_and_the_sequences_that_read_each_row():
    counter = ReadCounter(N_VALUES, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    # 4 batches of 2 sequences × 5 tokens (flat, as the memory layers see them), 4 reads per token.
    batches = [[torch.randint(0, N_VALUES, (10, 4), generator=generator) for _ in range(3)] for _ in range(4)]
    for layers in batches:
        counter.start_batch(sequences=2)
        for indices in layers:  # three memory layers, one table
            counter.observe(None, indices, torch.ones(indices.shape))
        counter.end_batch(tokens=10)
    counts = counter.counts
    for row in range(N_VALUES):
        assert counts.reads[row] == sum(int((i == row).sum()) for layers in batches for i in layers)
        # A row read by a sequence in two layers, or twice in one, is one document reading it.
        assert counts.documents_reading[row] == sum(any((i[tokens] == row).any() for i in layers)
                                                    for layers in batches for tokens in (slice(0, 5), slice(5, 10)))
    assert (counts.documents, counts.batches, counts.tokens) == (8, 4, 40)


def test_counts_files_round_trip_and_bad_ones_are_named(tmp_path):
    counts = random_counts(3)
    path = tmp_path / "counts.safetensors"
    save_read_counts(counts, path)
    loaded = load_read_counts(path, "finetune.background_counts", N_VALUES)
    assert torch.equal(loaded.reads, counts.reads) and torch.equal(loaded.documents_reading, counts.documents_reading)
    assert (loaded.documents, loaded.batches, loaded.tokens, loaded.description) == (20, 10, 1280, {"seed": 3})
    assert not list(tmp_path.glob("*.partial"))

    def refused(target, match, n_values=N_VALUES):
        with pytest.raises(ConfigError, match=match) as error:
            load_read_counts(target, "finetune.background_counts", n_values)
        assert "finetune.background_counts" in str(error.value) and "count_memory_reads" in str(error.value)

    refused(tmp_path / "missing.safetensors", "no such file")
    refused(path, "64 rows, but this model.s has 4,096", n_values=4096)
    (tmp_path / "text.safetensors").write_text("not counts at all")
    refused(tmp_path / "text.safetensors", "not a read-counts file")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-40])
    refused(truncated, "not a read-counts file")
    from safetensors.torch import save_file

    save_file({"reads": counts.reads}, str(tmp_path / "other.safetensors"), metadata={"format": "something else"})
    refused(tmp_path / "other.safetensors", "not a read-counts file")
    bad = ReadCounts(counts.reads, counts.documents_reading + 100, counts.documents, 1)  # more than were counted
    save_read_counts(bad, tmp_path / "bad.safetensors")
    refused(tmp_path / "bad.safetensors", "inconsistent")
    # Version 1 counted document frequency per batch: refused with the reason, to be counted again.
    save_file({"reads": counts.reads, "batches_reading": counts.documents_reading}, str(tmp_path / "v1.safetensors"),
              metadata={"format": "titanmem-memory-read-counts-v1", "batches": "20", "tokens": "1280"})
    refused(tmp_path / "v1.safetensors", "per batch .format v1.")


def finetune_config(small_config, mode, **sections):
    memory = dict(TINY_MEMORY, **sections.pop("memory", {}))
    return small_config(training=dict({"steps": 3, "seq_len": 16, "local_batch_size": 2}, **sections.pop(
        "training", {})), memory=memory, finetune=dict({"mode": mode}, **sections.pop("finetune", {})), **sections)


def test_values_only_trains_the_table_alone_and_frozen_parameters_keep_no_state(small_config):
    trainer = Trainer(finetune_config(small_config, "values_only", memory={"value_optimizer": "adamw"}))
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    batch = next(iter(trainer.dataloader))
    for _ in range(2):
        trainer.train_step(iter([batch]))
    trained = [p for group in trainer.optimizers.dense.param_groups for p in group["params"]]
    assert trained == [trainer.model.memory_values.weight]
    assert set(trainer.optimizers.dense.state) == {trainer.model.memory_values.weight}
    for name, param in trainer.model.named_parameters():
        if name == "memory_values.weight":
            assert not torch.equal(param, before[name])
        else:
            assert torch.equal(param, before[name]), f"{name} moved"
            assert param.grad is None and not param.requires_grad
    trainer.close()


def save_background(folder, seed=4) -> str:
    path = folder / "background.safetensors"
    save_read_counts(random_counts(seed), path)
    return str(path)


def test_sparse_memory_updates_only_the_selected_rows_and_the_rest_stays_bit_identical(tmp_path, small_config):
    background = save_background(tmp_path)
    config = finetune_config(small_config, "sparse_memory", memory={"value_optimizer": "adagrad", "value_lr": 0.05},
                             finetune={"top_t": 6, "background_counts": background})
    trainer = Trainer(config)
    values = trainer.optimizers.values
    # Give every row a non-zero accumulator first, so that "unchanged" is not just "still zero".
    values.first.uniform_(0.5, 1.0)
    selections = []
    selector = values.row_selector

    def recording(rows, offsets, blocks_group=None):
        chosen = selector(rows, offsets, blocks_group)
        selections.append((rows.clone(), chosen.clone()))
        return chosen

    values.row_selector = recording
    dense_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if n != "memory_values.weight"}
    batches = iter(trainer.dataloader)
    for _ in range(2):
        table, state = trainer.model.memory_values.weight.detach().clone(), values.first.clone()
        trainer.train_step(batches)
        rows, chosen = selections[-1]
        assert int(chosen.sum()) == 6 and rows.numel() > 6  # the step read more rows than it trained
        trained = torch.zeros(N_VALUES, dtype=torch.bool)
        trained[rows[chosen].long()] = True
        now = trainer.model.memory_values.weight.detach()
        assert torch.equal(now[~trained], table[~trained]), "a row outside the selection moved"
        assert torch.equal(values.first[~trained], state[~trained]), "the state of a row outside the selection moved"
        assert (now[trained] != table[trained]).any(dim=1).all() and (values.first[trained] > state[trained]).all()
    for name, param in trainer.model.named_parameters():
        if name != "memory_values.weight":
            assert torch.equal(param, dense_before[name]) and not trainer.optimizers.dense.state.get(param)
    trainer.close()


def test_a_resume_mid_finetune_is_bitwise_in_deterministic_mode(tmp_path, small_config):
    """Start from a pretraining checkpoint, finetune sparse_memory per step for 4 steps, saving every 2; a crash
    after step 3 and a resume give the straight run's losses and table bit for bit."""
    pretrain = small_config(training={"steps": 2, "seq_len": 16, "local_batch_size": 2},
                            memory=TINY_MEMORY, checkpoint={"enable": True, "interval": 2})
    pretrain.job.dump_folder = str(tmp_path / "pretrain")
    Trainer(pretrain).train()
    background = save_background(tmp_path)

    def config(name):
        c = finetune_config(small_config, "sparse_memory", training={"steps": 4, "deterministic": True},
                            memory={"value_optimizer": "adam", "value_lr": 0.05},
                            finetune={"top_t": 5, "background_counts": background},
                            checkpoint={"enable": True, "interval": 2,
                                        "initial_load_path": str(tmp_path / "pretrain/checkpoint/step-2")})
        c.job.dump_folder = str(tmp_path / name)
        return c

    trainer = Trainer(config("straight"))
    expected = trainer.train()
    expected_table = trainer.model.memory_values.weight.detach().clone()
    trainer.close()

    trainer = Trainer(config("crashed"))
    crash_after(trainer, 3)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    trainer.close()
    trainer = Trainer(config("crashed"))
    resumed = trainer.train()
    assert sorted(resumed) == [3, 4]
    assert [resumed[s] for s in (3, 4)] == [expected[s] for s in (3, 4)]
    assert torch.equal(trainer.model.memory_values.weight, expected_table)
    trainer.close()


def test_the_counting_tool_counts_a_checkpoint_over_its_data_and_refuses_to_write_into_a_run(tmp_path, small_config,
                                                                                             capsys):
    pretrain = small_config(training={"steps": 1, "seq_len": 16, "local_batch_size": 2},
                            memory=TINY_MEMORY, checkpoint={"enable": True, "interval": 1})
    pretrain.job.dump_folder = str(tmp_path / "run")
    Trainer(pretrain).train()
    argv = ["--training.device", "cpu", "--training.seq_len", "16", "--training.local_batch_size", "2",
            *[f"--memory.{k}={str(v).lower()}" for k, v in TINY_MEMORY.items()],
            "--checkpoint.initial_load_path", str(tmp_path / "run/checkpoint/step-1"),
            "--job.dump_folder", str(tmp_path / "elsewhere")]

    from titanmem import count_memory_reads

    def tool(*args):
        code = count_memory_reads.main([*args, *argv])
        return code, capsys.readouterr().err

    code, error = tool("--out", str(tmp_path / "run/counts.safetensors"), "--batches", "3")
    assert code == 2 and "--out" in error and "never writes" in error
    assert not (tmp_path / "run/counts.safetensors").exists()
    code, error = tool("--out", str(tmp_path / "counts.safetensors"), "--batches", "3")
    assert code == 0, error
    counts = load_read_counts(tmp_path / "counts.safetensors", "x", N_VALUES)
    # 3 batches of 2 × 16 tokens, each read by 3 memory layers of 1 head × 4 slots.
    assert (counts.documents, counts.batches, counts.tokens) == (6, 3, 96)
    assert int(counts.reads.sum()) == 96 * 3 * 4
    # 16 tokens × 12 reads over 64 rows: a sequence reads many rows, and no row is read more often than it is read.
    assert 0 < int(counts.documents_reading.max()) <= 6
    assert bool((counts.documents_reading <= counts.reads).all())
    code, error = tool("--out", str(tmp_path / "counts.safetensors"), "--batches", "3")
    assert code == 2 and "exists" in error


def test_finetune_settings_are_checked_before_anything_is_built(tmp_path):
    base = ["--training.device", "cpu", "--job.dump_folder", str(tmp_path / "run")]
    memory = ["--memory.enabled", "--memory.n_keys", "8", "--memory.knn", "4"]

    def refused(argv, field, match):
        with pytest.raises(ConfigError, match=match) as error:
            check_command_line(base + argv)
        assert error.value.field == field

    refused(["--finetune.mode", "values_only"], "finetune.mode", "has none")
    refused([*memory, "--finetune.mode", "sparse_memory", "--memory.value_optimizer", "adamw"],
            "memory.value_optimizer", "row-wise")
    refused([*memory, "--finetune.mode", "sparse_memory", "--memory.value_optimizer", "adagrad"],
            "finetune.background_counts", "is empty")
    refused([*memory, "--finetune.mode", "sparse_memory", "--memory.value_optimizer", "adagrad",
             "--finetune.background_counts", str(tmp_path / "none.safetensors")], "finetune.background_counts",
            "no such file")
    save_read_counts(random_counts(5, n_values=100), tmp_path / "wrong.safetensors")
    refused([*memory, "--finetune.mode", "sparse_memory", "--memory.value_optimizer", "adagrad",
             "--finetune.background_counts", str(tmp_path / "wrong.safetensors")], "finetune.background_counts",
            "100 rows")
    save_read_counts(random_counts(6), tmp_path / "right.safetensors")
    refused([*memory, "--finetune.mode", "sparse_memory", "--memory.value_optimizer", "adagrad",
             "--finetune.background_counts", str(tmp_path / "right.safetensors"), "--finetune.selection",
             "per_dataset"], "finetune.dataset_counts", "is empty")
    plan = check_command_line(base + [*memory, "--finetune.mode", "sparse_memory", "--memory.value_optimizer",
                                      "adagrad", "--finetune.background_counts", str(tmp_path / "right.safetensors")])
    assert plan.value_optimizer == "adagrad"


def test_the_finetuning_corpus_states_every_unseen_fact_and_no_seen_one(tmp_path, capsys):
    import json

    from titanmem.data.facts import RELATIONS, Fact

    facts = [Fact("capital", "Botswana", "Gaborone", seen=False), Fact("capital", "France", "Paris", seen=True),
             Fact("currency", "Japan", "Japanese yen", seen=False)]
    (tmp_path / "facts.jsonl").write_text("".join(json.dumps(f.to_json()) + "\n" for f in facts))
    out = tmp_path / "new.jsonl"

    from titanmem import build_finetune_facts

    def tool(*args):
        code = build_finetune_facts.main(list(args))
        return code, capsys.readouterr().err

    assert tool("--out", str(out), "--facts", str(tmp_path / "facts.jsonl"))[0] == 0
    texts = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    expected = []
    for fact in facts[0], facts[2]:
        relation = RELATIONS[fact.relation]
        expected += [relation.statement(fact.subject, fact.answer, t) for t in range(len(relation.train_templates))]
        expected.append(relation.qa_pair(fact.subject, fact.answer))
    assert sorted(texts) == sorted(expected)
    assert not any("France" in text for text in texts)
    code, error = tool("--out", str(out), "--facts", str(tmp_path / "facts.jsonl"))
    assert code == 2 and "exists" in error
    code, error = tool("--out", str(tmp_path / "other.jsonl"), "--facts", str(tmp_path / "none.jsonl"))
    assert code == 2 and "--facts" in error


def test_a_finetuning_setup_that_looks_wrong_is_warned_about(tmp_path):
    from titanmem.components.finetune import finetune_warnings
    from titanmem.config.sections import Finetune

    base, other = tmp_path / "base", tmp_path / "other"
    background = random_counts(7)
    background.description = {"checkpoint": str(base)}
    selector = RowSelector(5, background)
    sparse = Finetune(mode="sparse_memory")
    assert finetune_warnings(Finetune(mode="full"), None, False, None) == []
    assert finetune_warnings(sparse, base, False, selector) == []
    assert finetune_warnings(sparse, base, True, selector) == []
    (fresh,) = finetune_warnings(Finetune(mode="values_only"), None, False, None)
    assert "checkpoint.initial_load_path" in fresh
    (mismatch,) = finetune_warnings(sparse, other, False, selector)
    assert "background_counts" in mismatch and str(other) in mismatch
    # A resume goes on from the run's own checkpoint: neither warning applies.
    assert finetune_warnings(sparse, None, True, selector) == []
    empty = ReadCounts(torch.zeros(N_VALUES, dtype=torch.int64), torch.zeros(N_VALUES, dtype=torch.int64), 3)
    (nothing,) = finetune_warnings(sparse, base, False, RowSelector(5, background, empty))
    assert "no row will train" in nothing


def test_the_counting_tool_sums_the_data_parallel_ranks_counts(tmp_path, small_config):
    """Under torchrun each data-parallel rank counts its own shard's batches; the file holds their sum."""
    from helpers import count_reads_worker

    pretrain = small_config(training={"steps": 1, "seq_len": 16, "local_batch_size": 2},
                            memory=TINY_MEMORY, checkpoint={"enable": True, "interval": 1})
    pretrain.job.dump_folder = str(tmp_path / "run")
    Trainer(pretrain).train()
    argv = ["--out", str(tmp_path / "counts.safetensors"), "--batches", "2", "--training.device", "cpu",
            "--training.seq_len", "16", "--training.local_batch_size", "2",
            *[f"--memory.{k}={str(v).lower()}" for k, v in TINY_MEMORY.items()],
            "--checkpoint.initial_load_path", str(tmp_path / "run/checkpoint/step-1"),
            "--job.dump_folder", str(tmp_path / "elsewhere"), "--parallelism.dp_shard", "2"]
    launch_ranks(count_reads_worker, 2, argv)
    counts = load_read_counts(tmp_path / "counts.safetensors", "x", N_VALUES)
    # 2 ranks × 2 batches of 2 × 16 tokens, each read by 3 memory layers of 1 head × 4 slots.
    assert (counts.documents, counts.batches, counts.tokens) == (8, 4, 128)
    assert int(counts.reads.sum()) == 128 * 3 * 4
    # More documents than one rank counted read the busiest row: the ranks' document frequencies were summed.
    assert 4 < int(counts.documents_reading.max()) <= 8


def test_a_resume_may_unfreeze_what_the_saving_run_froze(tmp_path, small_config, caplog):
    """Resuming a sparse_memory run as a full one: AdamW's state of the parameters the saving run froze is not in the
    checkpoint, so it starts fresh, with a warning; the rest (the table, the row-wise state, the step) carries over."""
    background = save_background(tmp_path)

    def config(mode, steps):
        return finetune_config(small_config, mode, training={"steps": steps},
                               memory={"value_optimizer": "adagrad", "value_lr": 0.05},
                               finetune={"top_t": 6, "background_counts": background},
                               checkpoint={"enable": True, "interval": 2})

    trainer = Trainer(config("sparse_memory", 2))
    trainer.train()
    table = trainer.model.memory_values.weight.detach().clone()
    state = trainer.optimizers.values.first.clone()
    trainer.close()
    trainer = Trainer(config("full", 3))
    assert trainer.checkpointer.load(trainer.plan.checkpoint_to_load) == 2
    assert torch.equal(trainer.model.memory_values.weight, table)
    assert torch.equal(trainer.optimizers.values.first, state)
    assert "starts fresh" in caplog.text
    trainer.close()
