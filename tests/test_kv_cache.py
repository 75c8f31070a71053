"""Decoding with a KV cache against the plain reference that re-runs the whole prefix: the same logits (float64) for
left-padded rows of mixed lengths, and the same tokens, greedy or sampled, on dense, grouped-query and memory
models."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from titanmem.build import build_model
from titanmem.eval.decode import generate
from titanmem.models import ModelArgs
from titanmem.models.args import MemoryArgs
from titanmem.models.kv_cache import KVCache

CPU = torch.device("cpu")
VOCAB = 61


def model_for(kind: str, seed: int) -> torch.nn.Module:
    args = ModelArgs(dim=32, n_layers=3, n_heads=4, ffn_hidden_dim=48, vocab_size=VOCAB, max_seq_len=48)
    if kind == "gqa":
        args = dataclasses.replace(args, n_kv_heads=2)
    if kind == "memory":
        args = dataclasses.replace(args, memory=MemoryArgs(layers=(1,), n_keys=8, k_dim=8, v_dim=32, heads=2, knn=4))
    torch.manual_seed(seed)
    return build_model(args, CPU).double().eval()


def random_prompts(seed: int, count: int, longest: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(rng.randint(1, longest))] for _ in range(count)]


@pytest.mark.parametrize("kind", ["dense", "gqa", "memory"])
def test_cached_logits_of_left_padded_rows_equal_each_row_run_alone(kind):
    model = model_for(kind, seed=11)
    prompts = random_prompts(seed=5, count=4, longest=9)
    continuation = [random.Random(6).randrange(VOCAB) for _ in range(5)]
    longest = max(map(len, prompts))
    pad = torch.tensor([longest - len(p) for p in prompts])
    cache = KVCache(pad, longest + len(continuation))
    with torch.no_grad():
        steps = [model(torch.tensor([[0] * (longest - len(p)) + p for p in prompts]), cache=cache)[:, -1]]
        for token in continuation:
            steps.append(model(torch.full((len(prompts), 1), token), cache=cache)[:, -1])
        for row, prompt in enumerate(prompts):
            alone = model(torch.tensor([prompt + continuation]))[0]
            expected = alone[len(prompt) - 1 :]
            torch.testing.assert_close(torch.stack([s[row] for s in steps]), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", ["dense", "gqa", "memory"])
def test_cached_generation_matches_the_reference_token_for_token(kind):
    model = model_for(kind, seed=3)
    prompts = random_prompts(seed=8, count=11, longest=13)
    common = dict(max_new_tokens=9, eos_id=VOCAB - 1, device=CPU)
    reference = generate(model, prompts, batch_size=4, use_cache=False, **common)
    assert generate(model, prompts, batch_size=4, **common) == reference
    assert generate(model, prompts, batch_size=len(prompts), **common) == reference
    # Filler columns (as a sequence-parallel plan needs) change nothing.
    assert generate(model, prompts, batch_size=4, sequence_multiple=3, **common) == reference
    assert any(len(set(tokens)) > 1 for tokens in reference), "a constant continuation would prove little"
    # Sampling draws in the same order when both paths take one prompt at a time (both go by length).
    sampled = [generate(model, prompts, batch_size=1, temperature=0.9, top_p=0.8, use_cache=use_cache,
                        generator=torch.Generator().manual_seed(4), **common) for use_cache in (False, True)]
    assert sampled[0] == sampled[1] and sampled[0] != reference


def test_progress_is_reported_per_batch_and_a_cache_beyond_max_seq_len_is_refused():
    model = model_for("dense", seed=1)
    calls = []
    generate(model, random_prompts(2, 5, 4), 3, VOCAB - 1, CPU, batch_size=2, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(2, 5), (4, 5), (5, 5)]
    # The same lengths as the reference accepts: 40 + 9 needs 48 positions (the last token is never fed back).
    assert generate(model, [[1] * 40], 9, VOCAB - 1, CPU) == generate(model, [[1] * 40], 9, VOCAB - 1, CPU,
                                                                       use_cache=False)
    assert generate(model, [[1] * 45], 2, VOCAB - 1, CPU, sequence_multiple=2) == generate(
        model, [[1] * 45], 2, VOCAB - 1, CPU, use_cache=False)  # filler columns take no position
    for use_cache in (False, True):
        with pytest.raises(ValueError, match="exceeds max_seq_len 48"):
            generate(model, [[1] * 41], 9, VOCAB - 1, CPU, use_cache=use_cache)
    assert generate(model, [[1, 2], [3]], 0, VOCAB - 1, CPU) == [[], []]
    with pytest.raises(ValueError, match="do not fit"):
        cache = KVCache(torch.zeros(1, dtype=torch.long), 4)
        model(torch.ones(1, 3, dtype=torch.long), cache=cache)
        model(torch.ones(1, 2, dtype=torch.long), cache=cache)


@pytest.mark.parametrize("parallelism", [{"dp_shard": 2, "mp": 2}, {"tp": 2}], ids=["fsdp-mp", "tp-sp"])
def test_cached_generation_under_a_parallel_plan_matches_the_reference(tmp_path, parallelism):
    from helpers import decode_worker, launch_ranks

    prompts = random_prompts(seed=9, count=5, longest=7)
    sections = {"memory": {"enabled": True}, "parallelism": parallelism}
    launch_ranks(decode_worker, 2, str(tmp_path), sections, prompts)
    saved = torch.load(tmp_path / "decoded.pt", weights_only=False)
    # The reference: the same weights in one process, decoded without a cache.
    model = build_model(saved["args"], CPU)
    model.load_state_dict(saved["weights"])
    reference = generate(model.eval(), prompts, 6, saved["eos_id"], CPU, use_cache=False)
    assert any(reference)
    assert_same_greedy_tokens(model.double(), prompts, saved["decoded"], reference, saved["eos_id"])


def assert_same_greedy_tokens(model, prompts, decoded, reference, eos_id):
    """`decoded` (fp32, by a plan that sums in its own order) equals the one-process `reference`, token for token,
    up to a place where the two picked tokens whose logits tie within rounding: greedy decoding may then take either
    (an end of text included), and the continuations part ways. The float64 logits decide what ties: within 1e-4 of
    the logits' largest magnitude, far above what fp32 sums of these widths (256) can move them, and far below the gap
    a fault leaves."""
    for prompt, ours, theirs in zip(prompts, decoded, reference):
        if ours == theirs:
            continue
        # The decoder drops the end of text and what would follow: a shorter continuation picked it there.
        at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        picked = [tokens[at] if at < len(tokens) else eos_id for tokens in (ours, theirs)]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + theirs[:at]]))[0, -1]
        gap = (logits[picked[1]] - logits[picked[0]]).abs().item()
        assert gap <= 1e-4 * logits.abs().max().item(), (prompt, ours, theirs, gap)


def test_the_greedy_comparison_accepts_a_tie_and_refuses_any_other_difference():
    model = model_for("dense", seed=5)
    prompts = random_prompts(seed=3, count=4, longest=6)
    reference = generate(model, prompts, 5, VOCAB - 1, CPU)
    assert_same_greedy_tokens(model, prompts, reference, reference, VOCAB - 1)
    with torch.no_grad():
        logits = model(torch.tensor([prompts[0] + reference[0][:2]]))[0, -1]
    runner_up = int(logits.topk(2).indices[1])
    swapped = [list(tokens) for tokens in reference]
    swapped[0][2:] = [runner_up, 7]
    with pytest.raises(AssertionError):  # a clear second best is no tie
        assert_same_greedy_tokens(model, prompts, swapped, reference, VOCAB - 1)
    stopped = [tokens[:2] if row == 0 else tokens for row, tokens in enumerate(reference)]
    with pytest.raises(AssertionError):  # nor is stopping early, unless the end of text tied
        assert_same_greedy_tokens(model, prompts, stopped, reference, VOCAB - 1)
    # A true tie: the runner-up made to score what the pick scores, everywhere. Where greedy decoding first takes one
    # of the two, a decoder that took the other, and went on greedily from there, passes.
    pick = reference[0][2]
    with torch.no_grad():
        model.output.weight[runner_up] = model.output.weight[pick]
    tied = generate(model, prompts, 5, VOCAB - 1, CPU)
    at = next(i for i, token in enumerate(tied[0]) if token in (pick, runner_up))
    other = pick + runner_up - tied[0][at]
    forced = tied[0][:at] + [other]
    ours = forced + generate(model, [prompts[0] + forced], 5 - len(forced), VOCAB - 1, CPU)[0]
    assert ours != tied[0]
    assert_same_greedy_tokens(model, prompts, [ours] + tied[1:], tied, VOCAB - 1)


def test_eval_decoding_follows_eval_kv_cache_and_refuses_no_cache_under_tensor_parallel(monkeypatch):
    from titanmem.config import ConfigError, build_config
    from titanmem.eval import runner

    with pytest.raises(ConfigError) as info:
        build_config(["--eval.kv_cache", "false", "--parallelism.tp", "2"])
    assert info.value.field == "eval.kv_cache"
    seen = []

    def fake_generate(*args, use_cache, sequence_multiple, **kwargs):
        seen.append((use_cache, sequence_multiple))
        return [[] for _ in args[1]]

    monkeypatch.setattr(runner, "generate", fake_generate)
    from titanmem.data.tokenizer import build_tokenizer

    for flag in ("true", "false"):
        config, _ = build_config(["--eval.kv_cache", flag, "--eval.facts_limit", "4", "--training.device", "cpu"])
        evaluator = runner.Evaluator(config, build_tokenizer(config.tokenizer), CPU, None)
        evaluator.recall(torch.nn.Identity())
    assert seen == [(True, 1), (False, 1)]
