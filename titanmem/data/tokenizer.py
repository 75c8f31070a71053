"""A thin tokenizer over tiktoken that loads a local ranks file or a Hugging Face byte-level BPE tokenizer.json, so
training never needs the network."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import tiktoken

from titanmem.config.errors import ConfigError
from titanmem.config.manager import resolve_asset_path
from titanmem.config.sections import Tokenizer as TokenizerConfig
from titanmem.data.hf_tokenizer import encoding_from_tokenizer_json

# GPT-4's (cl100k's) pre-tokenisation split, which Llama 3 shares; used when a ranks file comes without a sidecar
# naming its own.
DEFAULT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)


def read_ranks(path: Path) -> dict[bytes, int]:
    """Parse `base64(token) rank` lines. Read directly rather than through tiktoken's loader, which caches by path
    and would serve a stale copy of a regenerated file."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise ConfigError("tokenizer.path", f"{path}:{line_number} is not a `base64 rank` line") from None
    if not ranks:
        raise ConfigError("tokenizer.path", f"{path} holds no ranks")
    return ranks


class Tokenizer:
    """Encodes text to ids and back; `eos_id` separates packed documents."""

    def __init__(self, encoding: tiktoken.Encoding, eos_token: str):
        if eos_token not in encoding.special_tokens_set:
            raise ConfigError(
                "tokenizer.eos_token",
                f"{eos_token!r} is not a special token of {encoding.name}; it has {sorted(encoding.special_tokens_set)}",
            )
        self.encoding = encoding
        self.eos_id = encoding.encode_single_token(eos_token)

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        # Ordinary encoding: a document that happens to contain "<|endoftext|>" must not inject a separator.
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids)


def load_encoding_file(path: Path, eos_token: str) -> tiktoken.Encoding:
    ranks = read_ranks(path)
    sidecar = path.with_suffix(".json")
    meta = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    special_tokens = meta.get("special_tokens") or {eos_token: max(ranks.values()) + 1}
    return tiktoken.Encoding(
        name=meta.get("name", path.stem),
        pat_str=meta.get("pat_str", DEFAULT_PATTERN),
        mergeable_ranks=ranks,
        special_tokens=special_tokens,
    )


def is_tokenizer_json(path: Path) -> bool:
    """Whether `path` is a JSON file (a Hugging Face tokenizer.json) rather than a tiktoken ranks file: by its suffix,
    or, for a file named otherwise, by its first character (a ranks file starts with base64)."""
    if path.suffix.lower() == ".json":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(64).lstrip().startswith(b"{")
    except OSError:
        return False  # the run plan reports a missing file


def load_tokenizer_json(path: Path, eos_token: str) -> tiktoken.Encoding:
    """The encoding of a Hugging Face tokenizer.json, after checking that `eos_token` is one of its special tokens:
    such a file's EOS is rarely titanmem's default, so the error names the one its folder configures."""
    encoding, meta = encoding_from_tokenizer_json(path)
    if eos_token not in encoding.special_tokens_set:
        names = sorted(encoding.special_tokens_set)
        have = f"it has {names}" if len(names) <= 8 else f"it has {len(names)}, e.g. {names[:3]}"
        fix = (f"set tokenizer.eos_token = {meta['eos_token']!r}, the EOS of the tokenizer_config.json beside it"
               if meta.get("eos_token") in encoding.special_tokens_set else "set tokenizer.eos_token to one of them")
        raise ConfigError("tokenizer.eos_token", f"{eos_token!r} is not a special token of {path} ({have}); {fix}")
    return encoding


def build_tokenizer(config: TokenizerConfig) -> Tokenizer:
    if config.path:
        path = resolve_asset_path(config.path)
        if is_tokenizer_json(path):
            return Tokenizer(load_tokenizer_json(path, config.eos_token), config.eos_token)
        return Tokenizer(load_encoding_file(path, config.eos_token), config.eos_token)
    try:
        encoding = tiktoken.get_encoding(config.name)
    except Exception as e:  # noqa: BLE001 - tiktoken raises ValueError for unknown names and network errors offline
        raise ConfigError(
            "tokenizer.name",
            f"cannot load encoding {config.name!r} ({type(e).__name__}: {e}); offline, set tokenizer.path to a local "
            ".tiktoken file instead",
        ) from None
    return Tokenizer(encoding, config.eos_token)
