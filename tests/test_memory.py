import dataclasses
import math

import pytest
import torch
import torch.distributed.checkpoint as dcp

from helpers import check_command_line
from titanmem.config import ConfigError
from titanmem.build import build_model
from titanmem.models import FLAVORS, ModelArgs
from titanmem.models.accounting import count_parameters, flops_per_token
from titanmem.models.args import MemoryArgs
from titanmem.models.flavors import MEMORY_PLACEMENT
from titanmem.models.llama import Transformer
from titanmem.models.init import init_weights
from titanmem.models.memory import MemoryValues, ProductKeyMemory

CPU = torch.device("cpu")


def tiny_memory_args(**changes) -> MemoryArgs:
    base = MemoryArgs(layers=(0,), n_keys=5, k_dim=4, v_dim=6, heads=2, knn=3)
    return dataclasses.replace(base, **changes)


def test_gradcheck_in_float64_through_query_subkeys_values_w1_w2():
    torch.manual_seed(0)
    dim = 6
    values = MemoryValues(25, 6).double()
    layer = ProductKeyMemory(dim, tiny_memory_args(), values).double()
    init_weights(values, seed=0)
    init_weights(layer, seed=0)
    # Non-zero biases so their gradients are exercised too.
    for linear in (layer.query, layer.w1, layer.w2):
        torch.nn.init.normal_(linear.bias, std=0.1)
    x = torch.randn(2, 3, dim, dtype=torch.float64)
    params = [layer.query.weight, layer.query.bias, layer.subkeys, values.weight, layer.w1.weight, layer.w2.weight]

    # functional_call swaps in the checked tensors; the table is not the layer's own parameter, so it is swapped on
    # its owner.
    names_by_id = {id(p): n for n, p in layer.named_parameters()}

    def functional(qw, qb, sk, v, w1, w2):
        mapping = {names_by_id[id(layer.query.weight)]: qw, names_by_id[id(layer.query.bias)]: qb,
                   names_by_id[id(layer.subkeys)]: sk, names_by_id[id(layer.w1.weight)]: w1,
                   names_by_id[id(layer.w2.weight)]: w2}
        original_values = values.weight
        values._parameters["weight"] = v
        try:
            return torch.func.functional_call(layer, mapping, (x,))
        finally:
            values._parameters["weight"] = original_values

    inputs = tuple(p.detach().clone().requires_grad_(True) for p in params)
    assert torch.autograd.gradcheck(functional, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def memory_model_args(**memory_changes) -> ModelArgs:
    memory = MemoryArgs(layers=(0, 2), n_keys=8, k_dim=8, v_dim=16, heads=2, knn=4)
    return ModelArgs(
        dim=16, n_layers=3, n_heads=2, ffn_hidden_dim=32, vocab_size=50, max_seq_len=32,
        memory=dataclasses.replace(memory, **memory_changes),
    )


def test_shared_table_is_one_tensor_and_its_gradient_sums_every_layers_contribution():
    torch.manual_seed(3)
    model = build_model(memory_model_args(), CPU).double()
    memory_layers = [b.feed_forward for b in model.layers.values() if isinstance(b.feed_forward, ProductKeyMemory)]
    assert len(memory_layers) == 2
    assert all(layer.values is model.memory_values for layer in memory_layers)
    names = [n for n, _ in model.named_parameters() if "values" in n]
    assert names == ["memory_values.weight"]
    assert "memory_values.weight" in model.state_dict() and sum("values" in k for k in model.state_dict()) == 1

    # Record each layer's bag inputs and the gradient of its output, then rebuild each contribution by hand.
    records = []
    for layer in memory_layers:
        original = layer.lookup

        def recording_lookup(values, indices, weights, original=original):
            out = original(values, indices, weights)
            out.retain_grad()
            records.append((indices, weights.detach(), out))
            return out

        layer.lookup = recording_lookup
    tokens = torch.randint(0, 50, (2, 9))
    model(tokens).logsumexp(-1).sum().backward()
    assert len(records) == 2
    expected = torch.zeros_like(model.memory_values.weight)
    contributions = []
    for indices, weights, out in records:
        contribution = torch.zeros_like(expected)
        rows = (weights.unsqueeze(-1) * out.grad.unsqueeze(1)).reshape(-1, expected.shape[1])
        contribution.index_add_(0, indices.reshape(-1), rows)
        contributions.append(contribution)
        expected += contribution
    assert all(c.abs().sum() > 0 for c in contributions)
    torch.testing.assert_close(model.memory_values.weight.grad, expected, rtol=1e-10, atol=1e-12)


def test_two_models_in_one_process_share_nothing():
    torch.manual_seed(0)
    first = build_model(memory_model_args(), CPU)
    second = build_model(memory_model_args(), CPU)
    assert first.memory_values.weight.data_ptr() != second.memory_values.weight.data_ptr()
    assert first.layers["0"].feed_forward.values is first.memory_values
    assert second.layers["2"].feed_forward.values is second.memory_values
    tokens = torch.randint(0, 50, (1, 7))
    before = second(tokens)
    with torch.no_grad():
        first.memory_values.weight.add_(1.0)
    torch.testing.assert_close(second(tokens), before, rtol=0, atol=0)


def test_value_table_name_is_stable_across_dcp_save_and_load(tmp_path):
    model = build_model(memory_model_args(), CPU, seed=1)
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(tmp_path))
    saved_keys = dcp.FileSystemReader(str(tmp_path)).read_metadata().state_dict_metadata.keys()
    assert "model.memory_values.weight" in saved_keys
    fresh = build_model(memory_model_args(), CPU, seed=2)
    assert not torch.equal(fresh.memory_values.weight, model.memory_values.weight)
    state = fresh.state_dict()
    dcp.load({"model": state}, checkpoint_id=str(tmp_path))
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.memory_values.weight, model.memory_values.weight, rtol=0, atol=0)
    # The layers read the loaded table, not a stale copy.
    assert fresh.layers["0"].feed_forward.values.weight is fresh.memory_values.weight


def test_init_recipe_and_zero_biases():
    torch.manual_seed(0)
    args = memory_model_args(n_keys=64, k_dim=32, v_dim=64)
    model = build_model(dataclasses.replace(args, dim=64, n_heads=4), CPU)
    layer = model.layers["0"].feed_forward
    bound = 1 / math.sqrt(32)
    assert layer.subkeys.abs().max() <= bound and layer.subkeys.abs().max() > 0.9 * bound
    assert model.memory_values.weight.std().item() == pytest.approx(64**-0.5, rel=0.05)
    assert layer.w1.weight.std().item() == pytest.approx(64**-0.5, rel=0.1)
    for linear in (layer.query, layer.w1, layer.w2):
        assert torch.count_nonzero(linear.bias) == 0


@pytest.mark.parametrize("gated, swilu, v_dim", [(True, True, 16), (False, False, 12), (False, False, 16)])
def test_variants_shapes_and_causality(gated, swilu, v_dim):
    torch.manual_seed(4)
    model = build_model(memory_model_args(gated=gated, swilu=swilu, v_dim=v_dim), CPU).double()
    layer = model.layers["0"].feed_forward
    assert (layer.gate is not None) == gated and (layer.w1 is not None) == swilu
    assert (layer.w2 is None) == (not swilu and v_dim == 16)
    tokens = torch.randint(0, 50, (2, 11))
    changed = tokens.clone()
    changed[:, 6] = (changed[:, 6] + 1) % 50
    a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=1e-12)
    assert (a[:, 6:] - b[:, 6:]).abs().max() > 1e-8


# Totals the paper reports (Llama-2 32k vocabulary; Berges et al. 2025).
@pytest.mark.parametrize(
    "flavor, n_keys, vocab, expected_total",
    [("134m", 1024, 32000, 937e6), ("1.3b", 1024, 32000, 3.377e9), ("1.3b", 8192, 32000, 138.7e9)],
)
def test_parameter_counts_match_the_paper_within_one_percent(flavor, n_keys, vocab, expected_total):
    counts = meta_counts(flavor, n_keys, vocab)
    assert counts["total"] == pytest.approx(expected_total, rel=0.01)


@pytest.mark.parametrize(
    "flavor, n_keys, expected_values",
    [("373m", 1024, 1.07e9), ("8b", 4096, 68.7e9), ("8b", 5792, 137.4e9)],
)
def test_memory_value_counts_of_the_other_flavors(flavor, n_keys, expected_values):
    counts = meta_counts(flavor, n_keys, 32000 if flavor != "8b" else 128256)
    assert counts["memory_values"] == pytest.approx(expected_values, rel=0.01)


def meta_counts(flavor, n_keys, vocab):
    dim = FLAVORS[flavor].dim
    memory = MemoryArgs(layers=MEMORY_PLACEMENT[flavor].layers, n_keys=n_keys, k_dim=dim // 2, v_dim=dim)
    with torch.device("meta"):
        model = Transformer(dataclasses.replace(FLAVORS[flavor], vocab_size=vocab, memory=memory))
    return count_parameters(model)


def test_flops_exclude_the_table_and_add_the_lookup_cost():
    args = memory_model_args()
    with torch.device("meta"):
        model = Transformer(args)
    counts = count_parameters(model)
    dense_twin = dataclasses.replace(args, memory=None)
    with torch.device("meta"):
        twin_counts = count_parameters(Transformer(dense_twin))
    assert counts["memory_values"] == 64 * 16
    memory = args.memory
    lookup = 2 * (6 * memory.heads * memory.knn * memory.v_dim + memory.heads * memory.knn**2)
    expected = 6 * (counts["dense"] + counts["memory"]) + 12 * 3 * 2 * 8 * 20 + lookup
    assert flops_per_token(args, counts, 20) == expected
    # Swapping FFNs for memory layers changes FLOPs by the FFN/memory weights and the lookup, not by table size.
    bigger = dataclasses.replace(args, memory=dataclasses.replace(memory, n_keys=16))
    with torch.device("meta"):
        bigger_counts = count_parameters(Transformer(bigger))
    growth = flops_per_token(bigger, bigger_counts, 20) - flops_per_token(args, counts, 20)
    assert growth == 6 * (bigger_counts["memory"] - counts["memory"])  # only the sub-keys grow
    assert twin_counts["memory_values"] == 0


@pytest.mark.parametrize(
    "argv, field, words",
    [
        (["--memory.layers", "[1, 6]"], "memory.layers", "[0, 6)"),
        (["--memory.layers", "1,1"], "memory.layers", "twice"),
        (["--memory.k_dim", "7"], "memory.k_dim", "even"),
        (["--memory.knn", "65"], "memory.knn", "at most n_keys (64)"),
        (["--memory.n_keys", "1"], "memory.n_keys", ">= 2"),
        (["--memory.value_lr", "0"], "memory.value_lr", "> 0"),
        (["--memory.heads", "0"], "memory.heads", ">= 1"),
    ],
)
def test_memory_config_errors_name_the_field(argv, field, words):
    with pytest.raises(ConfigError) as info:
        check_command_line(["--memory.enabled", *argv])
    assert info.value.field == field
    assert words in str(info.value)


def test_triton_choices_are_config_errors_where_triton_is_missing(monkeypatch):
    import titanmem.plan

    monkeypatch.setattr(titanmem.plan, "available_lookups", lambda: ["torch"])
    monkeypatch.setattr(titanmem.plan, "available_key_searches", lambda: ["torch"])
    for argv, field in ((["--memory.lookup", "triton"], "memory.lookup"),
                        (["--memory.key_search", "triton"], "memory.key_search"),
                        (["--memory.value_optimizer", "adagrad"], "memory.value_optimizer")):
        with pytest.raises(ConfigError) as info:
            check_command_line(["--memory.enabled", *argv])
        assert info.value.field == field and "not" in str(info.value)
