"""Distributed training: the parallel plan (ParallelDims) and, as [parallel] lands, its application."""

from titanmem.distributed.parallel_dims import ParallelDims

__all__ = ["ParallelDims"]
