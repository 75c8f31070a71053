"""What a training step costs one GPU, from rates measured on a real one: the planner's compute terms.

A step's compute on one GPU is the sum of
- its matmuls: the 6N + attention FLOPs of its tokens (`flops_per_token`), at a matmul rate;
- its elementwise work (norms, activation functions, rope, casts, the loss and their backward), which grows with
  tokens × layers × dim, not with the FLOPs: it is what makes a small model's MFU low;
- the memory layers' lookups (the key search's selections, the gather of the value rows and their backward), per
  value element read: tokens × memory layers × heads × knn × v_dim (under mp a rank bags the group's tokens on its
  share of the columns: the same count);
- the dense optimizer step: `DENSE_ADAMW_BYTES_PER_ELEMENT` per dense parameter at the HBM's rate;
- the value table's update, by its layout (`titanmem.distributed.value_layout_cost`), at the row-update rate.

The planner adds the communication on the critical path to it. `MEASURED` holds the rates, with the card, commit and
command they came from; `fit` derives them from measured steps, and `tools/bench/calibrate_planner.py` measures those on
the GPU at hand and prints new rates to paste here (docs/planner.md shows the model against the measured steps).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

# Dense AdamW streams about 32 bytes per fp32 element (weight, gradient and two moments read, three written).
DENSE_ADAMW_BYTES_PER_ELEMENT = 32


@dataclass(frozen=True)
class StepWork:
    """What one GPU does in one training step, in the units the rates apply to."""

    matmul_flops: float
    activation_elements: float
    """tokens × layers × dim (÷ tp): the residual stream's elements the elementwise kernels pass over."""
    memory_reads: float
    """Value elements the memory layers read: tokens × memory layers × heads × knn × v_dim (÷ tp)."""
    dense_parameters: float
    """Dense parameters this GPU steps with AdamW."""
    row_update_bytes: float = 0.0
    """Gradient bytes a row-wise value update gathers over its two passes (0 without one)."""
    dense_value_elements: float = 0.0
    """Value-table elements this GPU steps with dense AdamW (0 with a row-wise optimizer)."""


@dataclass(frozen=True)
class StepRates:
    """Measured rates of one GPU kind, and where they came from."""

    matmul_flops_per_s: float
    activation_elements_per_s: float
    memory_reads_per_s: float
    row_update_bytes_per_s: float
    hbm_bytes_per_s: float
    source: str

    def adamw_seconds(self, elements: float) -> float:
        """Dense AdamW over `elements` fp32 elements, streamed at the HBM's rate."""
        return elements * DENSE_ADAMW_BYTES_PER_ELEMENT / self.hbm_bytes_per_s

    def optimizer_seconds(self, work: StepWork) -> float:
        return self.adamw_seconds(work.dense_parameters + work.dense_value_elements)

    def row_update_seconds(self, work: StepWork) -> float:
        return work.row_update_bytes / self.row_update_bytes_per_s

    def fitted_seconds(self, work: StepWork) -> float:
        """The terms `fit` derives: matmuls, elementwise work and lookups."""
        return (work.matmul_flops / self.matmul_flops_per_s + work.activation_elements / self.activation_elements_per_s
                + work.memory_reads / self.memory_reads_per_s)

    def compute_seconds(self, work: StepWork) -> float:
        """The step's compute on one GPU, communication not included."""
        return self.fitted_seconds(work) + self.optimizer_seconds(work) + self.row_update_seconds(work)


# Fitted to the one-GPU steps in docs/planner_step_times.json (`python -m tools.bench.calibrate_planner --load
# docs/planner_step_times.json` prints these; docs/planner.md has its table). The matmul rate comes out at the card's
# measured bf16 GEMM ceiling (779 TFLOP/s in the same session), and the rest of a step's time is the elementwise work.
MEASURED = StepRates(
    matmul_flops_per_s=7.82e14,
    activation_elements_per_s=6.55e9,
    memory_reads_per_s=2.99e11,
    row_update_bytes_per_s=5.34e12,
    hbm_bytes_per_s=3.0e12,
    source="one NVIDIA H200, eager, bf16 autocast, fused AdamW, row-wise Adagrad: the steps of docs/benchmarks.md at "
           "commits 9827c38 (tools/bench_train.py --steps 20 --warmup 8) and ccb9f99, in docs/planner_step_times.json",
)


@dataclass(frozen=True)
class Measurement:
    """One measured training step: its work, its mean time, and the part of it the row-wise value update took."""

    name: str
    work: StepWork
    step_seconds: float
    row_update_seconds: float = 0.0


def fit(measurements: list[Measurement], hbm_bytes_per_s: float, source: str) -> StepRates:
    """The rates that best explain `measurements`.

    The row-update rate is the gathered bytes over the update's measured time, summed over the runs that have one.
    The other three come from a non-negative least-squares fit of what remains of each step (its time less the
    measured update and the modeled optimizer step), weighted by that time, so that a small model's step counts as much
    as a large one's: the fit minimises the relative errors. A term that no measurement exercises, or that the fit
    sets to zero, gets an infinite rate (it costs nothing)."""
    if not measurements:
        raise ValueError("fit needs at least one measurement")
    updates = [m for m in measurements if m.work.row_update_bytes > 0 and m.row_update_seconds > 0]
    row_rate = (sum(m.work.row_update_bytes for m in updates) / sum(m.row_update_seconds for m in updates)
                if updates else float("inf"))
    optimizer = StepRates(1.0, 1.0, 1.0, row_rate, hbm_bytes_per_s, source)
    rows, targets = [], []
    for m in measurements:
        rest = m.step_seconds - m.row_update_seconds - optimizer.optimizer_seconds(m.work)
        if rest <= 0:
            raise ValueError(f"{m.name}: its step ({m.step_seconds:.4f} s) is not longer than its update and optimizer "
                             "step; the measurement is wrong")
        rows.append([m.work.matmul_flops / rest, m.work.activation_elements / rest, m.work.memory_reads / rest])
        targets.append(1.0)
    costs = _nonnegative_least_squares(rows, targets)
    rates = [1.0 / c if c > 0 else float("inf") for c in costs]
    return StepRates(rates[0], rates[1], rates[2], row_rate, hbm_bytes_per_s, source)


def _nonnegative_least_squares(rows: list[list[float]], targets: list[float]) -> list[float]:
    """argmin ‖A x − b‖ over x ≥ 0, for a few unknowns: the best of the unconstrained solutions on every subset of
    them that comes out non-negative (the optimum is one of these)."""
    width = len(rows[0])
    best, best_error = [0.0] * width, _error(rows, targets, [0.0] * width)
    for size in range(1, width + 1):
        for subset in itertools.combinations(range(width), size):
            solution = _least_squares([[row[i] for i in subset] for row in rows], targets)
            if solution is None or any(x < 0 for x in solution):
                continue
            full = [0.0] * width
            for i, x in zip(subset, solution):
                full[i] = x
            error = _error(rows, targets, full)
            if error < best_error:
                best, best_error = full, error
    return best


def _least_squares(rows: list[list[float]], targets: list[float]) -> list[float] | None:
    """The normal equations' solution in float64 (columns scaled to unit norm first); None when singular."""
    width = len(rows[0])
    scales = [sum(row[j] ** 2 for row in rows) ** 0.5 for j in range(width)]
    if any(s == 0 for s in scales):
        return None
    a = [[row[j] / scales[j] for j in range(width)] for row in rows]
    normal = [[sum(r[i] * r[j] for r in a) for j in range(width)] + [sum(r[i] * t for r, t in zip(a, targets))]
              for i in range(width)]
    for col in range(width):  # Gauss-Jordan with partial pivoting
        pivot = max(range(col, width), key=lambda r: abs(normal[r][col]))
        if abs(normal[pivot][col]) < 1e-12:
            return None
        normal[col], normal[pivot] = normal[pivot], normal[col]
        for r in range(width):
            if r != col:
                factor = normal[r][col] / normal[col][col]
                normal[r] = [x - factor * y for x, y in zip(normal[r], normal[col])]
    return [normal[i][width] / normal[i][i] / scales[i] for i in range(width)]


def _error(rows: list[list[float]], targets: list[float], x: list[float]) -> float:
    return sum((sum(a * b for a, b in zip(row, x)) - t) ** 2 for row, t in zip(rows, targets))
