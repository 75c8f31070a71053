"""Decoding, generation from a checkpoint, and the eval of a checkpoint, on a tiny model trained for a few steps."""

import json

import pytest
import torch

from helpers import reader_argv as argv, train_tiny_run
from titanmem.eval.decode import generate, pick_next_token


def test_top_p_keeps_the_smallest_nucleus_and_greedy_takes_the_argmax():
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.3, 0.15]]))
    assert pick_next_token(logits, 0.0, 1.0, None).item() == 1
    generator = torch.Generator().manual_seed(0)
    # top_p 0.7: {0.5, 0.3} reach it; 0.15 and 0.05 are never drawn.
    draws = {pick_next_token(logits, 1.0, 0.7, generator).item() for _ in range(200)}
    assert draws == {1, 2}
    draws = {pick_next_token(logits, 1.0, 0.1, generator).item() for _ in range(50)}
    assert draws == {1}  # the most likely token is always kept


class _Counter(torch.nn.Module):
    """Predicts token (last + 1) mod 7: a model whose greedy continuation is known."""

    def forward(self, tokens, cache=None):
        return torch.nn.functional.one_hot((tokens + 1) % 7, 8).float() * 10


def test_generate_batches_prompts_of_any_length_and_stops_at_eos():
    prompts = [[1], [2, 3], [4], [5, 6, 0]]
    out = generate(_Counter(), prompts, max_new_tokens=4, eos_id=6, device=torch.device("cpu"), batch_size=1)
    assert out == [[2, 3, 4, 5], [4, 5], [5], [1, 2, 3, 4]]
    assert generate(_Counter(), prompts, 4, 6, torch.device("cpu"), vocab_size=5) == [
        [2, 3, 4, 0], [4, 0, 1, 2], [0, 1, 2, 3], [1, 2, 3, 4]]  # 5 is out of the vocabulary: argmax of the rest


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    train_tiny_run(folder, checkpoint={"enable": True, "interval": 3}, data={"facts_fraction": 0.2})
    return folder


def test_greedy_generation_from_a_checkpoint_is_deterministic(trained_run, capsys):
    from titanmem.config import build_config
    from titanmem.generate import main, run

    prompts = '["The capital of France is", "Hydrogen"]'
    config, _ = build_config(argv(trained_run, "--generate.prompts", prompts, "--generate.max_new_tokens", "6"))
    first = run(config)
    assert len(first) == 2 and all(first)
    assert run(config) == first
    # Sampling is reproducible from its seed.
    sampled, _ = build_config(argv(trained_run, "--generate.prompts", prompts, "--generate.temperature", "1.0",
                                   "--generate.top_p", "0.9", "--generate.seed", "3"))
    assert run(sampled) == run(sampled)
    assert main(argv(trained_run, "--generate.prompts", prompts, "--generate.max_new_tokens", "6")) == 0
    assert "The capital of France is" + first[0] in capsys.readouterr().out
    assert main(argv(trained_run)) == 2
    assert "generate.prompts" in capsys.readouterr().err


def test_eval_of_a_checkpoint_writes_perplexity_and_recall(trained_run):
    from titanmem.eval.__main__ import main

    results_folder = trained_run.parent / f"{trained_run.name}-eval"
    code = main(argv(trained_run, "--checkpoint.enable", "--eval.facts_limit", "30", "--eval.perplexity_tokens",
                     "256", "--eval.max_new_tokens", "4", "--eval.dump_memory", "--eval.results_folder",
                     str(results_folder)))
    assert code == 0
    lines = (results_folder / "results.jsonl").read_text().splitlines()
    results = json.loads(lines[-1])
    assert results["step"] == 3 and results["tokens_scored"] == 256 and results["facts_asked"] == 30
    assert 1 < results["perplexity"] < 1e5
    assert {"seen/train/all", "seen/heldout/all", "seen/qa/all", "seen_qa/qa/all", "seen_stated/qa/all",
            "unseen/qa/all"} <= set(results["recall"])
    assert all(0 <= v <= 1 for v in results["recall"].values())
    dump = torch.load(results_folder / "memory-step-3.pt")
    assert set(dump["indices"]) == {"layer1", "layer3", "layer5"}
    assert dump["indices"]["layer1"].shape == (256, 4 * 32)


def test_eval_reads_are_not_counted_as_training_reads(tmp_path):
    from helpers import make_config
    from titanmem.train import Trainer

    trainer = Trainer(make_config(tmp_path, memory={"enabled": True}, training={"seq_len": 32},
                                  eval={"facts_limit": 4, "perplexity_tokens": 64, "dump_memory": True}))
    try:
        calls = []
        trainer.model.memory_values.observer = lambda layer, indices, weights: calls.append(indices.shape)
        observer = trainer.model.memory_values.observer
        trainer.evaluate()
        assert calls == [] and trainer.model.memory_values.observer is observer
        # The eval's own dump of the memory reads still sees them.
        dump = torch.load(tmp_path / "eval" / "memory-step-0.pt")
        assert dump["indices"] and all(t.numel() for t in dump["indices"].values())
    finally:
        trainer.close()
