"""titanmem's tokenizer written as Hugging Face files tokenizes as titanmem does, in `tokenizers` and in transformers;
a byte-level BPE tokenizer.json reads back as the same tiktoken encoding; anything else is refused in one line."""

import gzip
import json
import random
from pathlib import Path

import pytest
import tiktoken
import transformers
from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from titanmem.config import ConfigError
from titanmem.config.sections import Tokenizer as TokenizerConfig
from titanmem.data import build_tokenizer
from titanmem.data.hf_tokenizer import encoding_from_tokenizer_json, hf_tokenizer_files
from titanmem.data.tokenizer import DEFAULT_PATTERN

ASSETS = Path(__file__).resolve().parents[1] / "assets"
EOT = "<|endoftext|>"
# Llama 3's split, as its tokenizer.json spells it (Oniguruma, no possessive quantifiers).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")

HOSTILE = [
    "",
    " ",
    "Café naïve résumé — ñ ü ø Å; decomposed: Cafe\u0301 n\u0303",
    "東京は日本の首都です。汉字与標點，한국어 텍스트、カタカナ",
    "emoji 👍🏽 👨‍👩‍👧‍👦 🇫🇷🇯🇵 😀😀😀 ✓✗",
    " " * 700,
    "\n" * 300,
    "a" + " " * 257 + "b\n\n\n   \n \t\t \r\n\r\n  x  ",
    "1234567890" * 40 + " 3.14159 ½ ² Ⅻ ١٢٣٤٥ ０１２",
    "don't STOP 'S 'LL 'Ve 'ſ they'RE   believing!!!???... ---- ==== ____ ~~~~",
    "a" * 2000,
    "word" + EOT + "word " + EOT + "\n" + EOT,
    "unicode spaces:\u00a0\u2003\u3000\u200b\u2028\u2029\x85\x1c\x1d\x1e\x1f\x0b\x0c end",
    "controls \x00\x01\x02\x7f and tabs\t\t\tend",
    "def f(x):\n    return x ** 2  # comment\n\n\n\tif (a &&b||c) {{}} [[]] <<>>",
]


def corpus(name: str) -> list[str]:
    """The documents of the bundled corpus file `name`."""
    with gzip.open(ASSETS / "corpus" / name, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


@pytest.fixture(scope="module")
def train_texts():
    return corpus("train.jsonl.gz")


@pytest.fixture(scope="module")
def texts(train_texts):
    """The validation documents, every 40th training document, and the hostile texts."""
    return corpus("validation.jsonl.gz") + train_texts[::40] + HOSTILE


@pytest.fixture(scope="module")
def titanmem_tokenizer():
    return build_tokenizer(TokenizerConfig())


def write_files(folder: Path, encoding: tiktoken.Encoding, eos_token: str = EOT) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in hf_tokenizer_files(encoding, eos_token, model_max_length=2048).items():
        (folder / name).write_text(text)
    return folder


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, titanmem_tokenizer):
    return write_files(tmp_path_factory.mktemp("hf"), titanmem_tokenizer.encoding)


def ordinary_tokenizer(path: Path) -> Tokenizer:
    """`tokenizers` reading `path`, with special-token text in documents kept as text, as tiktoken's
    `encode_ordinary` keeps it."""
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.encode_special_tokens = True
    return tokenizer


def assert_same_ids(encode, expected_encoding: tiktoken.Encoding, texts: list[str]) -> None:
    for text in texts:
        assert encode(text) == expected_encoding.encode_ordinary(text), text[:80]


def test_tokenizers_reads_the_files_as_titanmem_tokenizes(hf_folder, titanmem_tokenizer, texts):
    hf = ordinary_tokenizer(hf_folder / "tokenizer.json")
    assert_same_ids(lambda text: hf.encode(text, add_special_tokens=False).ids, titanmem_tokenizer.encoding, texts)
    for text in texts:
        assert hf.decode(titanmem_tokenizer.encode(text), skip_special_tokens=False) == text


def test_transformers_tokenizes_and_decodes_as_titanmem(hf_folder, titanmem_tokenizer, texts):
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_folder)
    # No BOS is prepended: titanmem trains without one. Only a literal "<|endoftext|>" needs split_special_tokens.
    assert_same_ids(lambda text: tokenizer(text, split_special_tokens=True)["input_ids"], titanmem_tokenizer.encoding,
                    texts)
    assert_same_ids(tokenizer.encode, titanmem_tokenizer.encoding, [text for text in texts if EOT not in text])
    for text in texts:
        assert tokenizer.decode(titanmem_tokenizer.encode(text)) == text
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == (EOT, titanmem_tokenizer.eos_id)
    assert tokenizer.pad_token_id == titanmem_tokenizer.eos_id and tokenizer.bos_token is None
    assert len(tokenizer) == titanmem_tokenizer.vocab_size and tokenizer.model_max_length == 2048
    batch = tokenizer(["one", "two words here"], padding=True)
    assert batch["input_ids"][0][-1] == titanmem_tokenizer.eos_id and batch["attention_mask"][0][-1] == 0


def test_literal_special_token_text_differs_only_without_split_special_tokens(hf_folder, titanmem_tokenizer):
    """titanmem never turns "<|endoftext|>" in a document into the separator; transformers does by default (the
    special token is matched before the text is split), and does not with `split_special_tokens=True`."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_folder)
    text = "before " + EOT + " after"
    ours = titanmem_tokenizer.encode(text)
    assert titanmem_tokenizer.eos_id not in ours
    assert tokenizer(text, split_special_tokens=True)["input_ids"] == ours
    by_default = tokenizer(text)["input_ids"]
    assert titanmem_tokenizer.eos_id in by_default
    assert tokenizer.decode(by_default) == text


def test_the_files_read_back_as_the_same_encoding(hf_folder, titanmem_tokenizer, texts):
    encoding, meta = encoding_from_tokenizer_json(hf_folder / "tokenizer.json")
    original = titanmem_tokenizer.encoding
    assert encoding._mergeable_ranks == original._mergeable_ranks
    assert meta["special_tokens"] == original._special_tokens and meta["pat_str"] == original._pat_str
    assert meta["eos_token"] == EOT
    assert_same_ids(encoding.encode_ordinary, original, texts)
    tokenizer = build_tokenizer(TokenizerConfig(path=str(hf_folder / "tokenizer.json")))
    assert (tokenizer.eos_id, tokenizer.vocab_size) == (titanmem_tokenizer.eos_id, titanmem_tokenizer.vocab_size)
    assert_same_ids(tokenizer.encode, original, HOSTILE)


def test_a_possessive_counted_repeat_survives_the_regex_dialects(tmp_path, titanmem_tokenizer, texts):
    """The default split (cl100k's) has `\\p{N}{1,3}+`, which Oniguruma would read as any run of digits."""
    encoding = tiktoken.Encoding("default_split", pat_str=DEFAULT_PATTERN,
                                 mergeable_ranks=titanmem_tokenizer.encoding._mergeable_ranks,
                                 special_tokens={EOT: 4096, "<|spare|>": 4098})  # 4097 is a gap the files fill
    folder = write_files(tmp_path, encoding)
    hf = ordinary_tokenizer(folder / "tokenizer.json")
    assert hf.get_vocab_size() == 4099
    assert_same_ids(lambda text: hf.encode(text, add_special_tokens=False).ids, encoding, texts)
    read_back, _ = encoding_from_tokenizer_json(folder / "tokenizer.json")
    assert_same_ids(read_back.encode_ordinary, encoding, texts)


def test_ranks_that_no_training_made_still_tokenize_alike(tmp_path, titanmem_tokenizer, texts):
    """The merges are derived from tiktoken's own merging, not from how the ranks were trained: with the multi-byte
    tokens' ranks shuffled, tiktoken takes odd paths to its tokens, and the written model must take the same."""
    ranks = titanmem_tokenizer.encoding._mergeable_ranks
    rng = random.Random(0)
    merged = [token for token in ranks if len(token) > 1]
    shuffled = [ranks[token] for token in merged]
    rng.shuffle(shuffled)
    encoding = tiktoken.Encoding("shuffled", pat_str=titanmem_tokenizer.encoding._pat_str,
                                 mergeable_ranks={**ranks, **dict(zip(merged, shuffled))}, special_tokens={EOT: 4096})
    hf = ordinary_tokenizer(write_files(tmp_path, encoding) / "tokenizer.json")
    # Runs of random tokens meet tokens at every alignment, which plain text rarely does.
    samples = [b"".join(rng.choices(merged, k=rng.randint(1, 8))).decode("utf-8", "ignore") for _ in range(3000)]
    assert_same_ids(lambda text: hf.encode(text).ids, encoding, samples + texts)


def test_a_file_listing_every_split_of_each_token_reads_back(tmp_path, hf_folder, titanmem_tokenizer, texts):
    """transformers' converter, which wrote Llama 3's file, lists every split of a token into two tokens: the extra
    merges never meet (tiktoken makes each token from one split), so they change nothing."""
    data = json.loads((hf_folder / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    splits = [(vocab[token], vocab[token[:cut]], vocab[token[cut:]], f"{token[:cut]} {token[cut:]}")
              for token in vocab for cut in range(1, len(token)) if token[:cut] in vocab and token[cut:] in vocab]
    written = len(data["model"]["merges"])
    data["model"]["merges"] = [merge for *_, merge in sorted(splits)]
    assert len(data["model"]["merges"]) > written + 1000
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    hf = ordinary_tokenizer(tmp_path / "tokenizer.json")
    encoding, _ = encoding_from_tokenizer_json(tmp_path / "tokenizer.json")
    assert_same_ids(lambda text: hf.encode(text).ids, titanmem_tokenizer.encoding, texts)
    assert_same_ids(encoding.encode_ordinary, titanmem_tokenizer.encoding, texts)


@pytest.mark.parametrize("split", ["byte_level_regex", "llama3_split"])
def test_a_tokenizers_trained_bpe_reads_back_as_it_tokenizes(tmp_path, split, train_texts):
    sample, size = [], 0  # the first 300k characters of the training corpus
    for text in train_texts:
        sample.append(text)
        size += len(text)
        if size > 300_000:
            break
    hf = Tokenizer(models.BPE())
    if split == "byte_level_regex":  # GPT-2's layout
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:  # Llama 3's
        hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(sample, trainers.BpeTrainer(vocab_size=1500, special_tokens=[EOT], show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf.save(str(tmp_path / "tokenizer.json"))
    encoding, meta = encoding_from_tokenizer_json(tmp_path / "tokenizer.json")
    assert meta["special_tokens"] == {EOT: 0} and encoding.n_vocab == hf.get_vocab_size() == 1500
    hf.encode_special_tokens = True
    held_out = corpus("validation.jsonl.gz") + train_texts[-100:] + HOSTILE
    assert_same_ids(lambda text: hf.encode(text).ids, encoding, held_out)


def refusal(path: Path) -> ConfigError:
    """The error that reading `path` as the tokenizer gives; it must be one line naming tokenizer.path."""
    with pytest.raises(ConfigError) as caught:
        build_tokenizer(TokenizerConfig(path=str(path)))
    error = caught.value
    assert error.field == "tokenizer.path" and "\n" not in str(error) and str(path) in str(error)
    return error


def test_wordpiece_and_unigram_and_sentencepiece_bpe_are_refused(tmp_path):
    wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
    unigram = Tokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0), ("b", -2.0)], unk_id=0))
    # Llama 2's layout: BPE over "▁"-marked text with byte fallback, no byte-level pre-tokenizer.
    llama2 = Tokenizer(models.BPE({"<unk>": 0, "▁": 1, "a": 2, "▁a": 3}, [("▁", "a")], byte_fallback=True,
                                  unk_token="<unk>"))
    llama2.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    for name, tokenizer in (("WordPiece", wordpiece), ("Unigram", unigram), ("llama2", llama2)):
        tokenizer.save(str(tmp_path / f"{name}.json"))
        message = str(refusal(tmp_path / f"{name}.json"))
        assert "only byte-level BPE tokenizer.json files are read" in message and "tiktoken ranks file" in message


def test_garbage_and_broken_files_are_refused(tmp_path, hf_folder):
    (tmp_path / "garbage.json").write_bytes(b"\x00\xffnot json {")
    assert "not a JSON file" in str(refusal(tmp_path / "garbage.json"))
    (tmp_path / "garbage.tiktoken").write_text('{"model": 3')  # JSON content under another name is read as JSON
    assert "not a JSON file" in str(refusal(tmp_path / "garbage.tiktoken"))
    assert "ranks file beside it" in str(refusal(ASSETS / "tokenizer" / "titanmem4k.json"))

    def broken(name, change):
        data = json.loads((hf_folder / "tokenizer.json").read_text())
        change(data)
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
        return str(refusal(tmp_path / f"{name}.json"))

    assert "not 0..4096" in broken("gap", lambda data: data["added_tokens"][0].update(id=5000))
    assert "more than one token" in broken("twice", lambda data: data["added_tokens"][0].update(id=7))
    assert "single bytes" in broken("no_byte", lambda data: data["model"]["vocab"].pop("Ā"))
    assert "merge order" in broken("order", lambda data: data["model"]["merges"].reverse())
    assert "normalizer" in broken("nfc", lambda data: data.update(normalizer={"type": "NFC"}))
    assert "does not list" in broken("unlisted", lambda data: data["model"]["merges"].pop(100))


def test_a_llama3_shaped_folder_trains_without_its_bos_and_names_its_eos(tmp_path, hf_folder, titanmem_tokenizer):
    """Llama 3's folder: BOS and EOS among its added tokens, a post-processor that prepends BOS, the EOS named in
    tokenizer_config.json. titanmem packs documents with EOS only, so the template is not applied."""
    hf = Tokenizer.from_file(str(hf_folder / "tokenizer.json"))
    hf.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"])
    hf.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 4097)])])
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>",
                                                                "eos_token": "<|end_of_text|>"}))
    tokenizer = build_tokenizer(TokenizerConfig(path=str(tmp_path / "tokenizer.json"), eos_token="<|end_of_text|>"))
    assert (tokenizer.eos_id, tokenizer.vocab_size) == (4098, 4099)
    text = HOSTILE[2]
    assert hf.encode(text).ids == [4097, *tokenizer.encode(text)]
    assert tokenizer.encode(text) == titanmem_tokenizer.encode(text)
    with pytest.raises(ConfigError) as caught:
        build_tokenizer(TokenizerConfig(path=str(tmp_path / "tokenizer.json"), eos_token="</s>"))
    assert caught.value.field == "tokenizer.eos_token" and "= '<|end_of_text|>'" in str(caught.value)
    assert "\n" not in str(caught.value)
