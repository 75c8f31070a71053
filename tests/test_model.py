import dataclasses
import math

import pytest
import torch

from titanmem.build import build_model
from titanmem.models import FLAVORS, ModelArgs
from titanmem.models.accounting import count_parameters, flops_per_token
from titanmem.models.llama import apply_rope, rope_cache, rope_rotations

CPU = torch.device("cpu")


def tiny_args(**changes) -> ModelArgs:
    base = ModelArgs(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, ffn_hidden_dim=80, vocab_size=97, max_seq_len=64)
    return dataclasses.replace(base, **changes)


def test_logits_shape_and_finite():
    torch.manual_seed(0)
    model = build_model(tiny_args(), CPU)
    tokens = torch.randint(0, 97, (3, 17))
    logits = model(tokens)
    assert logits.shape == (3, 17, 97)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_causal_changing_token_t_leaves_earlier_logits_unchanged(n_kv_heads):
    torch.manual_seed(1)
    model = build_model(tiny_args(n_kv_heads=n_kv_heads), CPU).double()
    tokens = torch.randint(0, 97, (2, 23))
    for t in (0, 9, 22):
        changed = tokens.clone()
        changed[:, t] = (changed[:, t] + 1 + torch.randint(0, 95, (2,))) % 97
        before, after = model(tokens), model(changed)
        torch.testing.assert_close(after[:, :t], before[:, :t], rtol=0, atol=1e-12)
        # The change must be visible from t on, or the test could pass on a model that ignores its input.
        assert (after[:, t:] - before[:, t:]).abs().max() > 1e-6


def test_meta_build_is_deterministic_under_a_seed_and_differs_across_seeds():
    def weights(seed):
        return build_model(tiny_args(), CPU, seed=seed).state_dict()

    a, b, c = weights(5), weights(5), weights(6)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    assert any(not torch.equal(a[n], c[n]) for n in a)


def test_init_statistics_follow_the_recipe():
    torch.manual_seed(0)
    args = tiny_args(dim=256, n_heads=8, n_kv_heads=None, ffn_hidden_dim=512, vocab_size=1000, n_layers=4)
    model = build_model(args, CPU)
    assert model.tok_embeddings.weight.std().item() == pytest.approx(1.0, rel=0.05)
    assert model.layers["0"].attention.wq.weight.std().item() == pytest.approx(0.02, rel=0.1)
    # Depth-scaled output projections: 0.02 / sqrt(2 (layer + 1)).
    assert model.layers["3"].attention.wo.weight.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.1)
    final = model.output.weight
    assert final.abs().max().item() <= 3 * 256**-0.5 + 1e-6
    assert all(torch.equal(block.ffn_norm.weight, torch.ones(256)) for block in model.layers.values())


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_rope_matches_complex_rotation_in_float64(compiled):
    """Eager mode multiplies complex numbers, compiled code does the real arithmetic: both against float64."""
    torch.manual_seed(2)
    head_dim, seq_len = 10, 13
    x = torch.randn(2, seq_len, 3, head_dim, dtype=torch.float64)
    cache = rope_cache(head_dim, seq_len + 4, theta=10000.0).double()
    rope = torch.compile(apply_rope, backend="aot_eager", fullgraph=True) if compiled else apply_rope
    ours = rope(x, rope_rotations(cache, seq_len))
    freqs = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), freqs)
    rotation = torch.polar(torch.ones_like(angles), angles)[None, :, None, :]
    reference = torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * rotation).flatten(-2)
    # apply_rope computes in fp32 (as on GPU), so compare at fp32 precision; a strided input rotates the same.
    strided = torch.cat([x.float(), torch.zeros(*x.shape[:-1], 1)], dim=-1)[..., :head_dim]  # odd strides
    torch.testing.assert_close(apply_rope(strided, rope_rotations(cache, seq_len)), ours.float())
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_feed_forward_slot_is_swappable():
    class Doubler(torch.nn.Module):
        def forward(self, x):
            return 2 * x

        def param_inits(self, out_std):
            return {}

    from titanmem.models.init import init_weights
    from titanmem.models.llama import Transformer

    class Variant(Transformer):
        def build_feed_forward(self, layer_id):
            return Doubler() if layer_id == 1 else super().build_feed_forward(layer_id)

    torch.manual_seed(0)
    with torch.device("meta"):
        model = Variant(tiny_args())
    model.to_empty(device=CPU)
    init_weights(model, seed=0)
    assert isinstance(model.layers["1"].feed_forward, Doubler)
    assert model(torch.randint(0, 97, (1, 5))).shape == (1, 5, 97)


def test_flavors_validate_and_parameter_counts_are_exact():
    for args in FLAVORS.values():
        dataclasses.replace(args, vocab_size=32000).validate()
    args = tiny_args()
    with torch.device("meta"):
        from titanmem.models.llama import Transformer

        model = Transformer(args)
    counts = count_parameters(model)
    d, h, kv, hd, f, v, layers = 48, 6, 2, 8, 80, 97, 2
    per_block = d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * f + 2 * d
    assert counts["embedding"] == v * d
    assert counts["dense"] == layers * per_block + d + d * v
    assert flops_per_token(args, counts, seq_len=32) == 6 * counts["dense"] + 12 * layers * h * hd * 32


def test_sequence_longer_than_max_is_rejected():
    model = build_model(tiny_args(max_seq_len=8), CPU)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))
