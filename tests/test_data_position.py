"""The stream's position dealt out to another number of shards: every document is read exactly once per epoch
across the change, none skipped, none repeated."""

import collections
import itertools
import json
import random

import pytest
from torchdata.stateful_dataloader import StatefulDataLoader

from titanmem.config.sections import Data as DataConfig
from titanmem.config.sections import Tokenizer as TokenizerConfig
from titanmem.data import PackedTokenDataset, build_tokenizer
from titanmem.data.files import resolve_data_source
from titanmem.data.position import is_consumed, reshard, shard_states
from titanmem.data.text import load_documents


class LoggedDataset(PackedTokenDataset):
    """Logs (epoch, document id) of each document as this shard reads it."""

    def __init__(self, *args, log, **kwargs):
        super().__init__(*args, **kwargs)
        self.log = log

    def _texts(self):
        for text in super()._texts():
            self.log.append((self._epoch, int(text.split()[0].removeprefix("doc"))))
            yield text


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(0)
    texts = [f"doc{i} " + " ".join("word" for _ in range(rng.randint(1, 40))) for i in range(41)]
    path = tmp_path_factory.mktemp("corpus") / "d.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    config = DataConfig(path=str(path))
    return load_documents(config, resolve_data_source(config)), len(texts)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(TokenizerConfig())


def advance(datasets_and_counts):
    """Read `count` windows from each shard's dataset; returns their states."""
    states = []
    for dataset, count in datasets_and_counts:
        list(itertools.islice(iter(dataset), count))
        states.append(dataset.state_dict())
    return states


def shards(documents, tokenizer, count, log, states=None):
    made = [LoggedDataset(documents, tokenizer, 16, dp_rank=r, dp_world_size=count, log=log) for r in range(count)]
    for dataset in made:
        if states is not None:
            dataset.continue_from(states)
    return made


def finish_epoch(dataset, last_epoch):
    """Read until the shard has passed `last_epoch`."""
    iterator = iter(dataset)
    while dataset._epoch <= last_epoch:
        next(iterator)


def assert_each_document_once_per_epoch(log, documents, last_epoch):
    counts = collections.Counter(entry for entry in log if entry[0] <= last_epoch)
    expected = {(epoch, doc) for epoch in range(last_epoch + 1) for doc in range(documents)}
    assert set(counts) == expected, f"missing {sorted(expected - set(counts))[:5]}, extra {sorted(set(counts) - expected)[:5]}"
    repeated = {entry: n for entry, n in counts.items() if n > 1}
    assert not repeated, f"read twice: {sorted(repeated)[:5]}"


@pytest.mark.parametrize("before, after", [(2, 3), (3, 1), (4, 2), (1, 5)])
def test_a_change_of_shard_count_reads_every_document_once(corpus, tokenizer, before, after):
    documents, count = corpus
    log = []
    # Uneven progress: some shards cross into the next epoch before the save.
    old = shards(documents, tokenizer, before, log)
    saved = advance([(dataset, 6 + 9 * rank) for rank, dataset in enumerate(old)])
    last_epoch = max(state["epoch"] for state in saved) + 1
    new = shards(documents, tokenizer, after, log, reshard(saved, after))
    for dataset in new:
        finish_epoch(dataset, last_epoch)
    assert_each_document_once_per_epoch(log, count, last_epoch)
    # The saved shards' unfinished tokens are handed on, not dropped.
    assert sum(len(s["buffer"]) for s in saved) == sum(len(s["buffer"]) for s in reshard(saved, after))


def test_changes_compose_and_survive_a_save_in_between(corpus, tokenizer):
    documents, count = corpus
    log = []
    first = advance([(d, 5 + 7 * r) for r, d in enumerate(shards(documents, tokenizer, 2, log))])
    # 2 shards -> 3, read a little (tables still in force), save, -> 5.
    middle = shards(documents, tokenizer, 3, log, reshard(first, 3))
    second = advance([(d, 3 + 4 * r) for r, d in enumerate(middle)])
    assert all(state.get("consumed") for state in second)
    last_epoch = max(state["epoch"] for state in first + second) + 1
    final = shards(documents, tokenizer, 5, log, reshard(second, 5))
    for dataset in final:
        finish_epoch(dataset, last_epoch)
    assert_each_document_once_per_epoch(log, count, last_epoch)
    # Past their epochs, the tables are dropped: nothing is skipped any more.
    assert all(not dataset.state_dict().get("consumed") for dataset in final)


def test_loader_workers_are_shards_in_rank_order(corpus, tokenizer):
    """With 2 loader workers, the loader state holds two shard positions, equal to two single-shard datasets of a
    2-shard split advanced by the same windows (workers take batches in turn)."""
    documents, _ = corpus
    loader = StatefulDataLoader(PackedTokenDataset(documents, tokenizer, 16), batch_size=3, num_workers=2)
    list(itertools.islice(iter(loader), 6))
    got = shard_states(loader.state_dict(), num_workers=2)
    expected = advance([(PackedTokenDataset(documents, tokenizer, 16, dp_rank=r, dp_world_size=2), 9) for r in (0, 1)])
    assert got == expected


def test_consumed_table_against_its_definition():
    table = {"shards": 3, "epochs": [1, 0, 2], "next": [2, 5, 1]}
    for epoch in range(4):
        for document in range(30):
            shard, index = document % 3, document // 3
            expected = epoch < table["epochs"][shard] or (epoch == table["epochs"][shard]
                                                          and index < table["next"][shard])
            assert is_consumed([table], document, epoch) == expected


def test_a_streamed_dataset_refuses_to_continue_on_another_shard_count(tmp_path, tokenizer):
    from titanmem.config import ConfigError

    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a b"}\n{"text": "c d"}\n')
    config = DataConfig(path=str(path), streaming=True)
    dataset = PackedTokenDataset(load_documents(config, resolve_data_source(config)), tokenizer, 4)
    with pytest.raises(ConfigError) as info:
        dataset.continue_from([{"epoch": 0, "next_document": 0, "buffer": []}])
    assert info.value.field == "data.on_reshard" and "'restart'" in str(info.value)
