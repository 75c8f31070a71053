"""Models: the Llama-style decoder, its flavors, and how to build one on the meta device."""

from __future__ import annotations

import dataclasses

import torch

from titanmem.config.errors import ConfigError
from titanmem.config.sections import JobConfig
from titanmem.models.args import ModelArgs
from titanmem.models.flavors import FLAVORS, memory_args_for
from titanmem.models.llama import Transformer

VOCAB_MULTIPLE = 64


def build_model_args(config: JobConfig, tokenizer_vocab_size: int, device_type: str = "cpu") -> ModelArgs:
    """The flavor's shape with the vocabulary, context and memory layers taken from the run."""
    args = FLAVORS[config.model.flavor]
    vocab = config.model.vocab_size
    if vocab == -1:
        vocab = -(-tokenizer_vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    elif vocab < tokenizer_vocab_size:
        raise ConfigError("model.vocab_size", f"must be at least the tokenizer's size {tokenizer_vocab_size}, got {vocab}")
    memory = memory_args_for(config.model.flavor, config.memory, device_type) if config.memory.enabled else None
    return dataclasses.replace(
        args, vocab_size=vocab, max_seq_len=max(args.max_seq_len, config.training.seq_len), memory=memory
    )


def build_model(args: ModelArgs, device: torch.device, parallelize=None) -> Transformer:
    """Construct on the meta device (no memory, no init work), apply `parallelize` there (so each rank only ever
    allocates its shard), then materialise on `device` and initialise once."""
    with torch.device("meta"):
        model = Transformer(args)
    if parallelize is not None:
        parallelize(model)
    model.to_empty(device=device)
    model.init_weights()
    return model


__all__ = ["FLAVORS", "ModelArgs", "Transformer", "build_model", "build_model_args"]
