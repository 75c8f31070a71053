"""Column-wise memory parallel: the distributed lookup equals the single-process bag, values and gradients."""

import pytest
import torch
from helpers import column_parallel_worker, launch_ranks


@pytest.mark.parametrize("world", [2, 4])
def test_column_parallel_lookup_matches_one_process(tmp_path, world):
    torch.manual_seed(world)
    rows, dim, tokens, slots = 50, 24, 5, 7
    values = torch.randn(rows, dim, dtype=torch.float64)
    indices = torch.randint(0, rows, (world, tokens, slots))
    indices[:, :, 0] = 3  # a row every token of every rank reads
    weights = torch.randn(world, tokens, slots, dtype=torch.float64)
    grad_out = torch.randn(world, tokens, dim, dtype=torch.float64)
    torch.save({"values": values, "indices": indices, "weights": weights, "grad_out": grad_out},
               tmp_path / "inputs.pt")
    launch_ranks(column_parallel_worker, world, str(tmp_path))

    reference_values = values.clone().requires_grad_(True)
    reference_weights = weights.clone().requires_grad_(True)
    out = torch.einsum("rtl,rtld->rtd", reference_weights, reference_values[indices])
    out.backward(grad_out)
    columns = dim // world
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got["out"], out[rank].detach())
        torch.testing.assert_close(got["grad_weights"], reference_weights.grad[rank])
        # The slice's gradient sums the group's tokens and is divided by the group size (see the module doc).
        expected = reference_values.grad[:, rank * columns : (rank + 1) * columns] / world
        torch.testing.assert_close(got["grad_values"], expected)


def environment_worker(rank: int, world: int, port: int, folder: str) -> None:
    import os

    with open(os.path.join(folder, f"rank{rank}.env"), "w") as f:
        f.write(os.environ.get("TITANMEM_TEST_LAUNCH_MARK", "unset"))


def test_launched_ranks_see_the_environment_of_their_launch(tmp_path, monkeypatch):
    """The ranks fork from a server started once per session: each launch must still hand them its own environment,
    as a spawned process would get it."""
    for mark in ("first", "second"):
        monkeypatch.setenv("TITANMEM_TEST_LAUNCH_MARK", mark)
        launch_ranks(environment_worker, 2, str(tmp_path))
        assert [(tmp_path / f"rank{r}.env").read_text() for r in range(2)] == [mark, mark]
    monkeypatch.delenv("TITANMEM_TEST_LAUNCH_MARK")
    launch_ranks(environment_worker, 2, str(tmp_path))
    assert (tmp_path / "rank0.env").read_text() == "unset"
