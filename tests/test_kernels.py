"""Triton kernels against float64 PyTorch references. On CPU they run under TRITON_INTERPRET=1 (see conftest)."""

import pytest
import torch

import titanmem.kernels as kernels
from helpers import FP32_UNIT, assert_close_in_scale
from titanmem.kernels import config as kernel_config
from titanmem.components import row_update_torch
from titanmem.kernels import row_update
from titanmem.kernels.row_update import (ADAGRAD, ADAM, OPTIMIZERS, SGD, heavy_row_grads, row_grad_sq, row_update_,
                                        step_scalars)

# The kernels run compiled on a GPU when there is one, else interpreted on CPU; references are float64 on CPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The kernels sum in fp32, in their own order. A bag sums L ≤ 16 weighted rows; a value gradient element sums the
# (token, slot) pairs that read its row (up to 108 in these cases), a weight gradient a row's D ≤ 300 products. With
# terms no larger than about the largest element, n roundings err by at most n units of it, and in practice by about
# √n (seen: under 4). Errors are bounded relative to the largest element (helpers.assert_close_in_scale), not to
# each element, since terms may cancel.
SUM_BOUND = 300 * FP32_UNIT


def cpu64(tensor):
    return tensor.detach().cpu().double()


def reference_bag(values, indices, weights):
    values, indices, weights = values.cpu(), indices.cpu(), weights.cpu()
    return torch.einsum("tl,tld->td", weights.double(), values.double()[indices.long()])


def reference_grads(values, indices, weights, grad_out):
    """Dense value gradient and weight gradient of Σ grad_out · bag, in float64."""
    values64 = values.detach().cpu().double().requires_grad_(True)
    weights64 = weights.detach().cpu().double().requires_grad_(True)
    reference_bag(values64, indices, weights64).backward(grad_out.cpu().double())
    return values64.grad, weights64.grad


def random_case(seed, tokens, slots, rows, dim, index_dtype=torch.int64, value_dtype=torch.float32, hot_rows=None):
    """Random bags with duplicates within and across bags (`hot_rows` narrows the index range to force them)."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(rows, dim, generator=generator).to(value_dtype)
    indices = torch.randint(0, hot_rows or rows, (tokens, slots), generator=generator).to(index_dtype)
    weights = torch.randn(tokens, slots, generator=generator)
    grad_out = torch.randn(tokens, dim, generator=generator)
    return values.to(DEVICE), indices.to(DEVICE), weights.to(DEVICE), grad_out.to(DEVICE)


CASES = [
    # (tokens, slots, rows, dim, index dtype, value dtype, hot rows)
    (5, 7, 40, 37, torch.int64, torch.float32, None),  # D not a power of two
    (1, 1, 3, 8, torch.int32, torch.float32, None),  # T = 1, L = 1
    (9, 12, 50, 300, torch.int32, torch.float32, 6),  # D over one column block; heavy duplicates
    (6, 16, 1000, 64, torch.int64, torch.bfloat16, 10),  # bf16 storage, duplicates across bags
    (3, 5, 20, 1, torch.int64, torch.float32, None),  # D = 1
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[0]}L{c[1]}N{c[2]}D{c[3]}-{c[4]}-{c[5]}")
def test_forward_matches_float64_reference(case):
    values, indices, weights, _ = random_case(0, *case)
    out = kernels.weighted_bag(values, indices, weights)
    assert out.dtype == values.dtype and out.shape == (indices.shape[0], values.shape[1])
    expected = reference_bag(values, indices, weights)
    if values.dtype == torch.bfloat16:
        # The fp32 sum is stored in bf16: one more rounding, by less than one bf16 step of the element itself (2^-7
        # of it: a GPU rounds to nearest, the Triton interpreter truncates).
        torch.testing.assert_close(cpu64(out), expected, rtol=2**-7, atol=SUM_BOUND * expected.abs().max().item())
    else:
        assert_close_in_scale(out, expected, SUM_BOUND)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("case", CASES[:3] + CASES[4:], ids=lambda c: f"T{c[0]}L{c[1]}N{c[2]}D{c[3]}")
def test_dense_and_sparse_backward_match_the_reference(case, deterministic):
    values, indices, weights, grad_out = random_case(1, *case)
    expected_values, expected_weights = reference_grads(values, indices, weights, grad_out)

    grad_weights, grad_values = kernels.weighted_bag_dense_backward(grad_out, values, indices, weights, deterministic)
    assert_close_in_scale(grad_values, expected_values, SUM_BOUND, "dense value gradient")
    assert_close_in_scale(grad_weights, expected_weights, SUM_BOUND, "weight gradient")

    grad_weights, rows, row_grads = kernels.weighted_bag_sparse_backward(
        grad_out, values, indices, weights, deterministic
    )
    rows = rows.cpu().long()
    assert torch.equal(rows, torch.unique(indices.cpu().long()))
    assert_close_in_scale(row_grads, expected_values[rows], SUM_BOUND, "sparse value gradient")
    assert_close_in_scale(grad_weights, expected_weights, SUM_BOUND, "weight gradient of the sparse backward")

    token_ordered = kernels.weighted_bag_weight_grad(grad_out, values, indices)
    assert_close_in_scale(token_ordered, expected_weights, SUM_BOUND, "token-ordered weight gradient")


def test_deterministic_backward_is_bitwise_repeatable():
    values, indices, weights, grad_out = random_case(2, 8, 12, 30, 300, hot_rows=5)
    first = kernels.weighted_bag_sparse_backward(grad_out, values, indices, weights, True)
    second = kernels.weighted_bag_sparse_backward(grad_out, values, indices, weights, True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_autograd_through_the_op_matches_embedding_bag():
    values, indices, weights, grad_out = random_case(3, 7, 9, 30, 45)
    ours_values = values.clone().requires_grad_(True)
    ours_weights = weights.clone().requires_grad_(True)
    kernels.weighted_bag(ours_values, indices, ours_weights).backward(grad_out)
    ref_values = values.clone().requires_grad_(True)
    ref_weights = weights.clone().requires_grad_(True)
    torch.nn.functional.embedding_bag(indices, ref_values, per_sample_weights=ref_weights, mode="sum").backward(grad_out)
    # Two fp32 computations, each within SUM_BOUND of the exact result.
    assert_close_in_scale(ours_values.grad, ref_values.grad, 2 * SUM_BOUND, "value gradient")
    assert_close_in_scale(ours_weights.grad, ref_weights.grad, 2 * SUM_BOUND, "weight gradient")
    # Without a value gradient the op only computes the weight gradient (the row-wise optimizers' case).
    only_weights = weights.clone().requires_grad_(True)
    kernels.weighted_bag(values, indices, only_weights).backward(grad_out)
    assert_close_in_scale(only_weights.grad, ref_weights.grad, 2 * SUM_BOUND, "weight gradient alone")


def test_torch_compile_traces_the_ops_without_graph_breaks():
    values, indices, weights, grad_out = random_case(4, 4, 6, 20, 24)

    def step(values, weights):
        return (kernels.weighted_bag(values, indices, weights) * grad_out).sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    v1, w1 = values.clone().requires_grad_(True), weights.clone().requires_grad_(True)
    compiled(v1, w1).backward()
    v2, w2 = values.clone().requires_grad_(True), weights.clone().requires_grad_(True)
    step(v2, w2).backward()
    # The same kernels, traced or not (on a GPU their atomic adds may sum in another order each run).
    assert_close_in_scale(v1.grad, v2.grad, 2 * SUM_BOUND, "value gradient")
    assert_close_in_scale(w1.grad, w2.grad, 2 * SUM_BOUND, "weight gradient")


def reference_row_update(kind, values, first, second, grad_rows, rows, lr, wd, clip, eps, betas, step):
    """The same optimizer applied to the dense gradient restricted to the touched rows, in float64."""
    values, first, second = values.double().clone(), first.double().clone(), second.double().clone()
    grad = grad_rows.double() * clip
    rows = rows.long()
    current = values[rows] * (1 - lr * wd)
    if kind == SGD:
        current = current - lr * grad
    elif kind == ADAGRAD:
        first[rows] += (grad * grad).mean(dim=1)
        current = current - lr * grad / (first[rows].sqrt() + eps)[:, None]
    else:
        first[rows] = betas[0] * first[rows] + (1 - betas[0]) * grad
        second[rows] = betas[1] * second[rows] + (1 - betas[1]) * grad * grad
        m_hat = first[rows] / (1 - betas[0] ** step)
        v_hat = second[rows] / (1 - betas[1] ** step)
        current = current - lr * m_hat / (v_hat.sqrt() + eps)
    values[rows] = current
    return values, first, second


@pytest.fixture(params=[("triton", None), ("triton", 2), ("torch", None)],
                ids=["triton", "triton-heavy-rows-in-chunks-of-2", "torch"])
def passes(request, monkeypatch):
    """The fused passes: the Triton kernels at their own heavy-row threshold, the same with every row of over 2 pairs
    summed in chunks beforehand, and the tensor-op passes that tables off the GPU use."""
    implementation, heavy_pairs = request.param
    if heavy_pairs is not None:
        for table in (kernel_config._GPU, kernel_config._INTERPRETER):
            monkeypatch.setitem(table, "row_update", {**table["row_update"], "HEAVY_PAIRS": heavy_pairs})
    return row_update_torch if implementation == "torch" else row_update


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
@pytest.mark.parametrize("dim", [37, 300])
def test_fused_row_updates_match_the_optimizer_on_the_restricted_dense_gradient(kind, dim, passes):
    code = OPTIMIZERS[kind]
    values, indices, weights, grad_out = random_case(5, 6, 8, 40, dim, hot_rows=25)
    first = torch.zeros(40) if code == ADAGRAD else torch.zeros(40, dim) if code == ADAM else torch.zeros(0)
    second = torch.zeros(40, dim) if code == ADAM else torch.zeros(0)
    first, second = first.to(DEVICE), second.to(DEVICE)
    expected = (cpu64(values), cpu64(first), cpu64(second))
    betas, eps, lr, wd = (0.9, 0.95), 1e-8, 0.05, 0.1
    for step in (1, 2, 3):
        grad_out = grad_out.roll(1, dims=0) * 0.7  # a different gradient each step
        dense_grad, _ = reference_grads(values, indices, weights, grad_out)
        pair_order, offsets, rows = kernels.row_segments(indices, values.shape[0])
        row_sq = passes.row_grad_sq(grad_out, weights, pair_order, offsets, True)
        touched = rows.cpu().long()
        torch.testing.assert_close(cpu64(row_sq), (dense_grad[touched] ** 2).sum(1), rtol=1e-5, atol=1e-5)
        clip = 0.5 if step == 2 else 1.0
        passes.row_update_(values, first, second, grad_out, weights, pair_order, offsets, rows, row_sq, code, lr, wd,
                           eps, betas[0], betas[1], step_scalars(clip, step, *betas, device=DEVICE))
        expected = reference_row_update(code, *expected, dense_grad[touched], touched, lr, wd, clip, eps, betas, step)
        torch.testing.assert_close(cpu64(values), expected[0], rtol=1e-5, atol=1e-5)
        if code != SGD:
            torch.testing.assert_close(cpu64(first), expected[1], rtol=1e-5, atol=1e-5)
    # The case leaves rows untouched, so the comparison above also proves they (and their state) did not move.
    untouched = torch.ones(40, dtype=torch.bool)
    untouched[indices.cpu().long().unique()] = False
    assert untouched.any()


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
@pytest.mark.parametrize("dim", [37, 300])
def test_a_row_selection_updates_only_the_selected_rows_and_leaves_the_others_bit_identical(kind, dim, passes):
    """With `selected`, the fused passes equal the optimizer on the gradient restricted to the selected rows (norm
    included), and every other row, touched or not, keeps its value and state bit for bit: no decay, no moment
    update, although weight decay and Adam's moments would move a row with a zero gradient."""
    code = OPTIMIZERS[kind]
    values, indices, weights, grad_out = random_case(11, 7, 9, 50, dim, hot_rows=30)
    generator = torch.Generator().manual_seed(3)
    first = torch.rand(50, generator=generator) if code == ADAGRAD else torch.rand(50, dim, generator=generator) \
        if code == ADAM else torch.zeros(0)
    second = torch.rand(50, dim, generator=generator) if code == ADAM else torch.zeros(0)
    first, second = first.to(DEVICE), second.to(DEVICE)
    expected = (cpu64(values), cpu64(first), cpu64(second))
    betas, eps, lr, wd = (0.9, 0.95), 1e-8, 0.05, 0.1
    for step in (1, 2):
        grad_out = grad_out.roll(1, dims=0) * 0.7
        before = (values.clone(), first.clone(), second.clone())
        dense_grad, _ = reference_grads(values, indices, weights, grad_out)
        pair_order, offsets, rows = kernels.row_segments(indices, values.shape[0])
        # A fresh random half of the touched rows each step, at least one in and one out.
        selected = torch.rand(rows.numel(), generator=generator) < 0.5
        selected[0], selected[-1] = True, False
        chosen = rows.cpu().long()[selected]
        row_sq = passes.row_grad_sq(grad_out, weights, pair_order, offsets, True, selected.to(DEVICE))
        torch.testing.assert_close(cpu64(row_sq), (dense_grad[rows.cpu().long()] ** 2).sum(1) * selected,
                                   rtol=1e-5, atol=1e-5)
        passes.row_update_(values, first, second, grad_out, weights, pair_order, offsets, rows, row_sq, code, lr, wd,
                           eps, betas[0], betas[1], step_scalars(1.0, step, *betas, device=DEVICE), None,
                           selected.to(DEVICE))
        expected = reference_row_update(code, *expected, dense_grad[chosen], chosen, lr, wd, 1.0, eps, betas, step)
        torch.testing.assert_close(cpu64(values), expected[0], rtol=1e-5, atol=1e-5)
        left_out = torch.ones(50, dtype=torch.bool)
        left_out[chosen] = False
        assert torch.equal(values.cpu()[left_out], before[0].cpu()[left_out])
        if code != SGD:
            torch.testing.assert_close(cpu64(first), expected[1], rtol=1e-5, atol=1e-5)
            assert torch.equal(first.cpu()[left_out], before[1].cpu()[left_out])
        if code == ADAM:
            assert torch.equal(second.cpu()[left_out], before[2].cpu()[left_out])
        # The selection really left out rows that the step touched.
        assert (~selected).any() and selected.any()


@pytest.mark.parametrize("chunk", [1, 3, 4, 64])
def test_heavy_rows_are_summed_in_chunks_to_their_whole_gradient(chunk):
    """Rows of more than `chunk` pairs (one row of 96, one of 4 and more, rows of exactly a multiple of the chunk, light rows among
    them) get their summed gradient from chunks; the others get slot -1."""
    generator = torch.Generator().manual_seed(chunk)
    tokens, slots, dim = 24, 5, 45
    indices = torch.randint(0, 30, (tokens, slots), generator=generator)
    indices[:, :4] = 7  # a hot row: 96 pairs
    indices[:4, 4] = 11  # 4 pairs (some chunks divide it)
    values, weights = torch.randn(40, dim, generator=generator), torch.randn(tokens, slots, generator=generator)
    grad_out = torch.randn(tokens, dim, generator=generator)
    indices, weights, grad_out = indices.to(DEVICE), weights.to(DEVICE), grad_out.to(DEVICE)
    dense_grad, _ = reference_grads(values, indices, weights, grad_out)
    pair_order, offsets, rows = kernels.row_segments(indices, 40)
    lengths = offsets.diff().cpu()
    row_slots, grads = heavy_row_grads(grad_out, weights, pair_order, offsets, chunk, 2, 32, 1)
    heavy = lengths > chunk
    assert heavy.any() and (~heavy).any()
    assert torch.equal(row_slots.cpu() >= 0, heavy)
    assert torch.equal(row_slots.cpu()[heavy], torch.arange(int(heavy.sum()), dtype=torch.int32))
    assert_close_in_scale(grads.cpu().double(), dense_grad[rows.cpu().long()[heavy]], SUM_BOUND, "heavy rows")
    assert heavy_row_grads(grad_out, weights, pair_order, offsets, int(lengths.max()), 2, 32, 1) == (None, None)


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
@pytest.mark.parametrize("norm", [float("nan"), float("inf")])
def test_a_step_the_device_skips_leaves_values_and_state_bit_identical(kind, norm, passes):
    """`scalars` with apply = 0, as the device sets it for a non-finite step, whose clip factor and row norms may be
    NaN or infinite: no value, moment or accumulator moves, not even by weight decay; the same scalars with apply = 1
    do move them."""
    code = OPTIMIZERS[kind]
    values, indices, weights, grad_out = random_case(21, 6, 7, 40, 45, hot_rows=12)
    generator = torch.Generator().manual_seed(5)
    first = torch.rand(40, generator=generator) if code == ADAGRAD else torch.rand(40, 45, generator=generator) \
        if code == ADAM else torch.zeros(0)
    second = torch.rand(40, 45, generator=generator) if code == ADAM else torch.zeros(0)
    state = [values, first.to(DEVICE), second.to(DEVICE)]
    before = [t.clone() for t in state]
    pair_order, offsets, rows = kernels.row_segments(indices, 40)
    row_sq = passes.row_grad_sq(grad_out * norm, weights, pair_order, offsets, True)
    skipped = step_scalars(torch.tensor(norm, device=DEVICE), torch.tensor(3, device=DEVICE), 0.9, 0.95,
                           torch.tensor(False, device=DEVICE))
    passes.row_update_(*state, grad_out * norm, weights, pair_order, offsets, rows, row_sq, code, 0.05, 0.1, 1e-8,
                       0.9, 0.95, skipped)
    for name, after, start in zip(("values", "first", "second"), state, before):
        assert torch.equal(after.cpu(), start.cpu()), name
    row_sq = passes.row_grad_sq(grad_out, weights, pair_order, offsets, True)
    passes.row_update_(*state, grad_out, weights, pair_order, offsets, rows, row_sq, code, 0.05, 0.1, 1e-8, 0.9, 0.95,
                       step_scalars(1.0, 3, 0.9, 0.95, device=DEVICE))
    assert not torch.equal(values.cpu(), before[0].cpu())


def test_step_scalars_on_the_device_equal_those_of_numbers():
    """The optimizer's scalars from 0-d tensors (its clip factor, applied-step count and decision) equal those a host
    caller makes from numbers, bit for bit; a skip before any applied step has finite bias corrections."""
    for clip, step, apply in ((1.0, 1, True), (0.37, 5, True), (0.5, 12345, False)):
        expected = step_scalars(clip, step, 0.9, 0.95, apply)
        got = step_scalars(torch.tensor(clip, dtype=torch.float64, device=DEVICE), torch.tensor(step, device=DEVICE),
                           0.9, 0.95, torch.tensor(apply, device=DEVICE))
        assert torch.equal(got.cpu(), expected), (clip, step, apply)
    first_skip = step_scalars(torch.tensor(1.0, device=DEVICE), torch.tensor(0, device=DEVICE), 0.9, 0.95,
                              torch.tensor(False, device=DEVICE))
    assert bool(first_skip.isfinite().all()) and bool((first_skip[2:] > 0).all())


def test_the_rounding_seed_computed_on_the_device_equals_the_64_bit_mix_of_the_host():
    """`rounding_seeds` wraps int64 products and sums and makes its shifts logical: the same seeds as the unsigned
    arithmetic of `rounding_seed`, for seeds and steps that overflow 64 bits in every term."""
    import random

    from titanmem.components.value_optimizer import rounding_seed, rounding_seeds

    rng = random.Random(0)
    steps = [0, 1, 2, 3, 100, 2**20, 2**31 - 1, 2**40, rng.getrandbits(62), 2**63 - 1]
    for seed in (0, 1, 7, 1234, 2**31 - 1, 2**40 + 3, rng.getrandbits(63), 2**64 + 5):
        got = rounding_seeds(seed, torch.tensor(steps, device=DEVICE)).cpu().tolist()
        assert got == [rounding_seed(seed, step) for step in steps], seed
        assert all(0 <= value < 2**31 for value in got)


def test_malformed_step_scalars_and_seeds_are_refused(passes):
    values, indices, weights, grad_out = random_case(1, 3, 4, 20, 8)
    pair_order, offsets, rows = kernels.row_segments(indices, 20)
    row_sq = passes.row_grad_sq(grad_out, weights, pair_order, offsets, True)
    empty = torch.zeros(0, device=DEVICE)
    good = step_scalars(1.0, 1, 0.9, 0.95, device=DEVICE)
    for scalars, seed, message in ((good.double(), None, "step_scalars' fp32"), (good[:3], None, "step_scalars' fp32"),
                                   (good, torch.tensor([1.5], device=DEVICE), "int64 tensor of one element")):
        with pytest.raises(ValueError, match=message):
            passes.row_update_(values, empty, empty, grad_out, weights, pair_order, offsets, rows, row_sq, SGD, 0.1,
                               0.0, 1e-8, 0.9, 0.95, scalars, seed)


@pytest.mark.parametrize("unread", [False, True])
def test_row_groups_with_one_read_of_the_device_equal_the_grouping_and_chunks_found_step_by_step(unread):
    """`row_groups` (every size read at once) against `row_segments` and `heavy_row_chunks` (each finding its own):
    the same pair order, offsets, rows, heavy rows and chunks, for batches with hot rows, rows exactly a multiple of
    the chunk, a single row, unread pairs, and none at all."""
    from titanmem.kernels.row_update import heavy_row_chunks, row_groups

    generator = torch.Generator().manual_seed(int(unread))
    cases = [torch.randint(0, 30, (24, 5), generator=generator), torch.full((7, 3), 4), torch.zeros(0, 4,
             dtype=torch.int64), torch.randint(0, 1000, (9, 11), generator=generator)]
    cases[0][:, :4] = 7  # 96 pairs of one row
    cases[0][:4, 4] = 11  # 4 pairs
    for indices in cases:
        if unread and indices.numel():
            indices = indices.masked_fill(torch.rand(indices.shape, generator=generator) < 0.4, -1)
        indices = indices.to(DEVICE)
        expected = kernels.row_segments(indices, 1000, unread=unread)
        for chunk in (1, 3, 4, 10**6):
            *got, chunks = row_groups(indices, 1000, unread=unread, heavy_pairs=chunk)
            for name, a, b in zip(("pair order", "offsets", "rows"), got, expected):
                assert torch.equal(a.cpu(), b.cpu()) and a.dtype == b.dtype, (name, chunk)
            reference = heavy_row_chunks(expected[1], chunk)
            for name in ("slots", "segments", "begins", "ends", "chunk_offsets"):
                assert torch.equal(getattr(chunks, name).cpu(), getattr(reference, name).cpu()), (name, chunk)
            lengths = expected[1].diff().cpu()
            assert torch.equal(chunks.segments.cpu(), (lengths > chunk).nonzero().squeeze(1))
            if chunks.begins.numel():  # the chunks tile each heavy row's pairs in order
                assert bool((chunks.ends - chunks.begins <= chunk).all())
        assert row_groups(indices, 1000, unread=unread)[3] is None


def test_a_row_selection_of_the_wrong_length_is_refused():
    values, indices, weights, grad_out = random_case(1, 3, 4, 20, 8)
    pair_order, offsets, rows = kernels.row_segments(indices, values.shape[0])
    with pytest.raises(ValueError, match="one flag per touched row"):
        row_grad_sq(grad_out, weights, pair_order, offsets, True, torch.ones(rows.numel() + 1, dtype=torch.bool))


def test_triton_lookup_in_the_memory_layer_matches_the_torch_lookup():
    import dataclasses

    from titanmem.build import build_model
    from titanmem.models.args import MemoryArgs, ModelArgs

    memory = MemoryArgs(layers=(0, 1), n_keys=6, k_dim=8, v_dim=24, heads=2, knn=3)
    args = ModelArgs(dim=16, n_layers=2, n_heads=2, ffn_hidden_dim=32, vocab_size=40, max_seq_len=16, memory=memory)
    tokens = torch.randint(0, 40, (2, 5), device=DEVICE)
    grads = {}
    for lookup in ("torch", "triton"):
        torch.manual_seed(0)
        model = build_model(dataclasses.replace(args, memory=dataclasses.replace(memory, lookup=lookup)), DEVICE)
        model(tokens).logsumexp(-1).sum().backward()
        grads[lookup] = {n: p.grad.clone() for n, p in model.named_parameters()}
    # The two lookups sum the bag in different orders; the difference then passes through the whole small model,
    # whose widest sums have some hundred terms.
    for name, grad in grads["torch"].items():
        assert_close_in_scale(grads["triton"][name], grad, SUM_BOUND, name)


def bf16_neighbours(exact: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two bf16 values around each fp32 value (equal when it is one): its bits cut to bf16 (towards zero), and
    that plus one bf16 step away from zero; as int32 bit patterns of the fp32 encoding."""
    bits = exact.float().cpu().view(torch.int32)
    cut = bits & ~0xFFFF
    return cut, torch.where(bits == cut, cut, cut + 0x10000)


def seed_tensor(seed: int) -> torch.Tensor | None:
    """A stochastic-rounding seed as the update takes it; None (round to nearest) for -1."""
    return torch.tensor([seed], device=DEVICE) if seed >= 0 else None


def fused_update(values, kind, step_seed, steps=3, lr=0.05, passes=row_update):
    """`steps` updates of `values` (in place) with fixed random reads, and the optimizer state."""
    code = OPTIMIZERS[kind]
    generator = torch.Generator().manual_seed(11)
    rows, dim = values.shape
    indices = torch.randint(0, 30, (6, 8), generator=generator).to(DEVICE)
    weights = torch.randn(6, 8, generator=generator).to(DEVICE)
    first = torch.zeros(rows) if code == ADAGRAD else torch.zeros(rows, dim) if code == ADAM else torch.zeros(0)
    second = torch.zeros(rows, dim) if code == ADAM else torch.zeros(0)
    first, second = first.to(DEVICE), second.to(DEVICE)
    for step in range(1, steps + 1):
        grad_out = torch.randn(6, dim, generator=generator).to(DEVICE)
        pair_order, offsets, touched = kernels.row_segments(indices, rows)
        row_sq = passes.row_grad_sq(grad_out, weights, pair_order, offsets, True)
        passes.row_update_(values, first, second, grad_out, weights, pair_order, offsets, touched, row_sq, code, lr,
                           0.1, 1e-8, 0.9, 0.95, step_scalars(1.0, step, 0.9, 0.95, device=DEVICE),
                           seed_tensor(step_seed(step)))
    return values


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_the_tensor_op_passes_round_a_bf16_table_to_nearest_and_leave_stochastic_rounding_to_triton(kind):
    start = random_case(3, 1, 1, 40, 37)[0].to(torch.bfloat16)
    exact = fused_update(start.float().clone(), kind, lambda step: -1, steps=1, passes=row_update_torch)
    nearest = fused_update(start.clone(), kind, lambda step: -1, steps=1, passes=row_update_torch)
    assert torch.equal(nearest.cpu(), exact.cpu().to(torch.bfloat16)) and not torch.equal(nearest, start)
    with pytest.raises(ValueError, match="stochastic rounding of a bf16 table needs the Triton update"):
        fused_update(start.clone(), kind, lambda step: 7, steps=1, passes=row_update_torch)
    # Which tables take these passes: off the GPU, unless a bf16 table is rounded stochastically.
    assert row_update_torch.uses_torch_update(torch.zeros(2, 2), stochastic_rounding=True)
    assert row_update_torch.uses_torch_update(torch.zeros(2, 2, dtype=torch.bfloat16), stochastic_rounding=False)
    assert not row_update_torch.uses_torch_update(torch.zeros(2, 2, dtype=torch.bfloat16), stochastic_rounding=True)


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
@pytest.mark.parametrize("dim", [37, 300])
def test_a_bf16_table_is_rounded_to_nearest_like_torch_or_to_one_of_its_two_neighbours(kind, dim):
    start = random_case(3, 1, 1, 40, dim)[0].to(torch.bfloat16)
    # Each update computed in fp32 from the bf16 row: one step of the fp32 kernel on the upcast table.
    exact = fused_update(start.float().clone(), kind, lambda step: -1, steps=1)
    nearest = fused_update(start.clone(), kind, lambda step: -1, steps=1)
    assert torch.equal(nearest.cpu(), exact.cpu().to(torch.bfloat16))  # torch rounds to nearest, ties to even
    stochastic = fused_update(start.clone(), kind, lambda step: 1234, steps=1)
    low, high = bf16_neighbours(exact)
    bits = stochastic.float().cpu().view(torch.int32)
    assert bool(((bits == low) | (bits == high)).all())
    moved = exact.cpu() != start.float().cpu()
    assert bool((bits[moved] == high[moved]).any()) and bool((bits[moved] == low[moved]).any())


def test_stochastic_rounding_is_unbiased_where_nearest_loses_small_updates():
    from titanmem.kernels.row_update import SGD as sgd

    rows, dim, steps = 16, 256, 20
    indices = torch.arange(rows).repeat(2).view(8, 4).to(DEVICE)
    weights, grad_out = torch.ones(8, 4).to(DEVICE), torch.ones(8, dim).to(DEVICE)
    pair_order, offsets, touched = kernels.row_segments(indices, rows)
    row_sq = row_grad_sq(grad_out, weights, pair_order, offsets, True)
    tables = {name: torch.ones(rows, dim, dtype=dtype, device=DEVICE)
              for name, dtype in (("fp32", torch.float32), ("nearest", torch.bfloat16), ("stochastic", torch.bfloat16))}
    empty = torch.zeros(0, device=DEVICE)
    for step in range(1, steps + 1):
        for name, table in tables.items():
            # Each step moves every value by 1e-4 (2 reads × lr 5e-5), under a tenth of bf16's step below 1.0.
            row_update_(table, empty, empty, grad_out, weights, pair_order, offsets, touched, row_sq, sgd, 5e-5,
                        0.0, 1e-8, 0.9, 0.95, step_scalars(1.0, step, 0.9, 0.95, device=DEVICE),
                        seed_tensor(99 + step if name == "stochastic" else -1))
    exact = tables["fp32"].double()
    assert torch.allclose(exact, torch.full_like(exact, 1 - steps * 1e-4), atol=1e-6)
    assert torch.equal(tables["nearest"].double(), torch.ones_like(exact))  # every update rounded away
    # Each rounding errs by at most one bf16 step (2^-8 here), with mean 0 and spread at most half a step; a value's
    # error sums `steps` of them. The mean over all values must lie within 5 of its standard deviations of 0, far
    # below nearest rounding's bias.
    bound = 5 * steps**0.5 * 2**-8 / 2 / (rows * dim) ** 0.5
    error = (tables["stochastic"].double() - exact).mean().item()
    assert abs(error) < bound < steps * 1e-4 / 2, (error, bound)


def test_stochastic_rounding_repeats_for_a_seed_and_differs_across_seeds():
    start = random_case(4, 1, 1, 40, 64)[0].to(torch.bfloat16)
    first = fused_update(start.clone(), "adagrad", lambda step: 1000 + step)
    again = fused_update(start.clone(), "adagrad", lambda step: 1000 + step)
    other = fused_update(start.clone(), "adagrad", lambda step: 2000 + step)
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_pairs_of_a_negative_index_read_nothing_in_every_kernel():
    """A rank that holds a block of the table's rows is passed the other rows' pairs as -1: they add nothing to the
    bag, get a weight gradient of 0, touch no row in the backward, and are left out of the row grouping."""
    values, indices, weights, grad_out = random_case(12, 9, 12, 40, 300, hot_rows=15)
    unread = torch.rand(indices.shape, generator=torch.Generator().manual_seed(0)) < 0.6
    unread[0] = True  # a token that reads nothing at all
    masked = indices.masked_fill(unread.to(DEVICE), -1)
    # The reference: the same bags with those pairs' weights at 0 (their rows read, but multiplied away).
    kept = weights.masked_fill(unread.to(DEVICE), 0.0)
    expected_values, expected_weights = reference_grads(values, indices, kept, grad_out)
    expected_weights[unread] = 0.0

    out = kernels.weighted_bag(values, masked, weights)
    assert_close_in_scale(out, reference_bag(values, indices, kept), SUM_BOUND)
    assert torch.equal(out[0].cpu(), torch.zeros(values.shape[1]))
    grad_weights, grad_values = kernels.weighted_bag_dense_backward(grad_out, values, masked, weights, True)
    assert_close_in_scale(grad_values, expected_values, SUM_BOUND, "dense value gradient")
    assert_close_in_scale(grad_weights, expected_weights, SUM_BOUND, "weight gradient")
    assert torch.equal(grad_weights.cpu()[unread], torch.zeros(int(unread.sum())))
    grad_weights, rows, row_grads = kernels.weighted_bag_sparse_backward(grad_out, values, masked, weights, True)
    read_rows = torch.unique(indices.cpu()[~unread]).long()
    assert torch.equal(rows.cpu().long(), read_rows)
    assert_close_in_scale(row_grads, expected_values[read_rows], SUM_BOUND, "sparse value gradient")
    token_ordered = kernels.weighted_bag_weight_grad(grad_out, values, masked)
    assert torch.equal(token_ordered.cpu()[unread], torch.zeros(int(unread.sum())))
    assert_close_in_scale(token_ordered, expected_weights, SUM_BOUND, "token-ordered weight gradient")

    pair_order, offsets, rows = kernels.row_segments(masked, values.shape[0], unread=True)
    assert torch.equal(rows.cpu().long(), read_rows)
    assert sorted(pair_order.cpu().tolist()) == sorted((~unread).flatten().nonzero().flatten().tolist())
    assert torch.equal(masked.flatten()[pair_order].cpu().long(),
                       torch.repeat_interleave(read_rows, (offsets[1:] - offsets[:-1]).cpu()))


def test_the_torch_lookup_reads_nothing_for_a_negative_index_and_sums_in_the_asked_dtype():
    from titanmem.models.lookup import torch_weighted_bag

    values, indices, weights, _ = random_case(13, 7, 10, 30, 48)
    values, indices, weights = values.cpu(), indices.cpu(), weights.cpu()
    unread = torch.rand(indices.shape, generator=torch.Generator().manual_seed(1)) < 0.5
    kept = weights.masked_fill(unread, 0.0)
    leaf = weights.clone().requires_grad_(True)
    out = torch_weighted_bag(values, indices.masked_fill(unread, -1), leaf)
    assert_close_in_scale(out, reference_bag(values, indices, kept), SUM_BOUND)
    out.sum().backward()
    assert torch.equal(leaf.grad[unread], torch.zeros(int(unread.sum())))
    # A bf16 table's bag in fp32: the fp32 sum of the bf16 rows times the bf16-rounded weights, not rounded to bf16.
    table = values.to(torch.bfloat16)
    wide = torch_weighted_bag(table, indices, weights, out_dtype=torch.float32)
    assert wide.dtype == torch.float32
    assert_close_in_scale(wide, reference_bag(table.float(), indices, weights.to(torch.bfloat16).float()), SUM_BOUND)
    assert torch.equal(torch_weighted_bag(table, indices, weights), wide.to(torch.bfloat16))


def test_stochastic_rounding_draws_by_the_place_in_the_whole_table():
    """A block of the table (rows from 16, columns from 24), updated with its place given, draws the same bits as
    the whole table updated from the same reads: the layouts of a table round alike."""
    whole = random_case(14, 1, 1, 40, 64)[0].to(torch.bfloat16)
    generator = torch.Generator().manual_seed(3)
    indices = torch.randint(16, 40, (6, 8), generator=generator).to(DEVICE)
    weights = torch.randn(6, 8, generator=generator).to(DEVICE)
    grad_out = torch.randn(6, 64, generator=generator).to(DEVICE)
    empty = torch.zeros(0, device=DEVICE)

    def update(table, indices, grad_out, row_base=0, col_base=0):
        pair_order, offsets, touched = kernels.row_segments(indices, table.shape[0])
        row_sq = row_grad_sq(grad_out, weights, pair_order, offsets, True)
        row_update_(table, empty, empty, grad_out, weights, pair_order, offsets, touched, row_sq, SGD, 0.01, 0.0, 1e-8,
                    0.9, 0.95, step_scalars(1.0, 1, 0.9, 0.95, device=DEVICE), seed_tensor(1234), None, row_base,
                    col_base)

    update(whole, indices, grad_out)
    block = random_case(14, 1, 1, 40, 64)[0].to(torch.bfloat16)[16:, 24:].clone()
    # Its columns' part of the gradient; SGD's update of an element needs only its own column.
    update(block, indices - 16, grad_out[:, 24:].contiguous(), row_base=16, col_base=24)
    assert torch.equal(block, whole[16:, 24:])
    shifted = random_case(14, 1, 1, 40, 64)[0].to(torch.bfloat16)[16:, 24:].clone()
    update(shifted, indices - 16, grad_out[:, 24:].contiguous())  # its place not given: other bits
    assert not torch.equal(shifted, whole[16:, 24:])
