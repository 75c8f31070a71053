"""Bitonic top-k of each row inside a Triton program, built only from reductions and selects.

`topk(x, K)` of x [rows, N] (N and K powers of two, K ≤ N) returns the K largest of each row, largest first. The
block is viewed as a hypercube of 2s (one axis per bit of the flat position, innermost last):

1. runs of K are sorted, in alternating directions, by bitonic merges of growing size;
2. then, while a row holds more than K, each ascending run and its descending neighbour are replaced by their
   elementwise maximum, a bitonic sequence holding the K largest of both, and that is merged again.

One compare-and-swap step reads each element's partner along one axis as the pair's sum minus itself (exact for
integers, whose sums wrap), a single reduction that compiles to a register or warp shuffle. Triton's own `tl.sort`
uses an xor reduction there, which its CPU interpreter evaluates element by element in Python; this form keeps the
interpreted kernels fast enough for the CPU test suite.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.constexpr_function
def _log2(n):
    return (int(n) - 1).bit_length()


@triton.constexpr_function
def _axis_shape(n_dims, axis):
    """[1, …, 2, …, 1]: a hypercube axis (counted from the innermost) on its own."""
    n_dims, axis = int(n_dims), int(axis)
    return [1] * (n_dims - 1 - axis) + [2] + [1] * axis


@triton.jit
def _position(N_DIMS: tl.constexpr, AXIS: tl.constexpr):
    """0 for the lower, 1 for the upper element along hypercube axis AXIS, broadcastable over the cube."""
    return tl.reshape(tl.arange(0, 2), _axis_shape(N_DIMS, AXIS))


@triton.jit
def _compare_swap(cube, descending, AXIS: tl.constexpr):
    """Order every pair along AXIS: smaller first where `descending` is 0, larger first where it is 1."""
    N_DIMS: tl.constexpr = len(cube.shape)
    partner = tl.sum(cube, axis=N_DIMS - 1 - AXIS, keep_dims=True) - cube
    wants_larger = (_position(N_DIMS, AXIS) == 1) != (descending == 1)
    return tl.where(wants_larger, tl.maximum(cube, partner), tl.minimum(cube, partner))


@triton.jit
def _merge(cube, STAGE: tl.constexpr, FINAL: tl.constexpr):
    """Sort each bitonic run of 2^STAGE: descending when FINAL, else alternating with bit STAGE of the position."""
    N_DIMS: tl.constexpr = len(cube.shape)
    if FINAL:
        descending = tl.full(_axis_shape(N_DIMS, 0), 1, tl.int32)
    else:
        descending = _position(N_DIMS, STAGE)
    for step in tl.static_range(STAGE):
        cube = _compare_swap(cube, descending, STAGE - 1 - step)
    return cube


@triton.jit
def topk(x, K: tl.constexpr):
    """The K largest elements of each row of x [rows, N], largest first: [rows, K]."""
    ROWS: tl.constexpr = x.shape[0]
    LOG_N: tl.constexpr = _log2(x.shape[1])
    LOG_K: tl.constexpr = _log2(K)
    cube = tl.reshape(x, [2] * _log2(ROWS * x.shape[1]))
    for stage in tl.static_range(1, LOG_K + 1):
        cube = _merge(cube, stage, stage == LOG_N)
    for level in tl.static_range(LOG_K + 1, LOG_N + 1):
        cube = tl.max(cube, axis=len(cube.shape) - 1 - LOG_K)
        cube = _merge(cube, LOG_K, level == LOG_N)
    return tl.reshape(cube, [ROWS, K])
