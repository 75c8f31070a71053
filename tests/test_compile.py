"""torch.compile of the blocks: every Memory+ block compiles to one graph, with every value optimizer, and the
compiled block computes what the eager one does, records included."""

import pytest
import torch

from helpers import FP32_UNIT, assert_close_in_scale, check_command_line
from titanmem.build import build_planned_model
from titanmem.distributed.lookup import ReadRecorder
from titanmem.models.llama import rope_rotations
from titanmem.models.memory import ProductKeyMemory

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def memory_block(value_optimizer: str, key_search: str):
    """A debug-flavor Memory+ block as the plan builds it, with its recorder (None for dense AdamW) and rope."""
    plan = check_command_line(["--model.flavor", "debug", "--training.device", DEVICE, "--memory.enabled",
                               "--memory.value_optimizer", value_optimizer, "--memory.key_search", key_search,
                               "--memory.lookup", "triton", "--memory.n_keys", "16", "--memory.knn", "8", "--memory.value_lr", "0.01"])
    recorder = ReadRecorder() if value_optimizer != "adamw" else None
    model = build_planned_model(plan, torch.device(DEVICE), recorder)
    block = next(b for b in model.layers.values() if isinstance(b.feed_forward, ProductKeyMemory))
    return block, recorder, rope_rotations(model.rope, 8)


def run(block, x, rope):
    x = x.clone().requires_grad_(True)
    block.zero_grad()
    block(x, rope).square().sum().backward()
    return x.grad, {name.removeprefix("_orig_mod."): p.grad.clone() for name, p in block.named_parameters()
                    if p.grad is not None}


@pytest.mark.parametrize("value_optimizer, key_search", [("adamw", "triton"), ("sgd", "select"), ("adagrad", "triton"),
                                                         ("adam", "triton"), ("adagrad", "torch")])
def test_a_memory_block_compiles_to_one_graph_and_matches_eager(value_optimizer, key_search):
    block, recorder, rope = memory_block(value_optimizer, key_search)
    x = torch.randn(2, 8, block.attention_norm.weight.shape[0], generator=torch.Generator().manual_seed(0)).to(DEVICE)
    explained = torch._dynamo.explain(block)(x, rope)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    if recorder is not None:
        recorder.take()

    eager_input_grad, eager_grads = run(block, x, rope)
    eager_records = recorder.take() if recorder is not None else []
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    compiled_input_grad, compiled_grads = run(compiled, x, rope)
    compiled_records = recorder.take() if recorder is not None else []

    # aot_eager runs the decomposed ops, which may sum in another order: the block's widest sums (its 256-wide
    # matmuls, over 16 tokens) round differently, by a few hundred roundings of the largest terms at most (seen on
    # CPU: none at all).
    bound = 300 * FP32_UNIT
    assert_close_in_scale(compiled_input_grad, eager_input_grad, bound, "input")
    assert compiled_grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        assert_close_in_scale(compiled_grads[name], grad, bound, name)
    # A row-wise optimizer trains from the records: one per memory-layer call, the same under compile.
    assert len(compiled_records) == len(eager_records) == (0 if recorder is None else 1)
    for compiled_record, eager_record in zip(compiled_records, eager_records):
        for compiled_part, eager_part in zip(compiled_record, eager_record):
            if compiled_part.is_floating_point():
                assert_close_in_scale(compiled_part, eager_part, bound, "record")
            else:  # the rows read: only a near-tie of scores could change them, and this seed's inputs have none
                assert torch.equal(compiled_part, eager_part)
