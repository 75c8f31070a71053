"""Parameter counts and training FLOPs per token, the numerator of MFU."""

from __future__ import annotations

from torch import nn

from titanmem.models.args import ModelArgs


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter counts by kind. The token embedding is a lookup, so it is reported apart from the dense compute."""
    embedding = sum(p.numel() for name, p in model.named_parameters() if name.startswith("tok_embeddings."))
    total = sum(p.numel() for p in model.parameters())
    return {"total": total, "embedding": embedding, "dense": total - embedding}


def flops_per_token(args: ModelArgs, counts: dict[str, int], seq_len: int) -> int:
    """Training FLOPs (forward + backward) per token: 6 per dense weight, plus attention's score and value products,
    which grow with the context (12 · layers · heads · head_dim · seq_len)."""
    attention = 12 * args.n_layers * args.n_heads * args.head_dim * seq_len
    return 6 * counts["dense"] + attention
