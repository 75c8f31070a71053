"""Initialisation drawn per parameter in row chunks: any block of a parameter equals that block of the whole, so a
sharded rank draws exactly its part of the one-process model."""

import pytest
import torch

import titanmem.models.init as init
from titanmem.models.init import ParamInit, draw_block, init_weights


@pytest.mark.parametrize("chunk_elements", [7, 64, 1 << 22])
@pytest.mark.parametrize("shape", [(13, 5), (1, 9), (31,), (6, 4, 3), ()])
def test_any_block_equals_that_block_of_the_whole(monkeypatch, chunk_elements, shape):
    monkeypatch.setattr(init, "CHUNK_ELEMENTS", chunk_elements)
    spec = ParamInit.trunc_normal(0.5, -1.0, 1.0)
    full_index = tuple(slice(0, n) for n in shape)
    whole = draw_block(spec, shape, full_index, seed=3, name="w", device=torch.device("cpu"))
    assert whole.shape == shape
    generator = torch.Generator().manual_seed(len(shape) * 100 + chunk_elements)
    for _ in range(20):
        index = []
        for size in shape:
            start = int(torch.randint(0, size, (), generator=generator))
            stop = int(torch.randint(start, size + 1, (), generator=generator))
            index.append(slice(start, stop))
        block = draw_block(spec, shape, tuple(index), seed=3, name="w", device=torch.device("cpu"))
        assert torch.equal(block, whole[tuple(index)])
    # Another seed or another name is another draw.
    assert shape == () or not torch.equal(whole, draw_block(spec, shape, full_index, 4, "w", torch.device("cpu")))
    assert shape == () or not torch.equal(whole, draw_block(spec, shape, full_index, 3, "v", torch.device("cpu")))


@pytest.mark.parametrize("spec, mean, std, low, high", [
    (ParamInit.normal(0.3, mean=1.0), 1.0, 0.3, None, None),
    (ParamInit.trunc_normal(1.0, -0.5, 0.5), 0.0, None, -0.5, 0.5),
    (ParamInit.uniform(-2.0, 4.0), 1.0, 6 / 12**0.5, -2.0, 4.0),
    (ParamInit.xavier_uniform(30, 70), 0.0, (6 / 100) ** 0.5 / 3**0.5, None, None),
])
def test_distributions(spec, mean, std, low, high):
    sample = draw_block(spec, (400, 250), (slice(0, 400), slice(0, 250)), 0, "x", torch.device("cpu")).double()
    assert sample.mean().item() == pytest.approx(mean, abs=0.02)
    if std is not None:
        assert sample.std().item() == pytest.approx(std, rel=0.02)
    if low is not None:
        assert low <= sample.min().item() and sample.max().item() <= high
    assert torch.equal(draw_block(ParamInit.constant(2.5), (3,), (slice(0, 3),), 0, "c", torch.device("cpu")),
                       torch.full((3,), 2.5))


def test_a_parameter_without_a_declared_distribution_is_an_error():
    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.empty(2, 2))
            self.bias = torch.nn.Parameter(torch.empty(2))

        def param_inits(self):
            return {"weight": ParamInit.constant(1.0)}

    with pytest.raises(KeyError, match="bias"):
        init_weights(Layer(), seed=0)
