"""Launch parameters of the kernels, and the CPU fallback to Triton's interpreter.

Without a GPU, Triton kernels run under its interpreter (TRITON_INTERPRET=1, which the titanmem package sets when it
loads on a host without CUDA). That is how the CPU test suite checks them against plain PyTorch; it is far too slow
for training, so the trainer only picks the Triton kernels by default on CUDA.
"""

from __future__ import annotations

import os

import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Chosen on an H100 by `python -m tools.bench.bench_kernels --sweep` (docs/benchmarks.md). The row backward takes a
# whole row (up to 4096 columns) per program: it also computes each pair's weight gradient, a dot over the full row.
# Under the interpreter, wide blocks keep the CPU emulation quick (its cost is per operation, not per element).
_GPU = {
    "forward": {"BLOCK_L": 8, "BLOCK_D": 4096, "num_warps": 4, "NUM_STAGES": 2},
    "weight_grad": {"BLOCK_L": 8, "BLOCK_D": 512, "num_warps": 4},
    "row_backward": {"BLOCK_P": 1, "BLOCK_D": 4096, "num_warps": 4, "ROWS_PER_PROGRAM": 2},
    "row_update": {"BLOCK_P": 1, "BLOCK_D": 1024, "num_warps": 2, "HEAVY_PAIRS": 256},
    "key_search": {"BLOCK_T": 16, "BLOCK_N": 512, "BLOCK_D": 64, "num_warps": 8, "num_stages": 1},
    "key_search_backward": {"BLOCK_T": 8, "num_warps": 4},
    # One warp per program: every row sum of the selection stays within the warp.
    "row_topk": {"BLOCK_R": 4, "ELEMENTS": 4096, "num_warps": 1},
}
_INTERPRETER = {
    "forward": {"BLOCK_L": 32, "BLOCK_D": 256, "num_warps": 1, "NUM_STAGES": 1},
    "weight_grad": {"BLOCK_L": 32, "BLOCK_D": 256, "num_warps": 1},
    "row_backward": {"BLOCK_P": 16, "BLOCK_D": 256, "num_warps": 1, "ROWS_PER_PROGRAM": 2},
    "row_update": {"BLOCK_P": 256, "BLOCK_D": 256, "num_warps": 1, "HEAVY_PAIRS": 1024},
    "key_search": {"BLOCK_T": 16, "BLOCK_N": 64, "BLOCK_D": 64, "num_warps": 1, "num_stages": 1},
    "key_search_backward": {"BLOCK_T": 16, "num_warps": 1},
    "row_topk": {"BLOCK_R": 16, "ELEMENTS": 1 << 16, "num_warps": 1},
}


# The bench's --sweep turns this off to try explicit forward configs.
FORWARD_BY_WIDTH = True


def launch_config(kernel: str, dim: int) -> dict:
    """Block sizes for `kernel` on rows of width `dim` (for the key search, `dim` is n_keys): never wider than the
    (power-of-two rounded) row."""
    cfg = dict((_INTERPRETER if INTERPRET else _GPU)[kernel])
    width = "BLOCK_N" if kernel == "key_search" else "BLOCK_D"
    if width in cfg:
        cfg[width] = min(cfg[width], triton.next_power_of_2(max(dim, 1)))
    if kernel == "forward" and not INTERPRET and FORWARD_BY_WIDTH:
        # Whole rows per program, 16k-element tiles at 1024 columns and 4 rows of up to 4096 beyond: the sweep's
        # optima at D = 1024, 2048 and 4096, all with two pipeline stages.
        cfg["BLOCK_L"] = 16 if cfg["BLOCK_D"] <= 1024 else 4
    return cfg
