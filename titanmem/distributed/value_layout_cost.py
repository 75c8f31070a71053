"""What each layout of the value table costs a training step per GPU: its exchanges on the critical path and the
update of its block. The planner adds these to its step time (`titanmem.planner`), and `value_slice_sharding = "auto"`
takes the cheapest layout the value optimizer allows (`titanmem.plan`).

Per memory-layer call (T tokens per rank, p = heads × knn pairs per token, D = v_dim, M = mp, R = the slice's
replicas, G = R × M data-parallel ranks, e = the table's bytes per element):
- `replicate` exchanges over mp inside the call (the group's pairs, then the read-outs and their gradients); at the
  step a row-wise optimizer gathers every replica's records, R × (M·T·p·12 + T·D·4) bytes, and each replica updates
  from all of them: R·M·T·p pairs, each reading its token's D/M-column gradient row, twice (norm, then update).
  Dense AdamW all-reduces the slice's gradient and steps the whole slice.
- `rows` all-gathers the pairs over the G ranks (G·T·p·8 bytes) and moves R·T·D·4 bytes of fp32 partial read-outs
  forward and R·T·D·e of gradients back, plus the pairs' weight gradients (G·T·p·4); each rank updates its own rows
  from M·T·p pairs on average: flat in R.
- `fsdp` (dense AdamW) gathers the whole slice in bf16 and reduce-scatters its fp32 gradient every step.
"""

from __future__ import annotations

from dataclasses import dataclass

from titanmem.registry import VALUE_OPTIMIZERS
from titanmem.step_model import MEASURED, StepRates

# Links, per GPU and direction: NVLink 4 within an H100 node, one 400 Gb/s NIC per GPU between nodes.
INTRA_NODE_BYTES_PER_S = 450e9
INTER_NODE_BYTES_PER_S = 50e9


@dataclass(frozen=True)
class ValueTableWork:
    """The sizes a layout's cost depends on."""

    n_values: int
    v_dim: int
    element_bytes: int
    """The table's bytes per element (2 for bf16, 4 for fp32)."""
    pairs: int
    """heads × knn: the rows each token reads."""
    tokens: int
    """Per data-parallel rank and micro-batch."""
    calls: int
    """Memory-layer calls per step: memory layers × micro-batches."""
    mp: int
    copies: int
    """R: the data-parallel ranks that hold the same column slice."""


def ring(volume: float, group: int, bandwidth: float) -> float:
    """Seconds of a ring collective that moves `volume` bytes in all over `group` ranks."""
    return 0.0 if group <= 1 else volume * (group - 1) / group / bandwidth


def column_exchange_seconds(work: ValueTableWork, bandwidth: float) -> float:
    """The mp group's exchange per step (column split): its pairs, then the read-outs and their gradients."""
    t, m = work.tokens, work.mp
    return work.calls * (t * work.pairs * 12 * (m - 1) + ring(2 * t * work.v_dim * work.element_bytes * m, m, 1.0)
                         ) / bandwidth


def value_table_seconds(layout: str, optimizer: str, work: ValueTableWork, mp_bandwidth: float,
                        replica_bandwidth: float, rates: StepRates = MEASURED) -> tuple[float, float]:
    """(exchange seconds, update seconds) per step and GPU of `layout` trained by `optimizer`; `mp_bandwidth` is the
    mp group's link, `replica_bandwidth` the link across the slice's replicas (the slowest the grid spans)."""
    gathered, dense_elements = value_update_work(layout, optimizer, work)
    update = gathered / rates.row_update_bytes_per_s + rates.adamw_seconds(dense_elements)
    return value_exchange_seconds(layout, optimizer, work, mp_bandwidth, replica_bandwidth), update


def value_exchange_seconds(layout: str, optimizer: str, work: ValueTableWork, mp_bandwidth: float,
                           replica_bandwidth: float) -> float:
    """The exchange part of `value_table_seconds`."""
    t, p, d, m, r, e = work.tokens, work.pairs, work.v_dim, work.mp, work.copies, work.element_bytes
    slice_elements = work.n_values * d / m
    if layout == "rows" and r > 1:
        g = r * m
        per_call = ((g - 1) * t * p * 8 + r * t * d * (4 + e) * (g - 1) / g) / replica_bandwidth + ring(
            g * t * p * 4, g, replica_bandwidth)
        return work.calls * per_call
    exchange = column_exchange_seconds(work, mp_bandwidth)
    if VALUE_OPTIMIZERS.get(optimizer).dense:
        return exchange + ring((6 if layout == "fsdp" else 2 * 4) * slice_elements, r, replica_bandwidth)
    records = work.calls * (t * m * p * 12 + t * d * 4) * r
    return exchange + ring(records, r, replica_bandwidth)


def value_update_work(layout: str, optimizer: str, work: ValueTableWork) -> tuple[float, float]:
    """(gradient bytes a row-wise update gathers, table elements dense AdamW steps) per step and GPU. A row-wise
    update makes two passes over the step's pairs, each gathering its token's gradient row (D/M fp32 columns): a
    rows-sharded block's pairs are M·T·p per call on average, a replicated slice's R·M·T·p."""
    t, p, d, m, r = work.tokens, work.pairs, work.v_dim, work.mp, work.copies
    slice_elements = work.n_values * d / m
    if VALUE_OPTIMIZERS.get(optimizer).dense:
        # FSDP and row blocks step their share of the slice; a replicated slice is stepped whole by every copy.
        return 0.0, slice_elements / r if layout == "fsdp" or (layout == "rows" and r > 1) else slice_elements
    pairs_per_call = m * t * p if layout == "rows" and r > 1 else r * m * t * p
    return work.calls * pairs_per_call * (d / m) * 4 * 2, 0.0


def layouts_for(optimizer: str) -> tuple[str, ...]:
    """The layouts `optimizer` can train (FSDP's gathered slice needs a dense gradient), the usual one first."""
    return ("fsdp", "rows", "replicate") if VALUE_OPTIMIZERS.get(optimizer).dense else ("replicate", "rows")


def cheapest_layout(optimizer: str, work: ValueTableWork, mp_bandwidth: float, replica_bandwidth: float) -> str:
    """The layout of least exchange + update time; on a tie, the earlier of `layouts_for`'s (ties come with one copy
    of the slice, where the layouts coincide)."""
    costs = {layout: sum(value_table_seconds(layout, optimizer, work, mp_bandwidth, replica_bandwidth))
             for layout in layouts_for(optimizer)}
    return min(costs, key=costs.get)
