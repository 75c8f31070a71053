"""Triton kernels for the memory layer, importable as `titanmem.kernels`.

Importing this package registers the `triton` memory lookup with `titanmem.models.lookup`.
"""

from titanmem.kernels.embedding_bag import (
    row_segments,
    weighted_bag,
    weighted_bag_dense_backward,
    weighted_bag_sparse_backward,
    weighted_bag_weight_grad,
)
from titanmem.models.lookup import register_lookup

register_lookup("triton", weighted_bag)

__all__ = [
    "row_segments",
    "weighted_bag",
    "weighted_bag_dense_backward",
    "weighted_bag_sparse_backward",
    "weighted_bag_weight_grad",
]
