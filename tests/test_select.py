"""The Triton top-k selection (titanmem.kernels.select) against torch.topk, on CPU under the interpreter."""

import pytest
import torch

from titanmem.kernels.select import MAX_WIDTH, row_topk, row_topk_positions

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def check_against_torch(x, k):
    values, positions = row_topk(x, k)
    expected = x.float().topk(k, dim=-1).values
    assert values.dtype == x.dtype and positions.dtype == torch.int64
    assert torch.equal(values.float(), expected), "not the k largest values, largest first"
    assert torch.equal(x.gather(-1, positions), values), "positions do not hold the values"
    assert bool((positions.sort(-1).values.diff(dim=-1) > 0).all()), "a position was chosen twice"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows, width, k", [(1, 1, 1), (5, 1024, 32), (17, 119, 32), (3, 10, 10), (9, 33, 1),
                                            (2, 3000, 64)])
def test_row_topk_matches_torch_topk(dtype, rows, width, k):
    generator = torch.Generator().manual_seed(rows * width + k)
    check_against_torch(torch.randn(rows, width, generator=generator).to(dtype).to(DEVICE), k)


def test_ties_go_to_the_lower_positions_and_signed_zeros_and_infinities_order():
    x = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 0.0],
                      [-0.0, 0.0, -1.0, float("-inf"), -0.0, float("inf")],
                      [5.0, 5.0, 5.0, 5.0, 5.0, 5.0]], device=DEVICE)
    values, positions = row_topk(x, 2)
    assert positions[:2].tolist() == [[1, 2], [5, 1]]  # 3 at 1 and 2 before 4; +inf, then +0 above -0
    assert positions[2].tolist() == [0, 1]
    assert values.tolist() == [[3.0, 3.0], [float("inf"), 0.0], [5.0, 5.0]]
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(row_topk(x.to(dtype), 2)[1], positions)


def test_leading_dims_wide_rows_and_no_rows():
    x = torch.randn(2, 3, 4, 50, device=DEVICE).to(torch.bfloat16)
    values, positions = row_topk(x, 7)
    assert values.shape == positions.shape == (2, 3, 4, 7)
    check_against_torch(x.flatten(0, 2), 7)
    wide = torch.randn(2, MAX_WIDTH + 1, device=DEVICE)  # past one warp's registers: torch.topk
    torch.testing.assert_close(row_topk(wide, 5)[0], wide.topk(5).values)
    assert row_topk_positions(torch.empty(0, 8, device=DEVICE), 3).shape == (0, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_nan_ranks_first_as_in_torch_topk(dtype):
    """Either sign of NaN (a sign-bit NaN would otherwise order below -inf) is taken first, like torch.topk does."""
    x = torch.randn(4, 64, device=DEVICE).to(dtype)
    x[0] = float("nan")
    x[1, ::3] = float("nan")
    x[2, [5, 40]] = float("nan")
    x[2, [7, 50]] = -torch.tensor(float("nan"), dtype=dtype)  # sign bit set
    positions = row_topk(x, 16)[1]
    assert bool((positions.sort(-1).values.diff(dim=-1) > 0).all())
    assert bool(((positions >= 0) & (positions < 64)).all())
    assert set(positions[2, :4].tolist()) == {5, 7, 40, 50}
    torch.testing.assert_close(positions[2].sort().values, x[2].float().topk(16).indices.sort().values)
    check_against_torch(x[3:], 16)


def test_the_gradient_flows_to_the_chosen_positions_only():
    x = torch.randn(6, 40, dtype=torch.float32, device=DEVICE, requires_grad=True)
    values, positions = row_topk(x, 5)
    weights = torch.arange(1.0, 6.0, device=DEVICE)
    (values * weights).sum().backward()
    expected = torch.zeros_like(x).scatter(-1, positions, weights.expand(6, -1))
    assert torch.equal(x.grad, expected)


@pytest.mark.parametrize("shape, k, dtype", [((4,), 2, torch.float32), ((3, 5), 6, torch.float32),
                                             ((3, 5), 0, torch.float32), ((3, 5), 2, torch.float64)])
def test_bad_inputs_are_refused(shape, k, dtype):
    with pytest.raises(ValueError, match="row_topk needs"):
        row_topk_positions(torch.zeros(shape, dtype=dtype, device=DEVICE), k)
