import itertools
import json
import random

import pytest
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from titanmem.config import ConfigError
from titanmem.config.sections import Data as DataConfig
from titanmem.config.sections import Tokenizer as TokenizerConfig
from titanmem.data import PackedTokenDataset, build_tokenizer
from titanmem.data.files import resolve_data_source
from titanmem.data.text import load_documents as load_source


def load_documents(config: DataConfig):
    """The corpus of `config`, its source resolved as the run plan resolves it."""
    return load_source(config, resolve_data_source(config))


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(TokenizerConfig())


def random_documents(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = ["memory", "layer", "value", "key", "token", "the", "of", "Gaborone", "é", "42", "\n"]
    return [f"doc{i} " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 60))) for i in range(count)]


def write_jsonl(path, texts, field="text"):
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return str(path)


def take(iterator, n):
    return list(itertools.islice(iterator, n))


def expected_stream(tokenizer, texts):
    stream = []
    for text in texts:
        stream += tokenizer.encode(text) + [tokenizer.eos_id]
    return stream


@pytest.mark.parametrize("seq_len", [1, 7, 64])
def test_packing_cuts_the_eos_separated_stream_into_overlapping_windows(tmp_path, tokenizer, seq_len):
    texts = random_documents(13, seed=seq_len)
    documents = load_documents(DataConfig(path=write_jsonl(tmp_path / "d.jsonl", texts)))
    windows = take(iter(PackedTokenDataset(documents, tokenizer, seq_len)), 40)
    stream = expected_stream(tokenizer, texts) * 3  # the dataset cycles over the corpus
    for i, window in enumerate(windows):
        assert window["input"].tolist() == stream[i * seq_len : i * seq_len + seq_len]
        assert window["labels"].tolist() == stream[i * seq_len + 1 : i * seq_len + seq_len + 1]
        assert window["input"].dtype == torch.long


def test_a_literal_special_token_in_text_is_not_a_separator(tokenizer):
    ids = tokenizer.encode("before <|endoftext|> after")
    assert tokenizer.eos_id not in ids
    assert tokenizer.decode(ids) == "before <|endoftext|> after"


def test_ranks_shard_documents_disjointly_and_completely(tmp_path, tokenizer):
    texts = random_documents(11, seed=3)
    documents = load_documents(DataConfig(path=write_jsonl(tmp_path / "d.jsonl", texts)))
    seq_len = 5
    for rank in range(3):
        dataset = PackedTokenDataset(documents, tokenizer, seq_len, dp_rank=rank, dp_world_size=3)
        shard_texts = texts[rank::3]
        stream = expected_stream(tokenizer, shard_texts)
        windows = take(iter(dataset), len(stream) // seq_len - 1)
        got = [t for w in windows for t in w["input"].tolist()]
        assert got == stream[: len(got)]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_state_round_trip_resumes_on_the_exact_token(tmp_path, tokenizer, num_workers):
    texts = random_documents(9, seed=num_workers)
    documents = load_documents(DataConfig(path=write_jsonl(tmp_path / "d.jsonl", texts)))

    def loader():
        return StatefulDataLoader(PackedTokenDataset(documents, tokenizer, 16), batch_size=3, num_workers=num_workers)

    original = loader()
    batches = iter(original)
    take(batches, 7)
    state = original.state_dict()
    # Enough batches to cross an epoch boundary of this small corpus.
    expected = take(batches, 25)

    resumed = loader()
    resumed.load_state_dict(state)
    got = take(iter(resumed), 25)
    assert len(got) == 25
    for a, b in zip(got, expected):
        assert torch.equal(a["input"], b["input"]) and torch.equal(a["labels"], b["labels"])


def test_streaming_state_round_trip(tmp_path, tokenizer):
    texts = random_documents(10, seed=9)
    config = DataConfig(path=write_jsonl(tmp_path / "d.jsonl", texts), streaming=True)
    dataset = PackedTokenDataset(load_documents(config), tokenizer, 8)
    iterator = iter(dataset)
    take(iterator, 6)
    state = json.loads(json.dumps(dataset.state_dict()))  # must survive serialisation
    expected = take(iterator, 30)
    resumed = PackedTokenDataset(load_documents(config), tokenizer, 8)
    resumed.load_state_dict(state)
    got = take(iter(resumed), 30)
    assert [w["input"].tolist() for w in got] == [w["input"].tolist() for w in expected]


def test_text_and_parquet_formats_are_inferred(tmp_path, tokenizer):
    import datasets

    texts = random_documents(4, seed=1)
    folder = tmp_path / "txt"
    folder.mkdir()
    for i, text in enumerate(texts):
        (folder / f"{i}.txt").write_text(text)
    # A text file is one document: its newlines stay inside it.
    from_text = load_documents(DataConfig(path=str(folder)))
    assert sorted(from_text["text"]) == sorted(texts)

    parquet = tmp_path / "d.parquet"
    datasets.Dataset.from_dict({"body": texts}).to_parquet(str(parquet))
    from_parquet = load_documents(DataConfig(path=str(parquet), text_field="body"))
    assert from_parquet["body"] == texts


def test_wrong_text_field_and_mixed_formats_are_config_errors(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ["a", "b"], field="content")
    with pytest.raises(ConfigError) as info:
        load_documents(DataConfig(path=path))
    assert info.value.field == "data.text_field"
    (tmp_path / "x.parquet").write_bytes(b"")
    with pytest.raises(ConfigError) as info:
        load_documents(DataConfig(path=str(tmp_path)))
    assert info.value.field == "data.format"


def test_too_few_documents_for_the_shards_is_a_config_error(tmp_path, tokenizer):
    documents = load_documents(DataConfig(path=write_jsonl(tmp_path / "d.jsonl", ["only one"])))
    with pytest.raises(ConfigError, match="fewer than the 2 shards"):
        next(iter(PackedTokenDataset(documents, tokenizer, 4, dp_rank=1, dp_world_size=2)))


def test_bundled_corpus_loads_and_packs(tokenizer):
    documents = load_documents(DataConfig())
    assert len(documents) > 1000
    window = next(iter(PackedTokenDataset(documents, tokenizer, 128)))
    assert window["input"].shape == (128,)
    assert int(window["input"].max()) < tokenizer.vocab_size


def test_streaming_with_loader_workers_reads_every_file_once_per_epoch(tmp_path, tokenizer):
    folder = tmp_path / "stream"
    folder.mkdir()
    texts = random_documents(8, seed=5)
    for part in range(2):
        write_jsonl(folder / f"part{part}.jsonl", texts[part * 4 : part * 4 + 4])
    documents = load_documents(DataConfig(path=str(folder), streaming=True))
    seq_len = 4
    loader = StatefulDataLoader(PackedTokenDataset(documents, tokenizer, seq_len), batch_size=1, num_workers=2)
    # Workers take turns; each reads its own file. Collect enough windows to cover every file's stream.
    streams = [expected_stream(tokenizer, texts[p * 4 : p * 4 + 4]) for p in range(2)]
    per_worker = min(len(s) for s in streams) // seq_len - 1
    batches = take(iter(loader), 2 * per_worker)
    got = [[t for b in batches[w::2] for t in b["input"][0].tolist()] for w in range(2)]
    assert sorted(got) == sorted(s[: per_worker * seq_len] for s in streams)


def test_more_stream_workers_than_files_is_a_config_error(tmp_path, tokenizer):
    from titanmem.data.text import check_shardable

    documents = load_documents(DataConfig(path=write_jsonl(tmp_path / "d.jsonl", ["a", "b"]), streaming=True))
    with pytest.raises(ConfigError) as info:
        check_shardable(documents, dp_world_size=1, workers=2)
    assert info.value.field == "data.num_workers"


def test_empty_documents_are_skipped_and_an_all_empty_shard_is_an_error(tmp_path, tokenizer):
    texts = ["", "first", "", "second"]
    documents = load_documents(DataConfig(path=write_jsonl(tmp_path / "d.jsonl", texts)))
    windows = take(iter(PackedTokenDataset(documents, tokenizer, 2)), 3)
    got = [t for w in windows for t in w["input"].tolist()]
    assert got == (expected_stream(tokenizer, ["first", "second"]) * 3)[: len(got)]
    with pytest.raises(ConfigError, match="holds any text"):
        load_documents(DataConfig(path=write_jsonl(tmp_path / "e.jsonl", ["", None])))
    # Text in the corpus, but none in the shard of rank 0.
    lopsided = load_documents(DataConfig(path=write_jsonl(tmp_path / "l.jsonl", ["", "text"])))
    with pytest.raises(ConfigError, match="holds no text"):
        next(iter(PackedTokenDataset(lopsided, tokenizer, 2, dp_rank=0, dp_world_size=2)))


def test_fact_statements_are_mixed_in_at_the_configured_share_and_resume_exactly(tmp_path, tokenizer):
    from titanmem.data.facts import RELATIONS, load_facts

    facts = load_facts("assets/facts/facts.jsonl.gz")
    texts = random_documents(40, seed=3)
    documents = load_documents(DataConfig(path=write_jsonl(tmp_path / "d.jsonl", texts)))

    def dataset():
        return PackedTokenDataset(documents, tokenizer, 32, facts=facts, facts_fraction=0.25, seed=5)

    stream = dataset()
    windows = take(iter(stream), 60)
    text = tokenizer.decode([t for w in windows for t in w["input"].tolist()])
    prose = sum(len(tokenizer.encode(t)) + 1 for t in texts)
    total = 60 * 32
    # Every document is followed by statements of about a third of its length (0.25 / 0.75); within one pass the
    # statements' share of the stream is then close to 0.25 (a statement overshoots its target by < 1 statement).
    assert total < prose * 1.5
    statement_share = 1 - sum(len(tokenizer.encode(t)) + 1 for t in texts if t in text) / total
    assert 0.2 < statement_share < 0.35
    seen = {f for f in facts if f.seen}
    stated = [f for f in facts if any(RELATIONS[f.relation].statement(f.subject, f.answer, i) in text
                                      for i in range(len(RELATIONS[f.relation].train_templates)))]
    assert stated and all(f in seen for f in stated)

    # Resuming from a saved position yields the same windows, statements included.
    state = stream.state_dict()
    following = take(iter(stream), 10)
    resumed = dataset()
    resumed.load_state_dict(state)
    assert [w["input"].tolist() for w in take(iter(resumed), 10)] == [w["input"].tolist() for w in following]
    # Another seed states other facts.
    other = PackedTokenDataset(documents, tokenizer, 32, facts=facts, facts_fraction=0.25, seed=6)
    assert [w["input"].tolist() for w in take(iter(other), 60)] != [w["input"].tolist() for w in windows]
    assert "\nA: " not in text
    # With a Q/A share, question-answer pairs of the facts marked qa join the statements.
    asking = PackedTokenDataset(documents, tokenizer, 32, facts=facts, facts_fraction=0.25, facts_qa_share=0.5, seed=5)
    asked = tokenizer.decode([t for w in take(iter(asking), 60) for t in w["input"].tolist()])
    pairs = {RELATIONS[f.relation].qa_pair(f.subject, f.answer): f for f in facts}
    found = [fact for pair, fact in pairs.items() if pair in asked]
    assert found and all(fact.qa for fact in found)
