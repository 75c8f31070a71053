"""Time one memory layer alone, forward + backward, at a model's shapes, for each key search; prints markdown tables.

    python -m tools.bench.bench_memory_layer [--flavors 134m:16,1.3b:8] [--seq_len 2048] [--sweep]

For each flavor (with its local batch), a Memory+ layer with the flavor's width, 1M values (n_keys 1024), 4 heads ×
top-32 and k_dim = dim / 2 runs under bf16 autocast, as in training with a row-wise value optimizer: the table takes
no autograd gradient, the read-out does. The rows are:

- search only (the query projection and the key search), forward and forward + backward;
- the whole layer (search, the weighted bag, W1 and W2), forward and forward + backward;

for `key_search = torch` (the baseline), `select` and `triton`, each the median of `triton.testing.do_bench`, with
the dense FFN of the same block timed beside them. Before timing, every search is checked on a sample of tokens
against a float64 search over all n_keys² keys from the same bf16 inputs: the triton search must find exactly the
top-k (ties aside), the torch and select searches (which round their scores to bf16) are reported by their
agreement. `--sweep` also times the fused search's launch configs.
"""

from __future__ import annotations

import argparse

import torch
import triton
from triton.runtime.errors import OutOfResources
from triton.testing import do_bench

from titanmem.kernels import config as kernel_config
from titanmem.models import FLAVORS
from titanmem.models.args import MemoryArgs
from titanmem.models.init import init_weights
from titanmem.models.key_search import get_key_search

SEARCHES = ("torch", "select", "triton")
from titanmem.models.llama import FeedForward
from titanmem.models.memory import MemoryValues, ProductKeyMemory

CHECK_TOKENS = 256


def brute_force_scores(query: torch.Tensor, subkeys: torch.Tensor) -> torch.Tensor:
    """Scores of every product key, [T, heads, n_keys²], in float64 from the given (bf16) inputs."""
    halves = query.double().unflatten(-1, (2, -1))
    scores = torch.einsum("thsd,hsnd->thsn", halves, subkeys.double())
    return (scores[:, :, 0, :, None] + scores[:, :, 1, None, :]).flatten(-2)


def agreement(query: torch.Tensor, subkeys: torch.Tensor, knn: int, name: str) -> tuple[float, float]:
    """(share of exact top-k rows, largest shortfall of a chosen key's true score below the true k-th score)."""
    with torch.no_grad():
        _, indices = get_key_search(name)(query, subkeys, knn)
        scores = brute_force_scores(query, subkeys)
        kth = scores.topk(knn, dim=-1).values[..., -1]
        chosen = scores.gather(-1, indices)
    shortfall = (kth[..., None] - chosen).clamp(min=0).amax().item()
    exact = (chosen.min(-1).values >= kth).double().mean().item()
    return exact, shortfall


def build_layer(flavor: str, n_keys: int, key_search: str) -> tuple[ProductKeyMemory, FeedForward]:
    args = FLAVORS[flavor]
    memory = MemoryArgs(layers=(0,), n_keys=n_keys, k_dim=args.dim // 2, v_dim=args.dim, lookup="triton",
                        key_search=key_search)
    values = MemoryValues(memory.n_values, memory.v_dim).cuda()
    layer = ProductKeyMemory(args.dim, memory, values).cuda()
    init_weights(values, seed=0)
    init_weights(layer, seed=0)
    values.weight.requires_grad_(False)  # a row-wise optimizer takes the read-out's gradient, not the table's
    return layer, FeedForward(args.dim, args.ffn_hidden_dim).cuda()


def timed(fn, backward: bool, x: torch.Tensor) -> float:
    def step():
        with torch.autocast("cuda", torch.bfloat16):
            out = fn(x)
        if backward:
            out.float().square().sum().backward()  # not a plain sum: the softmax weights' sum has no gradient

    return do_bench(step, warmup=5, rep=50)


def search_output(layer: ProductKeyMemory):
    def run(x):
        weights, _ = layer.search(x.reshape(-1, layer.dim))
        return weights

    return run


def run_flavor(flavor: str, batch: int, seq_len: int, n_keys: int, sweep: bool) -> None:
    args = FLAVORS[flavor]
    tokens = batch * seq_len
    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(batch, seq_len, args.dim, device="cuda", generator=generator, requires_grad=True)
    times = {}
    layer, ffn = build_layer(flavor, n_keys, "torch")
    times["ffn"] = (timed(ffn, False, x), timed(ffn, True, x))
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        query = layer.query(x.reshape(-1, args.dim)[:CHECK_TOKENS]).unflatten(-1, (-1, layer.args.k_dim))
    subkeys = layer.subkeys.detach().to(torch.bfloat16)
    checks = {name: agreement(query, subkeys, layer.args.knn, name) for name in SEARCHES}
    for name in SEARCHES:
        layer.key_search = get_key_search(name)
        times[name] = (timed(search_output(layer), False, x), timed(search_output(layer), True, x),
                       timed(layer, False, x), timed(layer, True, x))
    dense_fwd, dense_fwdbwd = times["ffn"]
    print(f"| {flavor} ({tokens // 1024}k tokens) | dense FFN | — | — | {dense_fwd:.2f} | {dense_fwdbwd:.2f} | — "
          "| — |", flush=True)
    for name in SEARCHES:
        search_fwd, search_fwdbwd, layer_fwd, layer_fwdbwd = times[name]
        exact, shortfall = checks[name]
        base = times["torch"][3]
        print(f"| {flavor} | key search {name} | {search_fwd:.2f} | {search_fwdbwd:.2f} | {layer_fwd:.2f} | "
              f"{layer_fwdbwd:.2f} ({layer_fwdbwd / base:.2f}× torch, {layer_fwdbwd / dense_fwdbwd:.1f}× FFN) | "
              f"{exact:.2%} | {shortfall:.2e} |", flush=True)
    if sweep:
        print("\n".join(sweep_search(layer, x)), flush=True)


def sweep_search(layer: ProductKeyMemory, x: torch.Tensor) -> list[str]:
    layer.key_search = get_key_search("triton")
    original = dict(kernel_config._GPU["key_search"])
    results = []
    for block_n, warps in ((128, 4), (128, 8), (256, 4), (512, 8)):
        kernel_config._GPU["key_search"] = {"BLOCK_T": 16, "BLOCK_N": block_n, "BLOCK_D": 64, "num_warps": warps,
                                            "num_stages": 1}
        try:
            ms = timed(search_output(layer), False, x)
        except (OutOfResources, RuntimeError) as e:  # too many registers or shared memory
            results.append((float("inf"), f"| sweep | N{block_n} w{warps} | failed: {type(e).__name__} |"))
            continue
        results.append((ms, f"| sweep | N{block_n} w{warps} | {ms:.3f} ms |"))
    kernel_config._GPU["key_search"] = original
    return [line for _, line in sorted(results)[:12]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flavors", default="134m:16,1.3b:8", help="flavor:local_batch, comma-separated")
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--n_keys", type=int, default=1024)
    parser.add_argument("--sweep", action="store_true", help="also time the fused search's launch configs")
    options = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}")
    print("| shape | path | search fwd ms | search fwd+bwd ms | layer fwd ms | layer fwd+bwd ms | exact top-k rows "
          "| worst shortfall |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for item in options.flavors.split(","):
        flavor, batch = item.split(":")
        run_flavor(flavor, int(batch), options.seq_len, options.n_keys, options.sweep)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
