"""The product-key search, torch and fused Triton, against a float64 search over all n_keys² full keys.

On CPU the Triton kernels run under TRITON_INTERPRET=1 (see conftest). "Exact" allows ties: a result is a correct
top-k when its keys are distinct and each one's true score is at least the true k-th best score.
"""

import dataclasses

import pytest
import torch

from helpers import FP32_UNIT, assert_close_in_scale, check_command_line
from titanmem.build import build_model
from titanmem.config import ConfigError
from titanmem.kernels.key_search import MAX_KEYS, MAX_KNN, key_search
from titanmem.models.args import MemoryArgs, ModelArgs
from titanmem.models.key_search import (MAX_TRITON_KEYS, MAX_TRITON_KNN, get_key_search, merge_candidates,
                                        product_key_topk)
from titanmem.models.memory import MemoryValues, ProductKeyMemory
from titanmem.models.init import init_weights

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SEARCHES = ["torch", "select", "triton"]


def all_scores(query, subkeys):
    """[T, heads, n_keys²]: the score of full key (K1[r], K2[c]) at r · n_keys + c, by concatenation, in float64
    on CPU (differentiable when the inputs already are float64 CPU leaves)."""
    heads, _, n_keys, half = subkeys.shape
    query, subkeys = query.cpu().double(), subkeys.cpu().double()
    full = torch.cat(
        [subkeys[:, 0, :, None, :].expand(-1, -1, n_keys, -1), subkeys[:, 1, None, :, :].expand(-1, n_keys, -1, -1)],
        dim=-1,
    ).reshape(heads, n_keys * n_keys, 2 * half)
    return torch.einsum("thd,hnd->thn", query, full)


def assert_exact_topk(indices, weights, query, subkeys, knn, atol):
    """Distinct keys, each at least as good as the true k-th (within atol), and softmax weights of their true
    scores in the order given."""
    assert indices.shape == weights.shape == (*query.shape[:2], knn)
    assert indices.dtype == torch.int64 and weights.dtype == torch.float32
    scores = all_scores(query.detach(), subkeys.detach())
    indices, weights = indices.cpu(), weights.cpu().double()
    assert bool((indices.sort(-1).values.diff(dim=-1) > 0).all()), "a key was chosen twice"
    kth = scores.topk(knn, dim=-1).values[..., -1:]
    chosen = scores.gather(-1, indices)
    assert bool((chosen >= kth - atol).all()), f"missed a top-{knn} key by {(kth - chosen).max().item():.3g}"
    assert bool((chosen.diff(dim=-1) <= atol).all()), "not best first"
    torch.testing.assert_close(weights, torch.softmax(chosen, dim=-1), rtol=0, atol=50 * atol)


def random_inputs(seed, tokens, heads, n_keys, k_dim, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(tokens, heads, k_dim, generator=generator).to(dtype)
    subkeys = torch.randn(heads, 2, n_keys, k_dim // 2, generator=generator).to(dtype)
    return query.to(DEVICE), subkeys.to(DEVICE)


CASES = [
    # (tokens, heads, n_keys, k_dim, knn)
    (7, 1, 5, 2, 1),  # knn 1, half width 1
    (13, 4, 16, 8, 5),  # knn not a power of two
    (5, 3, 11, 6, 11),  # knn = n_keys, n_keys odd
    (31, 2, 64, 32, 32),  # the paper's knn
    (9, 2, 100, 24, 20),  # n_keys over one block of sub-keys (64 interpreted), not a multiple of it
    (1, 1, 130, 34, 3),  # one token, three blocks, half width 17
]


@pytest.mark.parametrize("knn", [1, 2, 5, 32, 64])
def test_the_merge_candidates_hold_the_best_sums_of_two_descending_lists(knn):
    """Integer scores with many ties: the knn best of the candidate pairs' sums are the knn best of all knn² sums."""
    pairs = merge_candidates(knn, torch.device("cpu"))
    assert len(pairs) == sum(knn // (i + 1) for i in range(knn))  # 119 at knn = 32
    generator = torch.Generator().manual_seed(knn)
    for _ in range(20):
        first, second = (torch.randint(0, 6, (knn,), generator=generator).sort(descending=True).values for _ in "ab")
        sums = (first[:, None] + second[None, :]).flatten()
        assert torch.equal(sums[pairs].topk(knn).values, sums.topk(knn).values)


@pytest.mark.parametrize("search", SEARCHES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}h{}n{}k{}knn{}".format(*c))
def test_search_finds_the_exact_topk_of_all_full_keys(search, case):
    tokens, heads, n_keys, k_dim, knn = case
    query, subkeys = random_inputs(sum(case), tokens, heads, n_keys, k_dim)
    weights, indices = get_key_search(search)(query, subkeys, knn)
    assert_exact_topk(indices, weights, query, subkeys, knn, atol=1e-5)


def test_fused_search_on_bf16_inputs_is_exact_for_those_inputs():
    """Products of bf16 numbers are exact in fp32, so the fused search's fp32 scores rank like float64 ones."""
    query, subkeys = random_inputs(3, 40, 4, 64, 48, torch.bfloat16)
    weights, indices = key_search(query, subkeys, 32)
    assert_exact_topk(indices, weights, query, subkeys, 32, atol=1e-4)


def test_ties_give_a_correct_topk_and_the_same_result_every_time():
    """Repeated sub-keys make many equal scores: any of the tied keys is right, but the choice is deterministic."""
    query, subkeys = random_inputs(4, 12, 2, 24, 8)
    subkeys[:, :, 8:16] = subkeys[:, :, :8]
    subkeys[:, 1, 16:] = subkeys[:, 1, :8]
    first = key_search(query, subkeys, 16)
    assert_exact_topk(first[1], first[0], query, subkeys, 16, atol=1e-5)
    second = key_search(query.clone(), subkeys.clone(), 16)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_equal_scores_everywhere_take_the_lowest_rows():
    """Every score equal: no pruning bound holds back any key, so the exact selection runs, and ties go to the
    lowest rows. The inputs are small integers, so that every score is exact whatever order a matmul sums in (another
    BLAS, another blocking of its tiles): equal keys then really score equal."""
    generator = torch.Generator().manual_seed(5)
    query = torch.randint(-3, 4, (6, 2, 8), generator=generator).float()
    key = torch.randint(-3, 4, (2, 1, 4), generator=generator).float()
    subkeys = key.expand(2, 2, 200, 4).contiguous()  # every head, every sub-key of a half: the same key
    query, subkeys = query.to(DEVICE), subkeys.to(DEVICE)
    weights, indices = key_search(query, subkeys, 5)
    assert torch.equal(indices.cpu(), torch.arange(5).expand(6, 2, 5))
    torch.testing.assert_close(weights.cpu(), torch.full((6, 2, 5), 0.2))


def reference_gradients(query, subkeys, indices, grad_weights):
    """Gradients of Σ grad_weights · softmax(scores of the chosen keys) in float64, through all n_keys² scores."""
    query64 = query.detach().cpu().double().requires_grad_(True)
    subkeys64 = subkeys.detach().cpu().double().requires_grad_(True)
    chosen = all_scores(query64, subkeys64).gather(-1, indices.cpu())
    (torch.softmax(chosen, dim=-1) * grad_weights.cpu().double()).sum().backward()
    return query64.grad, subkeys64.grad


@pytest.mark.parametrize("search", SEARCHES)
@pytest.mark.parametrize("case", [(13, 4, 16, 8, 5), (20, 3, 4, 6, 4), (9, 2, 100, 24, 32)],
                         ids=lambda c: "T{}h{}n{}k{}knn{}".format(*c))
def test_gradients_of_query_and_subkeys_match_float64(search, case):
    """(20, 3, 4, 6, 4) takes 4 of a 4 × 4 table: sub-keys are often chosen by several pairs."""
    tokens, heads, n_keys, k_dim, knn = case
    query, subkeys = random_inputs(sum(case), tokens, heads, n_keys, k_dim)
    query.requires_grad_(True)
    subkeys.requires_grad_(True)
    grad_weights = torch.randn(tokens, heads, knn, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    weights, indices = get_key_search(search)(query, subkeys, knn)
    (weights * grad_weights).sum().backward()
    expected_query, expected_subkeys = reference_gradients(query, subkeys, indices, grad_weights)
    # fp32 scores (sums of k_dim ≤ 32 products) feed the softmax, and a gradient element sums up to tokens × knn ≤ 300
    # of its terms: at most a few hundred roundings of about the largest element's size (seen: up to 15).
    bound = 500 * FP32_UNIT
    assert_close_in_scale(query.grad, expected_query, bound, "query")
    assert_close_in_scale(subkeys.grad, expected_subkeys, bound, "subkeys")


def test_fused_backward_is_bitwise_repeatable():
    query, subkeys = random_inputs(6, 24, 2, 40, 16)
    grads = []
    for _ in range(2):
        q, k = query.clone().requires_grad_(True), subkeys.clone().requires_grad_(True)
        weights, _ = key_search(q, k, 12)
        (weights * torch.arange(12.0, device=DEVICE)).sum().backward()
        grads.append((q.grad, k.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_no_tokens():
    query, subkeys = random_inputs(0, 0, 2, 8, 4)
    weights, indices = key_search(query, subkeys, 3)
    assert weights.shape == indices.shape == (0, 2, 3)


@pytest.mark.parametrize("query_shape, subkey_shape, knn, dtype, words", [
    ((4, 2, 8), (2, 2, 8, 4), 9, torch.float32, "knn"),
    ((4, 2, 8), (2, 2, 8, 3), 2, torch.float32, "does not match"),
    ((4, 2, 8), (2, 2, 8, 4), 2, torch.float64, "dtype"),
    ((4, 8), (2, 2, 8, 4), 2, torch.float32, "expected"),
])
def test_bad_shapes_and_dtypes_are_refused(query_shape, subkey_shape, knn, dtype, words):
    query, subkeys = torch.zeros(query_shape, dtype=dtype), torch.zeros(subkey_shape, dtype=dtype)
    with pytest.raises(ValueError, match=words):
        key_search(query, subkeys, knn)


@pytest.mark.parametrize("argv", [["--memory.n_keys", str(MAX_KEYS + 1)], ["--memory.knn", str(MAX_KNN + 1), "--memory.n_keys", "128"]])
def test_the_fused_search_limits_are_config_errors(argv):
    assert (MAX_KEYS, MAX_KNN) == (MAX_TRITON_KEYS, MAX_TRITON_KNN)
    with pytest.raises(ConfigError) as info:
        check_command_line(["--memory.enabled", "--memory.key_search", "triton", "--memory.k_dim", "4",
                            "--memory.v_dim", "4", *argv])
    assert info.value.field == "memory.key_search"
    with pytest.raises(ValueError, match="knn"):
        key_search(torch.zeros(2, 1, 4), torch.zeros(1, 2, 100, 2), MAX_KNN + 1)


def test_a_nan_token_reads_valid_rows_and_leaves_the_others_alone():
    """A NaN query (a diverging run, to be skipped by training.on_nonfinite_loss) still picks distinct, valid value
    rows; the other tokens' results do not change."""
    query, subkeys = random_inputs(8, 5, 2, 40, 8)
    clean = key_search(query, subkeys, 6)
    query[2] = float("nan")
    weights, indices = key_search(query, subkeys, 6)
    assert bool(((indices >= 0) & (indices < 40 * 40)).all())
    assert bool((indices.sort(-1).values.diff(dim=-1) > 0).all())
    keep = torch.tensor([0, 1, 3, 4])
    assert torch.equal(indices[keep], clean[1][keep]) and torch.equal(weights[keep], clean[0][keep])


def test_compile_traces_the_fused_search_and_its_backward_in_one_graph():
    query, subkeys = random_inputs(7, 10, 2, 20, 8)

    def loss(query, subkeys):
        weights, indices = key_search(query, subkeys, 6)
        return (weights * (indices % 7)).sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    q1, k1 = query.clone().requires_grad_(True), subkeys.clone().requires_grad_(True)
    compiled(q1, k1).backward()
    q2, k2 = query.clone().requires_grad_(True), subkeys.clone().requires_grad_(True)
    loss(q2, k2).backward()
    assert torch.equal(q1.grad, q2.grad) and torch.equal(k1.grad, k2.grad)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_memory_layers_with_either_search_agree(qk_norm):
    """The same layer (same weights) searched both ways: the same reads, outputs and gradients."""
    memory = MemoryArgs(layers=(0,), n_keys=12, k_dim=10, v_dim=16, heads=3, knn=7, qk_norm=qk_norm)
    values = MemoryValues(memory.n_values, memory.v_dim).to(DEVICE)
    init_weights(values, seed=0)
    results = {}
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    for search in SEARCHES:
        layer = ProductKeyMemory(16, dataclasses.replace(memory, key_search=search), values).to(DEVICE)
        init_weights(layer, seed=1)
        layer.zero_grad()
        values.zero_grad()
        weights, indices = layer.search(x.reshape(-1, 16))
        out = layer(x)
        out.square().sum().backward()
        results[search] = (weights, indices, out, {n: p.grad for n, p in layer.named_parameters()},
                           values.weight.grad.clone())
        if search == "torch":  # the product-key top-k itself, against all full keys of the normalised query
            query = layer.query(x.reshape(-1, 16)).unflatten(-1, (3, 10))
            subkeys = layer.subkeys
            if qk_norm:
                query = torch.nn.functional.rms_norm(query.unflatten(-1, (2, 5)), (5,)).flatten(-2)
                subkeys = torch.nn.functional.rms_norm(subkeys, (5,))
            scores, rows = product_key_topk(query, subkeys, 7)
            assert_exact_topk(rows, torch.softmax(scores, -1).float(), query, subkeys, 7, atol=1e-5)
            assert torch.equal(rows, indices)
    (w1, i1, o1, g1, v1), (w2, i2, o2, g2, v2) = results["torch"], results["triton"]
    assert torch.equal(i1, i2)
    # Both searches score in fp32, summing in different orders (the fused one through tl.dot): the weights and what
    # follows from them differ by roundings. A gradient element sums the 10 tokens' reads (3 heads × 7 each) through
    # the softmax: a few hundred roundings at most, of about the largest element's size (seen: up to 11).
    bound = 500 * FP32_UNIT
    for name, ours, theirs in (("weights", w2, w1), ("output", o2, o1), ("values' gradient", v2, v1),
                               *((f"{n}'s gradient", g2[n], g) for n, g in g1.items())):
        assert_close_in_scale(ours, theirs, bound, name)


def test_models_train_the_same_with_either_search():
    """Two steps of a small Memory+ model, built from the same seed, with each search: the same losses."""
    memory = MemoryArgs(layers=(0, 1), n_keys=8, k_dim=8, v_dim=16, heads=2, knn=4)
    args = ModelArgs(dim=16, n_layers=2, n_heads=2, ffn_hidden_dim=32, vocab_size=40, max_seq_len=16, memory=memory)
    tokens = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    losses = {}
    for search in SEARCHES:
        torch.manual_seed(0)
        model = build_model(dataclasses.replace(args, memory=dataclasses.replace(memory, key_search=search)), DEVICE)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        losses[search] = []
        for _ in range(2):
            logits = model(tokens[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses[search].append(loss.item())
    torch.testing.assert_close(losses["triton"], losses["torch"], rtol=1e-5, atol=0)
