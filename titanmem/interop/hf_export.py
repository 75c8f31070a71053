"""`export.format = "hf"`: a folder that Hugging Face transformers loads with `AutoModelForCausalLM.from_pretrained`.

- A dense model becomes a plain `LlamaForCausalLM`: transformers' names (`titanmem.components.hf_checkpoint`), the
  query and key rows in its RoPE layout, `config.json` and `generation_config.json`; no custom code.
- A memory model becomes `TitanmemForCausalLM` (transformers' Llama with the memory layers in their blocks' FFN slots):
  its modeling code goes into the folder, with the memory layer copied from titanmem's own modules, and `config.json`
  points at it (`auto_map`), so that it loads with `trust_remote_code=True`.
- The tokenizer goes as `tokenizer.json` and its config (`titanmem.data.hf_tokenizer`).

The weights are streamed from the checkpoint like titanmem's own export, a block of rows at a time.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from titanmem.components.export import OutputTensor, write_shards
from titanmem.components.hf_checkpoint import VOCAB_ROWS, hf_config, hf_name, rope_heads, rope_to_hf
from titanmem.data.hf_tokenizer import hf_tokenizer_files
from titanmem.data.tokenizer import build_tokenizer
from titanmem.interop.memory_code import standalone_memory_code
from titanmem.utils import give_plain_file_mode

MODEL_CODE = Path(__file__).resolve().parent / "hf_model"
CODE_FILES = ("configuration_titanmem.py", "modeling_titanmem.py")
MEMORY_CODE_FILE = "titanmem_memory.py"


def hf_tensors(source, args, vocab_size: int) -> dict[str, OutputTensor]:
    """The folder's tensors by their transformers names, each read from `source` (a checkpoint's stored tensors) a
    block of rows at a time."""
    memory_layers = args.memory.layers if args.memory is not None else ()
    tensors = {}
    for name in source.names():
        shape = tuple(source.shape(name))
        heads = rope_heads(name, args)
        if heads is not None:
            # The reordering mixes rows within a head: the projection is read whole (a few hundred MB at most).
            read = _whole_then_rows(lambda name=name, heads=heads: rope_to_hf(source.read(name), heads))
        else:
            read = (lambda start, stop, name=name: source.read(name, start, stop))
        if name in VOCAB_ROWS:
            shape = (vocab_size, *shape[1:])
        tensors[hf_name(name, memory_layers)] = OutputTensor(shape, read)
    return tensors


def _whole_then_rows(compute):
    """A row reader over a tensor computed on the first read and dropped after its last rows are read (the writer
    reads each tensor's rows once, in order), so that no more than one such tensor is held at a time."""
    cache: list[torch.Tensor] = []

    def read(start: int, stop: int) -> torch.Tensor:
        if not cache:
            cache.append(compute())
        rows = cache[0][start:stop]
        if stop >= cache[0].shape[0]:
            cache.clear()
        return rows
    return read


def write_hf_export(source, folder: str | Path, *, plan, dtype: torch.dtype, max_shard_bytes: int) -> list[Path]:
    """Write the model of `plan` whose weights `source` holds as a Hugging Face folder (the tokenizer in
    transformers' format, built from the plan's tokenizer); returns the files written."""
    folder = Path(folder)
    args, config = plan.model_args, plan.config
    tokenizer = build_tokenizer(config.tokenizer)
    written = write_shards(folder, hf_tensors(source, args, tokenizer.vocab_size), dtype=dtype,
                           max_shard_bytes=max_shard_bytes)
    settings = hf_config(args, vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id, dtype=dtype)
    if args.memory is not None:
        settings["auto_map"] = {"AutoConfig": "configuration_titanmem.TitanmemConfig",
                                "AutoModelForCausalLM": "modeling_titanmem.TitanmemForCausalLM"}
        for name in CODE_FILES:
            shutil.copyfile(MODEL_CODE / name, folder / name)
            written.append(folder / name)
        (folder / MEMORY_CODE_FILE).write_text(standalone_memory_code())
        written.append(folder / MEMORY_CODE_FILE)
    generation = {"eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.eos_id}
    texts = {"config.json": settings, "generation_config.json": generation}
    for name, value in texts.items():
        (folder / name).write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")
        written.append(folder / name)
    for name, text in hf_tokenizer_files(tokenizer.encoding, config.tokenizer.eos_token, args.max_seq_len).items():
        (folder / name).write_text(text)
        written.append(folder / name)
    for path in written:
        give_plain_file_mode(path)
    return written
