"""titanmem's tiktoken tokenizer as Hugging Face tokenizer files, and a Hugging Face byte-level BPE `tokenizer.json`
read back as a tiktoken encoding.

Both formats describe the same algorithm: split the text with a regex, map each piece to bytes, merge byte pairs by
priority. tiktoken's priority is the merged token's rank; a `tokenizers` BPE model's is the order of its merges list.
Plain JSON on purpose: the trainer never needs transformers or tokenizers installed.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import tiktoken

from titanmem.config.errors import ConfigError

# What a `ByteLevel` pre-tokenizer with `use_regex: true` splits by (GPT-2's pattern, as `tokenizers` spells it).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

_FIELD = "tokenizer.path"
_READABLE = ("only byte-level BPE tokenizer.json files are read (Llama 3's, GPT-2's, a titanmem hf export's); a "
             "tiktoken ranks file works too")
_COUNTED = re.compile(r"\{\d*(?:,\d*)?\}")


def byte_alphabet() -> list[str]:
    """GPT-2's map from each byte to one printable character: printable Latin-1 bytes stand for themselves, the rest
    (controls, space, 0x7f-0xa0, 0xad) for characters from U+0100 on in byte order. It keeps every token a printable
    string without spaces, so that a merge can be written as `"left right"`."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    alphabet, shifted = [], 0
    for byte in range(256):
        if byte in printable:
            alphabet.append(chr(byte))
        else:
            alphabet.append(chr(256 + shifted))
            shifted += 1
    return alphabet


def hf_tokenizer_files(encoding: tiktoken.Encoding, eos_token: str, model_max_length: int) -> dict[str, str]:
    """File name -> text of the Hugging Face files that tokenize exactly as `encoding.encode_ordinary`:
    `tokenizer.json` (a `tokenizers` BPE model), `tokenizer_config.json` and `special_tokens_map.json`. The texts are
    ASCII, so any file encoding writes them.

    The pad token is `eos_token`: batched `tokenizer(..., padding=True)`, `generate` and lm-evaluation-harness then
    work without setup, and the attention mask hides padded positions, so the model never reads them (it is what
    lm-evaluation-harness picks by itself for a tokenizer without one). A Hugging Face fine-tuning whose collator
    ignores the labels of pad tokens would ignore EOS too: set another pad token there. There is no BOS: titanmem
    trains without one."""
    if eos_token not in encoding.special_tokens_set:
        raise ConfigError("tokenizer.eos_token", f"{eos_token!r} is not a special token of {encoding.name}; it has "
                                                 f"{sorted(encoding.special_tokens_set)}")
    # The documented way to read an Encoding's parts (tiktoken's README extends encodings the same way).
    ranks: dict[bytes, int] = encoding._mergeable_ranks
    special_tokens = _dense_special_tokens(ranks, encoding._special_tokens)
    alphabet = byte_alphabet()

    def text(token: bytes) -> str:
        return "".join(alphabet[byte] for byte in token)

    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True}
                         for content, token_id in sorted(special_tokens.items(), key=lambda item: item[1])],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": oniguruma_pattern(encoding._pat_str)}, "behavior": "Isolated",
             "invert": False},
            # The Split above already cut the pieces; this only maps their bytes to the alphabet.
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
            # tiktoken takes a piece that is itself a token whole, before any merging.
            "ignore_merges": True,
            "vocab": {text(token): rank for token, rank in sorted(ranks.items(), key=lambda item: item[1])},
            "merges": [f"{text(left)} {text(right)}" for left, right in bpe_merges(ranks)],
        },
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": eos_token,
        "pad_token": eos_token,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "model_input_names": ["input_ids", "attention_mask"],
    }
    # Older transformers read the named special tokens from here rather than from tokenizer_config.json.
    special_map = {"eos_token": eos_token, "pad_token": eos_token}
    return {name: json.dumps(value, indent=2) + "\n" for name, value in
            (("tokenizer.json", tokenizer), ("tokenizer_config.json", config), ("special_tokens_map.json", special_map))}


def bpe_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merges list that makes a `tokenizers` BPE model merge exactly as tiktoken does with `ranks`: for each
    token, in rank order, the last merge of tiktoken's own merging of the token's bytes.

    tiktoken merges, among adjacent parts, the pair whose concatenation has the lowest rank (the leftmost of equals);
    a BPE model merges only listed pairs, the earliest listed first. Merges within a token's span follow the order
    they would have on its bytes alone until that span is one token or crossed by a merge, so tiktoken makes each
    token from one split only, the last merge on its bytes alone. Listing that split at the token's rank makes the
    model pick, at every step, the pair tiktoken picks. A token its own bytes never merge into is made only whole
    (`ignore_merges`), in both."""
    merges = []
    for token, _ in sorted(ranks.items(), key=lambda item: item[1]):
        split = _last_merge(ranks, token) if len(token) > 1 else None
        if split and split[0] in ranks and split[1] in ranks:
            merges.append(split)
    return merges


def _last_merge(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes] | None:
    """The two parts that tiktoken's merging of `token`'s bytes joins into `token`, or None if it never gets there."""
    parts = [token[i:i + 1] for i in range(len(token))]
    pair_ranks = [ranks.get(parts[i] + parts[i + 1]) for i in range(len(parts) - 1)]
    while len(parts) > 2:
        candidates = [(rank, i) for i, rank in enumerate(pair_ranks) if rank is not None]
        if not candidates:
            return None
        _, i = min(candidates)
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
        del pair_ranks[i]
        if i > 0:
            pair_ranks[i - 1] = ranks.get(parts[i - 1] + parts[i])
        if i < len(parts) - 1:
            pair_ranks[i] = ranks.get(parts[i] + parts[i + 1])
    return parts[0], parts[1]


def _dense_special_tokens(ranks: dict[bytes, int], special_tokens: dict[str, int]) -> dict[str, int]:
    """`special_tokens` with a reserved special token in each id that neither they nor `ranks` use (cl100k's ids have
    such gaps), as Llama 3 reserves its unused ids: transformers' `len(tokenizer)` is then the model's vocabulary
    size, and the files read back (dense ids are required there)."""
    used = set(ranks.values()) | set(special_tokens.values())
    filled = dict(special_tokens)
    for token_id in sorted(set(range(max(used) + 1)) - used):
        filled[f"<|reserved_{token_id}|>"] = token_id
    return filled


def oniguruma_pattern(pattern: str) -> str:
    """`pattern` (tiktoken's regex dialect) as `tokenizers` reads it: a possessive counted repeat `X{n,m}+` becomes the
    atomic group `(?>X{n,m})`, since Oniguruma reads `{n,m}+` as `(?:X{n,m})+`. `?+`, `*+`, `++` mean the same in
    both."""
    return _rewrite_counted_possessives(pattern, lambda atom, count: f"(?>{atom}{count})")


def tiktoken_pattern(pattern: str) -> str:
    """A `tokenizers` (Oniguruma) regex in tiktoken's dialect: `X{n,m}+` is a repeat of `X{n,m}` there."""
    return _rewrite_counted_possessives(pattern, lambda atom, count: f"(?:{atom}{count})+")


def _rewrite_counted_possessives(pattern: str, rewrite: Callable[[str, str], str]) -> str:
    """`pattern` with each `X{n,m}+` replaced by `rewrite(X, "{n,m}")`, X being the atom before the count."""
    groups: list[list[str]] = [[]]  # the atoms of each open group, innermost last
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            end = i + 2
            if pattern[i + 1:end] in ("p", "P", "x") and pattern[end:end + 1] == "{":
                end = pattern.find("}", end) + 1 or len(pattern)
            groups[-1].append(pattern[i:end])
        elif char == "[":
            end = _class_end(pattern, i)
            groups[-1].append(pattern[i:end])
        elif char == "(":
            end = i + 1
            groups.append(["("])
        elif char == ")" and len(groups) > 1:
            end = i + 1
            closed = "".join(groups.pop()) + ")"
            groups[-1].append(closed)
        elif (count := _COUNTED.match(pattern, i)) and pattern[count.end():count.end() + 1] == "+" and groups[-1]:
            end = count.end() + 1
            groups[-1][-1] = rewrite(groups[-1][-1], count.group())
        else:
            end = i + 1
            groups[-1].append(char)
        i = end
    while len(groups) > 1:  # an unbalanced pattern stays as it was; the regex engine reports it
        opened = "".join(groups.pop())
        groups[-1].append(opened)
    return "".join(groups[0])


def _class_end(pattern: str, start: int) -> int:
    """The index just past the character class that opens at `start` (nested classes included)."""
    i = start + 1
    if pattern[i:i + 1] == "^":
        i += 1
    if pattern[i:i + 1] == "]":  # a leading `]` is a literal
        i += 1
    while i < len(pattern):
        if pattern[i] == "\\":
            i += 2
        elif pattern[i] == "[":
            i = _class_end(pattern, i)
        elif pattern[i] == "]":
            return i + 1
        else:
            i += 1
    return len(pattern)


def encoding_from_tokenizer_json(path: Path) -> tuple[tiktoken.Encoding, dict]:
    """The tiktoken encoding of a Hugging Face byte-level BPE `tokenizer.json`, and its description as a titanmem
    sidecar: `name`, `pat_str`, `special_tokens`, and `eos_token` when a `tokenizer_config.json` beside the file
    names one.

    The vocabulary's ids are the ranks and the added tokens the special tokens. That tokenizes as the file does when
    its merges come in the order of the ids they make and list the split tiktoken makes each token from, as GPT-2's,
    Llama 3's and any `tokenizers`-trained file do; both are checked. A post-processor's template (Llama 3's BOS) is
    not applied: titanmem packs documents with only an EOS between them."""
    path = Path(path)
    data = _read_json(path)
    model = data.get("model")
    if not isinstance(model, dict):
        if "pat_str" in data or "special_tokens" in data:
            raise ConfigError(_FIELD, f"{path} is the sidecar of a tiktoken ranks file; point tokenizer.path at the "
                                      f"ranks file beside it")
        raise ConfigError(_FIELD, f"{path} is not a Hugging Face tokenizer.json (it has no `model`); {_READABLE}")
    kind = model.get("type") or ("BPE" if "merges" in model else "unknown")
    if kind != "BPE":
        raise ConfigError(_FIELD, f"{path} holds a {kind} tokenizer model; {_READABLE}")
    _check_bpe_settings(path, data, model)
    pat_str = _split_pattern(path, data)
    alphabet = byte_alphabet()
    to_byte = {char: byte for byte, char in enumerate(alphabet)}
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
        raise ConfigError(_FIELD, f"{path}: model.vocab is not a mapping from token to id; {_READABLE}")
    special_tokens = _added_tokens(path, data)
    ranks: dict[bytes, int] = {}
    for token, token_id in vocab.items():
        if special_tokens.get(token) == token_id:  # GPT-2's `<|endoftext|>` is both a vocab entry and an added token
            continue
        if any(char not in to_byte for char in token):
            raise ConfigError(_FIELD, f"{path}: vocab token {token!r} (id {token_id}) is not written in the byte-level "
                                      f"alphabet; {_READABLE}")
        ranks[bytes(to_byte[char] for char in token)] = token_id
    missing = [byte for byte in range(256) if bytes([byte]) not in ranks]
    if missing:
        raise ConfigError(_FIELD, f"{path}: the vocab lacks {len(missing)} of the 256 single bytes (e.g. "
                                  f"{bytes(missing[:5])!r}), so some text has no tokens; train it with "
                                  f"`initial_alphabet=pre_tokenizers.ByteLevel.alphabet()`")
    _check_ids(path, ranks, special_tokens)
    _check_merges(path, model.get("merges"), vocab, ranks)
    name = path.parent.name if path.name == "tokenizer.json" and path.parent.name else path.stem
    try:
        encoding = tiktoken.Encoding(name=name, pat_str=pat_str, mergeable_ranks=ranks, special_tokens=special_tokens)
    except ValueError as e:  # the regex does not compile in tiktoken's dialect
        problem = " ".join(str(e).split())  # the regex engine's message spans lines
        raise ConfigError(_FIELD, f"{path}: tiktoken cannot use its split regex {pat_str!r} ({problem})") from None
    meta = {"name": name, "pat_str": pat_str, "special_tokens": special_tokens}
    eos_token = _configured_eos(path)
    if eos_token:
        meta["eos_token"] = eos_token
    return encoding, meta


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(_FIELD, f"cannot read {path} ({e.strerror}); point tokenizer.path at a tokenizer file") \
            from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(_FIELD, f"{path} is not a JSON file ({type(e).__name__}: {e}); {_READABLE}") from None
    if not isinstance(data, dict):
        raise ConfigError(_FIELD, f"{path} is not a Hugging Face tokenizer.json (not a JSON object); {_READABLE}")
    return data


def _split_pattern(path: Path, data: dict) -> str:
    """tiktoken's split regex for the pre-tokenizer: `ByteLevel` with its own (GPT-2's) regex, or a `Split` regex
    followed by a `ByteLevel` that only maps bytes (Llama 3's)."""
    pre = data.get("pre_tokenizer")
    pre = pre if isinstance(pre, dict) else {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre] if pre else []
    steps = [step if isinstance(step, dict) else {} for step in (steps if isinstance(steps, list) else [])]
    kinds = [step.get("type") for step in steps]
    byte_level = steps[-1] if kinds and kinds[-1] == "ByteLevel" else None
    if byte_level is None or kinds.count("ByteLevel") != 1:
        raise ConfigError(_FIELD, f"{path} has no byte-level pre-tokenizer (it has {kinds or 'none'}); {_READABLE}")
    if byte_level.get("add_prefix_space"):
        raise ConfigError(_FIELD, f"{path}: its ByteLevel pre-tokenizer adds a prefix space, which tiktoken cannot; "
                                  f"set add_prefix_space to false there")
    if kinds == ["ByteLevel"]:
        if byte_level.get("use_regex", True):
            return GPT2_PATTERN
    elif kinds == ["Split", "ByteLevel"] and not byte_level.get("use_regex", True):
        split = steps[0]
        regex = (split.get("pattern") or {}).get("Regex")
        if isinstance(regex, str) and split.get("behavior") == "Isolated" and not split.get("invert"):
            return tiktoken_pattern(regex)
    raise ConfigError(_FIELD, f"{path}: its pre-tokenizer ({kinds}) is not one regex split of the text (a ByteLevel "
                              f"with use_regex, or a Split regex with behavior Isolated then a ByteLevel without); "
                              f"{_READABLE}")


def _check_bpe_settings(path: Path, data: dict, model: dict) -> None:
    """Refuse what tiktoken cannot do: fall back to byte tokens, mark word boundaries, normalize the text."""
    if model.get("byte_fallback"):
        raise ConfigError(_FIELD, f"{path}: its BPE model falls back to byte tokens, as SentencePiece ones converted "
                                  f"from Llama 2's do; it is not byte-level BPE; {_READABLE}")
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise ConfigError(_FIELD, f"{path}: its BPE model sets {key}, so it is not byte-level; {_READABLE}")
    normalizer = data.get("normalizer")
    if normalizer:
        kind = normalizer.get("type", "") if isinstance(normalizer, dict) else ""
        raise ConfigError(_FIELD, f"{path} has a {kind} normalizer, which tiktoken cannot apply; {_READABLE}")


def _added_tokens(path: Path, data: dict) -> dict[str, int]:
    added = data.get("added_tokens") or []
    try:
        tokens = {token["content"]: int(token["id"]) for token in added}
    except (TypeError, KeyError, ValueError):
        tokens = None
    if tokens is None or not all(isinstance(content, str) for content in tokens):
        raise ConfigError(_FIELD, f"{path}: added_tokens is not a list of {{id, content}} entries; {_READABLE}")
    return tokens


def _check_ids(path: Path, ranks: dict[bytes, int], special_tokens: dict[str, int]) -> None:
    """The ids of the vocabulary and the added tokens must be 0..n-1, each once: titanmem sizes the embedding by
    them, and tiktoken needs one token per id."""
    ids = [*ranks.values(), *special_tokens.values()]
    size = len(set(ids))
    if len(ids) != size:
        twice = sorted(token_id for token_id, count in Counter(ids).items() if count > 1)
        raise ConfigError(_FIELD, f"{path}: ids {twice[:5]} are given to more than one token; every id must name one "
                                  f"token")
    if max(ids, default=-1) != size - 1 or min(ids, default=0) < 0:
        gaps = sorted(set(range(max(ids, default=0) + 1)) - set(ids))
        raise ConfigError(_FIELD, f"{path}: the ids of the vocab and added tokens are not 0..{size - 1} (missing "
                                  f"{gaps[:5]}{'...' if len(gaps) > 5 else ''}); fill the gaps with added tokens")


def _check_merges(path: Path, merges: object, vocab: dict[str, int], ranks: dict[bytes, int]) -> None:
    """The file must merge as tiktoken will with its ids as ranks: its merges in the order of the ids they make, and
    among them each token's split that tiktoken makes it from (`bpe_merges`); further splits are harmless, they never
    meet."""
    if not isinstance(merges, list):
        raise ConfigError(_FIELD, f"{path}: model.merges is not a list; {_READABLE}")
    listed = set()
    last = -1
    for index, merge in enumerate(merges):
        pair = merge.split(" ") if isinstance(merge, str) else merge
        if not isinstance(pair, list) or len(pair) != 2 or not all(isinstance(part, str) for part in pair):
            raise ConfigError(_FIELD, f"{path}: merge {index} ({merge!r}) is not a pair of tokens")
        merged = vocab.get(pair[0] + pair[1])
        if merged is None or pair[0] not in vocab or pair[1] not in vocab:
            raise ConfigError(_FIELD, f"{path}: merge {index} ({merge!r}) names a token not in the vocab")
        if merged < last:
            raise ConfigError(_FIELD, f"{path}: merge {index} ({merge!r}) makes id {merged}, lower than the id {last} an "
                                      f"earlier merge makes; tiktoken needs ids in merge order")
        last = merged
        listed.add((pair[0], pair[1]))
    alphabet = byte_alphabet()
    for left, right in bpe_merges(ranks):
        pair = ("".join(alphabet[byte] for byte in left), "".join(alphabet[byte] for byte in right))
        if pair not in listed:
            raise ConfigError(_FIELD, f"{path}: tiktoken would merge {pair[0]!r} and {pair[1]!r} (by their ids), a "
                                      f"merge the file does not list, so the two would tokenize differently")


def _configured_eos(path: Path) -> str | None:
    """The EOS that a `tokenizer_config.json` beside `path` names, if any."""
    try:
        config = json.loads((Path(path).parent / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    eos = config.get("eos_token") if isinstance(config, dict) else None
    if isinstance(eos, dict):  # transformers also writes special tokens as AddedToken objects
        eos = eos.get("content")
    return eos if isinstance(eos, str) else None
