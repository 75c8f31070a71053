"""lm-evaluation-harness on an hf export scores the titanmem_facts task exactly as titanmem's own recall eval scores
the same items: the same prompts, the same greedy completions, the same normalised exact match."""

import gzip
import json
import unicodedata

import lm_eval
import pytest
import torch
from helpers import make_config, train_tiny_run
from lm_eval.tasks import TaskManager

from titanmem.interop.lm_eval_task import GROUP, task_items
from titanmem.interop.lm_eval_task import main as write_task_main


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from titanmem.build import build_run
    from titanmem.config import build_config
    from titanmem.export import main as export_main
    from titanmem.plan import resolve_plan

    root = tmp_path_factory.mktemp("lm-eval")
    train_tiny_run(root / "run", checkpoint={"enable": True, "interval": 3})
    argv = ["--job.dump_folder", str(root / "run"), "--memory.enabled", "--training.device", "cpu",
            "--training.seq_len", "32", "--checkpoint.enable"]
    assert export_main([*argv, "--export.folder", str(root / "hf"), "--export.format", "hf"]) == 0
    config, _ = build_config(argv)
    run = build_run(resolve_plan(config, "eval"))
    run.model.eval()
    return root, run


def accented(text: str) -> str:
    """`text` upper-cased, with an accent on each vowel and a full stop: the same answer once normalised."""
    marked = "".join(c + "\u0301" if c in "aeiouAEIOU" else c for c in text.upper())
    return unicodedata.normalize("NFC", marked) + "."


def facts_some_of_which_the_model_knows(run, path) -> None:
    """A facts file of bundled facts (seen, seen as Q/A, unseen) in which half the answers are replaced by what the
    model completes their training prompt with, written in another case and accents: a score that is neither 0 nor 1
    when both tools complete and normalise alike."""
    from titanmem.data.facts import RELATIONS
    from titanmem.eval.decode import generate

    with gzip.open("assets/facts/facts.jsonl.gz", "rt") as f:
        bundled = [json.loads(line) for line in f]
    picked = ([f for f in bundled if f["seen"] and f["qa"]][:4] + [f for f in bundled if f["seen"] and not f["qa"]][:4]
              + [f for f in bundled if not f["seen"]][:4])
    prompts = [RELATIONS[f["relation"]].training_prompt(f["subject"]) for f in picked]
    completions = generate(run.model, [run.tokenizer.encode(p) for p in prompts], 12, run.tokenizer.eos_id,
                           torch.device("cpu"), vocab_size=run.tokenizer.vocab_size)
    known = 0
    for fact, completion in zip(picked[::2], completions[::2]):
        words = run.tokenizer.decode(completion).split()
        if words and any(c.isalnum() for c in words[0]):
            fact["answer"] = accented(words[0])
            known += 1
    assert known >= 2, "the tiny model's completions should start with a word"
    path.write_text("".join(json.dumps(f) + "\n" for f in picked))


def test_lm_eval_scores_the_task_as_titanmems_recall_eval(exported, tmp_path):
    from titanmem.eval.runner import Evaluator

    root, run = exported
    facts = tmp_path / "facts.jsonl"
    facts_some_of_which_the_model_knows(run, facts)
    assert write_task_main(["--out", str(tmp_path / "tasks"), "--facts", str(facts), "--limit", "0"]) == 0

    config = make_config(tmp_path / "eval", memory={"enabled": True}, data={"facts_path": str(facts)},
                         eval={"facts_limit": 0, "perplexity_tokens": 64})
    ours = Evaluator(config, run.tokenizer, torch.device("cpu"), None).recall(run.model)

    # The group runs its seen and unseen members; the seen_qa and seen_stated ones are asked for by name.
    others = [f"{GROUP}_{split}__{phrasing}" for split in ("seen_qa", "seen_stated") for phrasing in ("train", "qa",
                                                                                                       "heldout")]
    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={root / 'hf'},trust_remote_code=True,dtype=float32,device=cpu",
        tasks=[GROUP, *others], task_manager=TaskManager(include_path=str(tmp_path / "tasks")), batch_size=1,
    )["results"]
    compared = 0
    for key, recall in ours.items():
        split, phrasing, relation = key.split("/")
        if relation == "all":
            assert results[f"{GROUP}_{split}__{phrasing}"]["exact_match,none"] == pytest.approx(recall, abs=1e-12), key
            compared += 1
    assert compared == 12
    assert 0 < ours["seen/train/all"] < 1 or 0 < ours["unseen/train/all"] < 1
    items = [json.loads(line) for line in (tmp_path / "tasks" / GROUP / "items.jsonl").read_text().splitlines()]
    # The group weighs each member by its size: every item once.
    correct = sum(ours[f"{s}/{p}/all"] * sum(1 for i in items if s in i["splits"] and i["phrasing"] == p)
                  for s in ("seen", "unseen") for p in ("train", "qa", "heldout"))
    assert results[GROUP]["exact_match,none"] == pytest.approx(correct / len(items), abs=1e-12)


def test_the_task_asks_every_prompt_of_titanmems_recall_eval():
    from titanmem.data.facts import Fact

    facts = [Fact("capital", "Botswana", "Gaborone", seen=True, qa=True),
             Fact("capital", "Chad", "N'Djamena", seen=False)]
    items = task_items(facts)
    phrasings = [i["phrasing"] for i in items if i["subject"] == "Botswana"]
    assert phrasings[:2] == ["train", "qa"] and set(phrasings[2:]) == {"heldout"}
    assert {tuple(i["splits"]) for i in items} == {("seen", "seen_qa"), ("unseen",)}


def test_a_bad_facts_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "facts.jsonl"
    bad.write_text('{"relation": "capital", "subject": "X"}\n')
    assert write_task_main(["--out", str(tmp_path / "tasks"), "--facts", str(bad)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1 and "facts.jsonl" in error
