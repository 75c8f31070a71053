"""Triton kernels for the memory layer, importable as `titanmem.kernels`.

The memory layer finds them through the entries of `titanmem.registry`; importing this package registers nothing and
imports nothing else of titanmem (the kernels read their limits and optimizer codes from the registry).
"""

from titanmem.kernels.embedding_bag import (
    row_segments,
    weighted_bag,
    weighted_bag_dense_backward,
    weighted_bag_sparse_backward,
    weighted_bag_weight_grad,
)

__all__ = [
    "row_segments",
    "weighted_bag",
    "weighted_bag_dense_backward",
    "weighted_bag_sparse_backward",
    "weighted_bag_weight_grad",
]
