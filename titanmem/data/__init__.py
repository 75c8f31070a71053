"""Data: tokenizer, document loading and packing, and the resumable loader."""

from titanmem.data.dataloader import build_dataloader
from titanmem.data.text import PackedTokenDataset, load_documents
from titanmem.data.tokenizer import Tokenizer, build_tokenizer

__all__ = ["PackedTokenDataset", "Tokenizer", "build_dataloader", "build_tokenizer", "load_documents"]
