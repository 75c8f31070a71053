"""Benchmark and check the memory-lookup kernels on a GPU; prints one markdown table.

    python -m tools.bench.bench_kernels [--shapes 1Mx1024:16k,1Mx4096:8k,4Mx2048:8k,8Mx2048:8k] [--sweep]

Every number is a median from `triton.testing.do_bench`, measured in this run next to its baselines:
- copy: device-to-device copy of a 4 GiB buffer; its bytes (read + write) / time is the bandwidth ceiling;
- torch F.embedding_bag forward, and torch gather + bmm forward + backward (dense value gradient);
- ours: forward (and its bandwidth as a % of the copy ceiling), forward + dense backward, forward + sparse
  backward (touched rows only);
- optimizer: our dense backward + torch.optim.AdamW(fused=True) over the bf16 table with bf16 states (the
  reference recipe), against our backward + fused row-wise update (weight grads, row grouping, norm, update).
Before timing, each kernel is checked against torch on the same inputs.
"""

from __future__ import annotations

import argparse
import gc

import torch
import torch.nn.functional as F
import triton

import titanmem.kernels as kernels
from titanmem.kernels import config as kernel_config
from titanmem.kernels.row_update import OPTIMIZERS, row_grad_sq, row_update_, step_scalars

ROWS_PER_TOKEN = 4 * 32  # heads × knn


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    units = {"k": 1024, "M": 1024**2}
    shapes = []
    for item in text.split(","):
        table, tokens = item.split(":")
        rows, dim = table.split("x")
        shapes.append((int(rows[:-1]) * units[rows[-1]], int(dim), int(tokens[:-1]) * units[tokens[-1]]))
    return shapes


def bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=40)


def copy_ceiling() -> float:
    src = torch.empty(2**31, dtype=torch.uint16, device="cuda")  # 4 GiB
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * 2**32 / ms / 1e9  # TB/s


def free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def make_inputs(rows: int, dim: int, tokens: int):
    generator = torch.Generator(device="cuda").manual_seed(0)
    values = torch.randn(rows, dim, device="cuda", dtype=torch.bfloat16, generator=generator) * dim**-0.5
    indices = torch.randint(0, rows, (tokens, ROWS_PER_TOKEN), device="cuda", generator=generator)
    weights = torch.softmax(torch.randn(tokens, ROWS_PER_TOKEN, device="cuda", generator=generator), -1)
    grad_out = torch.randn(tokens, dim, device="cuda", dtype=torch.bfloat16, generator=generator)
    return values, indices, weights, grad_out


def check(values, indices, weights, grad_out) -> dict[str, float]:
    """Max relative errors against torch, in fp32, on this shape's inputs (a sample of rows for the gradient)."""
    # The first 1024 tokens: a float32 copy of the whole table would not fit beside it at the largest shapes.
    head = slice(0, 1024)
    used = indices[head].unique()
    local = torch.searchsorted(used, indices[head])
    reference = F.embedding_bag(local, values[used].float(), per_sample_weights=weights[head], mode="sum")
    ours = kernels.weighted_bag(values, indices[head], weights[head]).float()
    forward_error = ((ours - reference).abs().max() / reference.abs().max()).item()
    del reference, ours
    _, rows, row_grads = kernels.weighted_bag_sparse_backward(grad_out, values, indices, weights, False)
    sample = rows[torch.randperm(rows.numel(), device="cuda")[:2048]].sort().values
    # The summed gradient of the sampled rows, by brute force over their (token, slot) pairs.
    slot_of_row = torch.full((values.shape[0],), -1, device="cuda", dtype=torch.long)
    slot_of_row[sample] = torch.arange(sample.numel(), device="cuda")
    token_ids, slot_ids = (slot_of_row[indices] >= 0).nonzero(as_tuple=True)
    expected = torch.zeros(sample.numel(), values.shape[1], device="cuda")
    expected.index_add_(
        0, slot_of_row[indices[token_ids, slot_ids]], weights[token_ids, slot_ids, None] * grad_out[token_ids].float()
    )
    got = row_grads[torch.searchsorted(rows, sample)]
    return {"forward": forward_error, "row_grads": ((got - expected).abs().max() / expected.abs().max()).item()}


def timed(result: dict, name: str, fn, baseline: float | None = None) -> float | None:
    """Time `fn` into result[name]; a shape too large for the card reads 'out of memory' instead of failing."""
    try:
        ms = bench(fn)
    except torch.OutOfMemoryError:
        result[name] = "out of memory"
        free()
        return None
    result[name] = f"{ms:.2f} ms" + (f" ({ms / baseline:.2f}× dense)" if baseline else "")
    free()
    return ms


def sweep_forward(values, indices, weights) -> dict:
    """Try forward launch configs on this shape; return the fastest."""
    best = None
    kernel_config.FORWARD_BY_WIDTH = False
    for block_l in (2, 4, 8, 16):
        for block_d in (1024, 2048, 4096):
            for warps in (4, 8):
                for stages in (1, 2, 3):
                    if block_l * block_d > 32768 or block_d > 2 * triton.next_power_of_2(values.shape[1]):
                        continue  # register spills, or blocks past the row
                    kernel_config._GPU["forward"] = {
                        "BLOCK_L": block_l, "BLOCK_D": block_d, "num_warps": warps, "NUM_STAGES": stages
                    }
                    ms = bench(lambda: kernels.weighted_bag(values, indices, weights))
                    if best is None or ms < best[0]:
                        best = (ms, dict(kernel_config._GPU["forward"]))
    kernel_config._GPU["forward"] = best[1]
    return best[1]


def breakdown(values, indices, weights, grad_out, sweep: bool) -> dict[str, str]:
    """Time each stage of the fused backward + update; with `sweep`, search the row kernels' launch configs."""
    out = {}
    first = torch.zeros(values.shape[0], device="cuda")
    empty = torch.zeros(0, device="cuda")
    pair_order, offsets, touched = kernels.row_segments(indices, values.shape[0])
    row_sq = row_grad_sq(grad_out, weights, pair_order, offsets, False)
    out["touched rows"] = f"{touched.numel():,}"
    out["weight grads"] = f"{bench(lambda: kernels.weighted_bag_weight_grad(grad_out, values, indices)):.2f} ms"
    out["row grouping (sort)"] = f"{bench(lambda: kernels.row_segments(indices, values.shape[0])):.2f} ms"

    def grad_sq():
        row_grad_sq(grad_out, weights, pair_order, offsets, False)

    scalars = step_scalars(1.0, 1, 0.9, 0.95, device=values.device)

    def update():
        row_update_(values, first, empty, grad_out, weights, pair_order, offsets, touched, row_sq, OPTIMIZERS["adagrad"],
                    0.0, 0.0, 1e-8, 0.9, 0.95, scalars)

    def sparse_backward():
        kernels.weighted_bag_sparse_backward(grad_out, values, indices, weights, False)

    if sweep:
        for kernel, fn in (("row_update", update), ("row_backward", sparse_backward)):
            best = None
            for block_p in (1, 2, 4):
                for block_d in (1024, 2048, 4096):
                    for warps in (2, 4, 8):
                        kernel_config._GPU[kernel] = {"BLOCK_P": block_p, "BLOCK_D": block_d, "num_warps": warps}
                        if kernel == "row_backward":
                            kernel_config._GPU[kernel]["ROWS_PER_PROGRAM"] = 1
                        ms = bench(fn)
                        if best is None or ms < best[0]:
                            best = (ms, dict(kernel_config._GPU[kernel]))
            if kernel == "row_backward":
                for per_program in (2, 4, 8):
                    kernel_config._GPU[kernel] = dict(best[1], ROWS_PER_PROGRAM=per_program)
                    ms = bench(fn)
                    if ms < best[0]:
                        best = (ms, dict(kernel_config._GPU[kernel]))
            kernel_config._GPU[kernel] = best[1]
            out[f"{kernel} config"] = str(best[1])
    out["sparse backward"] = f"{bench(sparse_backward):.2f} ms"
    out["row grad norms"] = f"{bench(grad_sq):.2f} ms"
    out["row update (adagrad)"] = f"{bench(update):.2f} ms"
    return out


def run_shape(rows: int, dim: int, tokens: int, ceiling: float, sweep: bool) -> dict[str, str]:
    values, indices, weights, grad_out = make_inputs(rows, dim, tokens)
    result = {"shape": f"{rows // 2**20}M×{dim}, {tokens // 1024}k tok"}
    errors = check(values, indices, weights, grad_out)
    result["max rel err (fwd, row grads)"] = f"{errors['forward']:.1e}, {errors['row_grads']:.1e}"
    if sweep:
        result["forward config"] = str(sweep_forward(values, indices, weights))

    read_bytes = tokens * ROWS_PER_TOKEN * dim * values.element_size() + tokens * dim * values.element_size()
    bf16_weights = weights.bfloat16()
    timed(result, "torch embedding_bag fwd",
          lambda: F.embedding_bag(indices, values, per_sample_weights=bf16_weights, mode="sum"))
    ours_fwd = timed(result, "ours fwd", lambda: kernels.weighted_bag(values, indices, weights))
    if ours_fwd:
        result["ours fwd"] += f" ({read_bytes / ours_fwd / 1e9 / ceiling:.0%} of copy)"

    leaf = values.detach().requires_grad_(True)

    def torch_gather_bmm():
        leaf.grad = None
        torch.bmm(bf16_weights[:, None, :], leaf[indices]).squeeze(1).backward(grad_out)

    def ours_dense():
        leaf.grad = None
        kernels.weighted_bag(leaf, indices, weights).backward(grad_out)

    def ours_sparse():
        kernels.weighted_bag(values, indices, weights)
        kernels.weighted_bag_sparse_backward(grad_out, values, indices, weights, False)

    timed(result, "torch gather+bmm fwd+bwd", torch_gather_bmm)
    timed(result, "ours fwd+bwd dense", ours_dense)
    leaf.grad = None
    timed(result, "ours fwd+bwd sparse", ours_sparse)

    # Dense backward + torch AdamW over the bf16 table with bf16 states: the reference recipe, every row every step.
    dense_bwd = timed(result, "dense bwd",
                      lambda: kernels.weighted_bag_dense_backward(grad_out, values, indices, weights, False))
    baseline = None
    try:
        table = torch.nn.Parameter(values)  # shares the storage: no second copy of the table
        _, table.grad = kernels.weighted_bag_dense_backward(grad_out, values, indices, weights, False)
        adamw = torch.optim.AdamW([table], lr=0.0, fused=True)
        adamw.step()  # allocate the states outside the timing
        adamw_ms = timed(result, "AdamW(fused) step", adamw.step)
        if dense_bwd and adamw_ms:
            baseline = dense_bwd + adamw_ms
            result["dense bwd + AdamW"] = f"{baseline:.2f} ms"
        del table, adamw
    except torch.OutOfMemoryError:
        result["AdamW(fused) step"] = "out of memory"
    free()

    for kind in ("sgd", "adagrad", "adam"):
        code = OPTIMIZERS[kind]
        try:
            first = {"adagrad": lambda: torch.zeros(rows, device="cuda"),
                     "adam": lambda: torch.zeros_like(values)}.get(kind, lambda: torch.zeros(0, device="cuda"))()
            second = torch.zeros_like(values) if kind == "adam" else torch.zeros(0, device="cuda")
        except torch.OutOfMemoryError:
            result[f"bwd + fused {kind}"] = "out of memory"
            free()
            continue

        def fused(first=first, second=second, code=code):
            kernels.weighted_bag_weight_grad(grad_out, values, indices)
            pair_order, offsets, touched = kernels.row_segments(indices, values.shape[0])
            row_sq = row_grad_sq(grad_out, weights, pair_order, offsets, False)
            row_sq.sum().sqrt()  # the table's gradient norm, for clipping and the logs
            row_update_(values, first, second, grad_out, weights, pair_order, offsets, touched, row_sq, code,
                        0.0, 0.0, 1e-8, 0.9, 0.95, step_scalars(1.0, 1, 0.9, 0.95, device=values.device))

        timed(result, f"bwd + fused {kind}", fused, baseline)
        first = second = None  # noqa: F841  (free the states before the next optimizer's)
        free()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="1Mx1024:16k,1Mx4096:8k,4Mx2048:8k,8Mx2048:8k")
    parser.add_argument("--sweep", action="store_true", help="also search the forward launch config per shape")
    parser.add_argument("--breakdown", action="store_true", help="time each stage of the fused update only")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels needs a CUDA GPU")
    ceiling = copy_ceiling()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}; copy ceiling {ceiling:.2f} TB/s")
    results = []
    for rows, dim, tokens in parse_shapes(args.shapes):
        if args.breakdown:
            results.append({"shape": f"{rows // 2**20}M×{dim}, {tokens // 1024}k tok",
                            **breakdown(*make_inputs(rows, dim, tokens), args.sweep)})
            free()
            print(results[-1], flush=True)
            continue
        results.append(run_shape(rows, dim, tokens, ceiling, args.sweep))
        free()
        print(results[-1], flush=True)
    columns = list(dict.fromkeys(key for r in results for key in r))
    print("| " + " | ".join(columns) + " |")
    print("|" + " --- |" * len(columns))
    for r in results:
        print("| " + " | ".join(r.get(c, "") for c in columns) + " |")


if __name__ == "__main__":
    main()
