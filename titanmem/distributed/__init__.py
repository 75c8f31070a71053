"""Distributed training: the parallel plan's degrees and meshes (ParallelDims) and their application to a model."""

from titanmem.distributed.parallel_dims import ParallelDims

__all__ = ["ParallelDims"]
