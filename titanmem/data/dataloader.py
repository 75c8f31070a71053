"""The training data loader: a `StatefulDataLoader`, so the position in the stream goes into every checkpoint."""

from __future__ import annotations

import warnings

import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from titanmem.config.manager import resolve_asset_path
from titanmem.config.sections import JobConfig
from titanmem.data.facts import load_facts
from titanmem.data.files import DataSource
from titanmem.data.text import PackedTokenDataset, check_shardable, load_documents
from titanmem.data.tokenizer import Tokenizer


# torchdata calls a torch API that newer torch deprecated; the warning is noise for our users.
warnings.filterwarnings("ignore", message=".*set_vital.*is deprecated")


def build_dataloader(
    config: JobConfig, source: DataSource, tokenizer: Tokenizer, dp_rank: int, dp_world_size: int,
    device: torch.device,
) -> StatefulDataLoader:
    documents = load_documents(config.data, source)
    check_shardable(documents, dp_world_size, config.data.num_workers)
    facts = None
    if config.data.facts_fraction > 0:
        facts = load_facts(resolve_asset_path(config.data.facts_path))
    dataset = PackedTokenDataset(
        documents,
        tokenizer,
        seq_len=config.training.seq_len,
        text_field=config.data.text_field,
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
        facts=facts,
        facts_fraction=config.data.facts_fraction,
        facts_qa_share=config.data.facts_qa_share,
        seed=config.training.seed,
        on_bad_record=config.data.on_bad_record,
    )
    workers = config.data.num_workers
    return StatefulDataLoader(
        dataset,
        # A private generator: otherwise creating the iterator draws from the global RNG, which would then differ
        # between a resumed run (RNG restored before iter) and an uninterrupted one.
        generator=torch.Generator().manual_seed(config.training.seed),
        batch_size=config.training.local_batch_size,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=2 if workers else None,
    )
