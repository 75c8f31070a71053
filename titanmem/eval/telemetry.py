"""Memory-layer telemetry: is the value table used, or do reads collapse onto a few rows?

Every memory-layer call adds its rows to a hit count per layer (a `bincount` on the device, no host sync), and its
top-1 softmax weight to a running sum. Every `memory_telemetry_freq` steps the window is summarised, per layer and for
the shared pool (all layers together), into:
- `hit_fraction`: share of the value rows read at least once in the window;
- `never_hit_fraction`: share of the rows not read once since the start (dead slots);
- `entropy` of the window's row-usage distribution (nats), and `kl_to_uniform` = log N − entropy (0 when every row is
  read equally, log N when all reads hit one row);
- `top1_weight`: mean over tokens and heads of the largest softmax weight in a head's bag (1 means one row decides);
- `hottest_1pct_hits` and `hottest_1pct_share`: reads of the 1% most-read rows, and their share of all reads.
Counts are those of this rank's tokens (rank 0 is the one that logs), and under tensor parallel of this rank's
heads. With activation checkpointing a recomputed forward reads again and is counted again: shares, entropy and the
top-1 weight are unaffected, the hottest rows' raw hit count doubles.
"""

from __future__ import annotations

import math

import torch


def memory_layer_names(model: torch.nn.Module) -> dict[int, str]:
    """`layer<i>` for the memory layer in block i, keyed by the layer module's id (whatever AC or compile wrap
    around the blocks: their names still start with `layers.<i>`)."""
    from titanmem.models.memory import ProductKeyMemory

    return {id(module): f"layer{name.split('.')[1]}" for name, module in model.named_modules()
            if isinstance(module, ProductKeyMemory)}


class _Counts:
    def __init__(self, n_values: int, device: torch.device):
        self.window = torch.zeros(n_values, dtype=torch.int64, device=device)
        self.ever = torch.zeros(n_values, dtype=torch.bool, device=device)
        self.top1_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.top1_count = 0


class MemoryTelemetry:
    def __init__(self, n_values: int, layer_names: list[str], device: torch.device):
        self.n_values = n_values
        self.layers = {name: _Counts(n_values, device) for name in layer_names}
        self.pool = _Counts(n_values, device)

    @torch.no_grad()
    def observe(self, layer: str, indices: torch.Tensor, weights: torch.Tensor, knn: int) -> None:
        """One read of `layer`: indices [T, heads·knn] (rows of the full table), weights of the same shape."""
        hits = torch.bincount(indices.flatten(), minlength=self.n_values)
        top1 = weights.detach().float().unflatten(-1, (-1, knn)).amax(-1)
        for counts in (self.layers[layer], self.pool):
            counts.window += hits
            counts.ever |= hits > 0
            counts.top1_sum += top1.sum(dtype=torch.float64)
            counts.top1_count += top1.numel()

    @torch.no_grad()
    def summarize(self) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """Scalars named `memory/<layer or pool>/<metric>`, and per-layer histograms of log10(1 + window hits); then
        a new window starts."""
        scalars: dict[str, float] = {}
        histograms: dict[str, torch.Tensor] = {}
        for name, counts in [*self.layers.items(), ("pool", self.pool)]:
            if counts.top1_count == 0:
                continue
            for metric, value in usage_metrics(counts.window, counts.ever).items():
                scalars[f"memory/{name}/{metric}"] = value
            scalars[f"memory/{name}/top1_weight"] = (counts.top1_sum / counts.top1_count).item()
            histograms[f"memory/{name}/log10_hits"] = torch.log10(1 + counts.window.double()).cpu()
            counts.window.zero_()
            counts.top1_sum.zero_()
            counts.top1_count = 0
        return scalars, histograms


def usage_metrics(window: torch.Tensor, ever: torch.Tensor) -> dict[str, float]:
    """The usage statistics of one hit-count vector (see the module doc)."""
    n = window.numel()
    total = window.sum()
    p = window.double() / total.clamp(min=1)
    entropy = -(p * torch.log(p.clamp(min=1e-300))).sum()
    hottest = max(1, math.ceil(n / 100))
    top = window.topk(hottest).values.sum()
    values = torch.stack([
        (window > 0).double().mean(),
        1 - ever.double().mean(),
        entropy,
        math.log(n) - entropy,
        top.double(),
        top.double() / total.clamp(min=1),
    ]).tolist()
    names = ("hit_fraction", "never_hit_fraction", "entropy", "kl_to_uniform", "hottest_1pct_hits",
             "hottest_1pct_share")
    return dict(zip(names, values))
