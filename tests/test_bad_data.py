"""Broken training data, as a hostile user would hand it over: each case stops with one line naming the file, the line
and the reason before the model is built, or, with `data.on_bad_record = "skip"`, is left out and counted."""

import gzip
import json
import logging
import os
import random

import pytest
from torchdata.stateful_dataloader import StatefulDataLoader

from titanmem.config import ConfigError
from titanmem.config.sections import Data as DataConfig
from titanmem.config.sections import Tokenizer as TokenizerConfig
from titanmem.data import PackedTokenDataset, build_tokenizer
from titanmem.data.files import resolve_data_source
from titanmem.data.text import STREAM_SAMPLE_RECORDS, load_documents as load_source

GOOD = ["a first good document", "a second one", "the third and last"]


def jsonl(*lines: bytes) -> bytes:
    return b"".join(lines)


def good_line(text: str) -> bytes:
    return (json.dumps({"text": text, "id": 1}) + "\n").encode()


def damaged_gzip() -> bytes:
    whole = gzip.compress(b"".join(good_line(f"document {i} " + "word " * 50) for i in range(2000)))
    return whole[: len(whole) // 2]


# name -> (file name, bytes, the bad record's line, words of its reason). Good records surround the bad one where the
# format has records, so a skip must keep exactly those.
BAD_RECORDS = {
    "invalid UTF-8 in a line": ("d.jsonl", jsonl(good_line(GOOD[0]), b'{"text": "caf\xe9"}\n', good_line(GOOD[1])),
                                2, "not UTF-8 (byte 0xe9"),
    "a line that is not JSON": ("d.jsonl", jsonl(good_line(GOOD[0]), b"hello there\n", good_line(GOOD[1])),
                                2, "not valid JSON"),
    "a truncated last line": ("d.jsonl", jsonl(good_line(GOOD[0]), good_line(GOOD[1]), b'{"text": "cut sh'),
                              3, "a truncated last line"),
    "a JSON array, not an object": ("d.jsonl", jsonl(good_line(GOOD[0]), b'["text"]\n', good_line(GOOD[1])),
                                    2, "a JSON list, not an object"),
    "an object as the text": ("d.jsonl", jsonl(good_line(GOOD[0]), b'{"text": {"nested": 1}}\n',
                                               good_line(GOOD[1])), 2, "'text' holds a JSON dict, not text"),
    "a number as the text": ("d.jsonl", jsonl(good_line(GOOD[0]), good_line(GOOD[1]), b'{"text": 5}\n'),
                             3, "'text' holds a JSON int"),
    "a record without the text field": ("d.jsonl", jsonl(good_line(GOOD[0]), b'{"body": "x"}\n', good_line(GOOD[1])),
                                        2, "no field 'text' (its fields: body)"),
    "a lone surrogate in the text": ("d.jsonl", jsonl(good_line(GOOD[0]), b'{"text": "bad \\ud800 half"}\n',
                                                      good_line(GOOD[1])), 2, "lone surrogate (U+D800"),
    "an integer too long to convert": ("d.jsonl", jsonl(good_line(GOOD[0]), b'{"text": "x", "n": ' + b"9" * 5000
                                                        + b"}\n", good_line(GOOD[1])), 2, "not usable JSON"),
    "nesting too deep": ("d.jsonl", jsonl(good_line(GOOD[0]), b"[" * 100000 + b"]" * 100000 + b"\n",
                                          good_line(GOOD[1])), 2, "not usable JSON (RecursionError"),
    "a JSON array file nested too deep": ("d.json", b"[" * 100000 + b"]" * 100000, 1, "not usable JSON"),
    "a gzip file of random bytes": ("d.jsonl.gz", random.Random(0).randbytes(4096), 1, "BadGzipFile"),
    "a text file with invalid UTF-8": ("d.txt", b"line one\nline \xff two\n", 2, "not UTF-8 (byte 0xff at column 6)"),
    "a JSON array file cut short": ("d.json", b'[{"text": "a"},\n{"text": "b"', 2, "not valid JSON"),
}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(TokenizerConfig())


def write(tmp_path, name: str, content: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


def load_documents(config: DataConfig):
    return load_source(config, resolve_data_source(config))


def stream_of(tokenizer, texts) -> list[int]:
    return [t for text in texts for t in tokenizer.encode(text) + [tokenizer.eos_id]]


def packed_tokens(documents, tokenizer, count: int, **kwargs) -> list[int]:
    dataset = PackedTokenDataset(documents, tokenizer, 1, **kwargs)
    iterator = iter(dataset)
    return [int(next(iterator)["input"][0]) for _ in range(count)]


def train_command_line(monkeypatch, capsys, argv) -> tuple[int, list[str]]:
    """The training entry point's exit code and stderr lines; building the model fails the test."""
    import titanmem.build
    from titanmem.train import main

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the data was checked")

    monkeypatch.setattr(titanmem.build, "build_planned_model", no_model)
    code = main(argv + ["--training.device", "cpu", "--metrics.enable_tensorboard", "false"])
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_a_bad_record_stops_training_with_its_file_line_and_reason_before_the_model(tmp_path, monkeypatch, capsys,
                                                                                    case):
    name, content, line, reason = BAD_RECORDS[case]
    path = write(tmp_path, name, content)
    code, err = train_command_line(monkeypatch, capsys, ["--data.path", path, "--job.dump_folder",
                                                         str(tmp_path / "run")])
    assert code == 2
    assert len(err) == 1, err
    assert err[0].startswith(f"error: config error in data.path: bad record at {path} line {line}: "), err[0]
    assert reason in err[0] and "data.on_bad_record = 'skip'" in err[0]
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").rglob("step-*"))


@pytest.mark.parametrize("streaming", [False, True], ids=["table", "stream"])
@pytest.mark.parametrize("case", [c for c in sorted(BAD_RECORDS) if BAD_RECORDS[c][0] == "d.jsonl"])
def test_skip_leaves_out_exactly_the_bad_record_and_counts_it(tmp_path, tokenizer, caplog, case, streaming):
    name, content, line, reason = BAD_RECORDS[case]
    config = DataConfig(path=write(tmp_path, name, content), on_bad_record="skip", streaming=streaming)
    with caplog.at_level(logging.WARNING, logger="titanmem"):
        documents = load_documents(config)
    assert any("1 bad record(s)" in r.getMessage() and f"line {line}" in r.getMessage() for r in caplog.records)
    good = [json.loads(raw)["text"] for i, raw in enumerate(content.splitlines(), start=1) if i != line]
    expected = stream_of(tokenizer, good)
    dataset_tokens = packed_tokens(documents, tokenizer, len(expected) - 1, on_bad_record="skip")
    assert dataset_tokens == expected[:-1]
    with pytest.raises(ConfigError, match=f"line {line}: "):
        load_documents(DataConfig(path=config.path, streaming=streaming))


def test_a_damaged_gzip_keeps_the_records_before_the_damage_under_skip(tmp_path, tokenizer, caplog):
    path = write(tmp_path, "d.jsonl.gz", damaged_gzip())
    with caplog.at_level(logging.WARNING, logger="titanmem"):
        documents = load_documents(DataConfig(path=path, on_bad_record="skip"))
    readable = len(documents) - 1
    assert readable > 100 and documents[readable]["text"] is None
    assert documents[readable - 1]["text"] == f"document {readable - 1} " + "word " * 50
    assert any("EOFError" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("texts", [[], ["", None, ""]], ids=["empty file", "empty documents"])
def test_a_corpus_without_text_stops_before_the_model(tmp_path, monkeypatch, capsys, texts):
    path = write(tmp_path, "d.jsonl", b"".join(good_line(t) for t in texts))
    code, err = train_command_line(monkeypatch, capsys, ["--data.path", path, "--job.dump_folder",
                                                         str(tmp_path / "run")])
    assert code == 2 and err == [f"error: config error in data.path: no document of {path} holds any text"]


def test_a_wrong_text_field_names_the_setting_not_a_bad_record(tmp_path):
    path = write(tmp_path, "d.jsonl", b'{"body": "x", "id": 1}\n')
    with pytest.raises(ConfigError) as info:
        load_documents(DataConfig(path=path, on_bad_record="skip"))
    assert info.value.field == "data.text_field" and "its fields: body, id" in info.value.problem


def test_a_streamed_corpus_checks_its_first_file_before_the_model(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "corpus"
    folder.mkdir()
    lines = [good_line(f"doc {i}") for i in range(50)] + [b"not json\n"]
    write(folder, "a.jsonl", b"".join(lines))
    code, err = train_command_line(monkeypatch, capsys, ["--data.path", str(folder), "--data.streaming", "true",
                                                         "--job.dump_folder", str(tmp_path / "run")])
    assert code == 2 and len(err) == 1 and f"{folder}/a.jsonl line 51: not valid JSON" in err[0]
    assert STREAM_SAMPLE_RECORDS >= 51


def test_a_bad_record_read_by_a_loader_worker_is_still_one_config_error(tmp_path, tokenizer):
    folder = tmp_path / "corpus"
    folder.mkdir()
    write(folder, "a.jsonl", b"".join(good_line(f"first file {i}") for i in range(20)))
    write(folder, "b.jsonl", good_line("second file") + b'{"text": [1, 2]}\n')
    documents = load_documents(DataConfig(path=str(folder), streaming=True))
    loader = StatefulDataLoader(PackedTokenDataset(documents, tokenizer, 4), batch_size=1, num_workers=2)
    with pytest.raises(ConfigError) as info:
        for _ in loader:
            pass
    assert info.value.field == "data.path"
    assert info.value.problem.startswith(f"bad record at {folder}/b.jsonl line 2: 'text' holds a JSON list")


def test_an_edited_file_is_read_again_not_taken_from_the_cache(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(good_line("good"))
    assert load_documents(DataConfig(path=str(path)))["text"] == ["good"]
    path.write_bytes(good_line("good") + b"broken\n")
    with pytest.raises(ConfigError, match="line 2: not valid JSON"):
        load_documents(DataConfig(path=str(path)))


@pytest.mark.parametrize("kind", ["random bytes", "struct column"])
def test_a_bad_parquet_file_is_one_config_error(tmp_path, kind):
    import datasets

    path = tmp_path / "d.parquet"
    if kind == "random bytes":
        path.write_bytes(os.urandom(2048))
        field = "data.path"
    else:
        datasets.Dataset.from_dict({"text": [{"a": "x"}, {"a": "y"}]}).to_parquet(str(path))
        field = "data.text_field"
    with pytest.raises(ConfigError) as info:
        load_documents(DataConfig(path=str(path)))
    assert info.value.field == field and str(path) in info.value.problem


def test_a_non_string_text_from_a_reader_without_marks_is_a_bad_record(tokenizer):
    import datasets

    def rows():
        yield {"text": ["a", "list"]}
        yield {"text": "fine text"}

    documents = datasets.IterableDataset.from_generator(rows)
    with pytest.raises(ConfigError, match="document 0 of shard 0: 'text' holds list"):
        packed_tokens(documents, tokenizer, 2)
    assert packed_tokens(documents, tokenizer, 2, on_bad_record="skip") == stream_of(tokenizer, ["fine text"])[:2]


@pytest.mark.parametrize("line, reason", [
    (b'{"relation": "capital", "subject": "X"}\n', "not a fact"),
    (b'{"relation": "no such relation", "subject": "X", "answer": "Y", "seen": true}\n', "unknown relation"),
    (b'{"relation": "capital", "subj', "a truncated last line"),
    (b'{"relation": "capital", "subject": "X", "answer": "Y", "seen": true, "qa": "yes"}\n', "not a fact"),
    (b'{"relation": "capital", "subject": "X", "answer": "Y", "seen": true, "extra": 1}\n', "not a fact"),
    (b'{"relation": "capital", "subject": "X", "answer": "Y", "seen": false, "qa": true}\n', "an unseen fact marked qa"),
    (b'["capital", "X", "Y", true]\n', "not a fact"),
])
def test_a_bad_fact_file_names_the_setting_the_file_and_the_line(tmp_path, line, reason):
    from titanmem.data.facts import load_facts

    good = b'{"relation": "capital", "subject": "Botswana", "answer": "Gaborone", "seen": true}\n'
    path = write(tmp_path, "facts.jsonl", good + line)
    with pytest.raises(ConfigError) as info:
        load_facts(path)
    assert info.value.field == "data.facts_path"
    assert info.value.problem.startswith(f"bad record at {path} line 2: {reason}")


def test_a_bad_heldout_file_names_eval_perplexity_path(tmp_path, tokenizer):
    from titanmem.eval.runner import heldout_tokens

    path = write(tmp_path, "heldout.jsonl", good_line("fine") + b"\xff\n")
    with pytest.raises(ConfigError) as info:
        heldout_tokens(path, tokenizer, 100)
    assert info.value.field == "eval.perplexity_path" and f"{path} line 2: not UTF-8" in info.value.problem
    assert heldout_tokens(write(tmp_path, "ok.txt", b"plain text"), tokenizer, 100) == stream_of(tokenizer,
                                                                                                  ["plain text"])


def test_a_config_error_survives_pickling_and_torchs_worker_reraise():
    import pickle

    from torch._utils import ExceptionWrapper

    error = ConfigError("data.path", "bad record at f line 3: not JSON: really")
    assert (pickle.loads(pickle.dumps(error)).field, pickle.loads(pickle.dumps(error)).problem) == (
        "data.path", "bad record at f line 3: not JSON: really")
    try:
        raise error
    except ConfigError:
        wrapper = ExceptionWrapper(where="in DataLoader worker process 1")
    with pytest.raises(ConfigError) as info:
        wrapper.reraise()
    assert (info.value.field, info.value.problem) == (error.field, error.problem)


def test_a_byte_order_mark_and_windows_line_ends_are_not_bad_records(tmp_path):
    bom = b"\xef\xbb\xbf"
    jsonl = write(tmp_path, "d.jsonl", bom + b'{"text": "first"}\r\n{"text": "second"}\r\n')
    assert load_documents(DataConfig(path=jsonl))["text"] == ["first", "second"]
    array = write(tmp_path, "a.json", bom + b'[{"text": "one"}]')
    assert load_documents(DataConfig(path=array))["text"] == ["one"]
    text = write(tmp_path, "t.txt", bom + "caf\u00e9".encode())
    assert load_documents(DataConfig(path=text))["text"] == ["caf\u00e9"]
