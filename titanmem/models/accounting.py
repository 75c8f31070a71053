"""Parameter counts and training FLOPs per token, the numerator of MFU."""

from __future__ import annotations

from torch import nn

from titanmem.models.args import ModelArgs
from titanmem.models.memory import ProductKeyMemory


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter counts by kind:
    - embedding: the token embedding, a lookup;
    - memory_values: the shared value table, also a lookup (each token reads heads·knn rows of it);
    - memory: the memory layers' queries, sub-keys and projections, used in full by every token;
    - dense: everything else (attention, FFNs, norms, output).
    """
    memory_layer_params = {
        id(p) for m in model.modules() if isinstance(m, ProductKeyMemory) for p in m.parameters()
    }
    counts = {"embedding": 0, "memory_values": 0, "memory": 0, "dense": 0}
    for name, param in model.named_parameters():
        if name.startswith("tok_embeddings."):
            kind = "embedding"
        elif name.startswith("memory_values."):
            kind = "memory_values"
        elif id(param) in memory_layer_params:
            kind = "memory"
        else:
            kind = "dense"
        counts[kind] += param.numel()
    counts["total"] = sum(counts.values())
    return counts


def flops_per_token(args: ModelArgs, counts: dict[str, int], seq_len: int) -> int:
    """Training FLOPs (forward + backward) per token.

    - 6 per weight that every token multiplies: dense params plus the memory layers' queries, projections and
      sub-keys (scoring a half-query against n_keys sub-keys costs 2 FLOPs per sub-key weight, like a matmul).
    - Attention's score and value products, which grow with the context: 12 · layers · heads · head_dim · seq_len.
    - Per memory layer, the weighted bag (2 FLOPs per value element read, ×3 for forward and backward) and the
      k×k candidate sums of the product top-k. The value table itself is not in the 6N term: a token touches only
      heads · knn of its rows.
    """
    attention = 12 * args.n_layers * args.n_heads * args.head_dim * seq_len
    total = 6 * (counts["dense"] + counts["memory"]) + attention
    memory = args.memory
    if memory is not None:
        bag = 6 * memory.heads * memory.knn * memory.v_dim
        candidates = memory.heads * memory.knn**2
        total += len(memory.layers) * (bag + candidates)
    return total
