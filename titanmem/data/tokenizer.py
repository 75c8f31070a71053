"""A thin tokenizer over tiktoken that loads a local ranks file, so training never needs the network."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import tiktoken

from titanmem.config.errors import ConfigError
from titanmem.config.manager import resolve_asset_path
from titanmem.config.sections import Tokenizer as TokenizerConfig

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


def build_tokenizer(config: TokenizerConfig) -> Tokenizer:
    if config.path:
        return Tokenizer(load_encoding_file(resolve_asset_path(config.path), config.eos_token), config.eos_token)
    try:
        encoding = tiktoken.get_encoding(config.name)
    except Exception as e:  # tiktoken raises ValueError for unknown names and network errors offline
        raise ConfigError(
            "tokenizer.name",
            f"cannot load encoding {config.name!r} ({type(e).__name__}: {e}); offline, set tokenizer.path to a local "
            ".tiktoken file instead",
        ) from None
    return Tokenizer(encoding, config.eos_token)
