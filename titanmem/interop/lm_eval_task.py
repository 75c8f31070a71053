"""titanmem's factual-recall eval as an lm-evaluation-harness task over local files: `python -m
titanmem.interop.lm_eval_task --out DIR [--facts FILE] [--limit N] [--max_new_tokens N]`, then `lm_eval --model hf
--model_args pretrained=EXPORT,trust_remote_code=True --include_path DIR --tasks titanmem_facts`.

The task asks what `python -m titanmem.eval` asks, and scores it the same way:
- the same facts (`eval.facts_limit`'s fixed sample of `data.facts_path`) and, for each, the same prompts: the first
  training template cut before the answer (`train`), the Q/A template (`qa`) and every held-out phrasing (`heldout`);
- greedy completion of `max_new_tokens` tokens, cut at the end-of-text token;
- exact match after folding case, accents and punctuation: the scorer is titanmem's, copied into the task's
  `utils.py` (`titanmem.interop.source_copy`), so the task runs where titanmem is not installed.

Each (split, phrasing) of titanmem's `eval/recall/<split>/<phrasing>` is a task, `titanmem_facts_<split>__<phrasing>`,
with its exact_match; the group `titanmem_facts` holds the seen and unseen ones (each item once), weighted by size.
The items are written beside the YAML files (`items.jsonl`), and read from there, never from the network.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from titanmem.config.errors import ConfigError
from titanmem.config.manager import resolve_asset_path
from titanmem.config.sections import Data, Eval, Tokenizer
from titanmem.data.facts import RELATIONS, load_facts
from titanmem.eval.runner import sample_facts
from titanmem.interop.source_copy import definitions
from titanmem.utils import print_error

GROUP = "titanmem_facts"
ITEMS = "items.jsonl"
# titanmem's recall splits: seen and unseen partition the facts; seen_qa and seen_stated split the seen ones again.
SPLITS = ("seen", "unseen", "seen_qa", "seen_stated")
PHRASINGS = ("train", "qa", "heldout")

UTILS_HEADER = '''"""Loading and scoring of the titanmem_facts tasks. Written by `python -m titanmem.interop.lm_eval_task`; the
scorer is titanmem's (titanmem.eval.facts), copied: do not edit, write the task again."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path
'''

UTILS_TASK = '''

def load_items(split: str, phrasing: str, **_) -> dict:
    """The items of one (split, phrasing), as the test split of a `datasets.DatasetDict`."""
    import datasets

    lines = (Path(__file__).parent / "items.jsonl").read_text(encoding="utf-8").splitlines()
    items = [item for item in map(json.loads, lines) if split in item["splits"] and item["phrasing"] == phrasing]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(items)})


def process_results(doc: dict, results: list[str]) -> dict:
    return {"exact_match": float(is_exact_match(results[0], doc["answer"]))}
'''


def task_items(facts) -> list[dict]:
    """Every prompt titanmem's recall eval asks about `facts`, with its answer, phrasing and splits."""
    items = []
    for fact in facts:
        relation = RELATIONS[fact.relation]
        splits = ["seen", "seen_qa" if fact.qa else "seen_stated"] if fact.seen else ["unseen"]
        prompts = [(relation.training_prompt(fact.subject), "train"), (relation.qa_prompt(fact.subject), "qa")]
        prompts += [(prompt, "heldout") for prompt in relation.heldout(fact.subject)]
        for prompt, phrasing in prompts:
            items.append({"prompt": prompt, "answer": fact.answer, "relation": fact.relation,
                          "subject": fact.subject, "phrasing": phrasing, "splits": splits})
    return items


def task_files(facts, max_new_tokens: int, eos_token: str) -> dict[str, str]:
    """File name -> text of the task folder."""
    items = task_items(facts)
    present = {(split, item["phrasing"]) for item in items for split in item["splits"]}
    files = {ITEMS: "".join(json.dumps(item, ensure_ascii=False, sort_keys=True) + "\n" for item in items)}
    files["utils.py"] = "\n\n\n".join([UTILS_HEADER.rstrip(), *definitions("titanmem.eval.facts", (
        "normalize", "is_exact_match"))]) + "\n" + UTILS_TASK
    base = {
        "output_type": "generate_until",
        "custom_dataset": "!function utils.load_items",
        "test_split": "test",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": [eos_token], "do_sample": False, "max_gen_toks": max_new_tokens},
        "process_results": "!function utils.process_results",
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    members = []
    for split in SPLITS:
        for phrasing in PHRASINGS:
            if (split, phrasing) not in present:
                continue
            name = f"{GROUP}_{split}__{phrasing}"
            files[f"{name}.yaml"] = _yaml({"task": name, **base, "dataset_kwargs": {"split": split,
                                                                                     "phrasing": phrasing}})
            if split in ("seen", "unseen"):
                members.append(name)
    files[f"{GROUP}.yaml"] = _yaml({"group": GROUP, "task": members, "aggregate_metric_list": [
        {"metric": "exact_match", "aggregation": "mean", "weight_by_size": True}], "metadata": {"version": 1.0}})
    return files


def _yaml(value) -> str:
    """YAML for these small documents: JSON is YAML, except lm-eval's `!function` tag, which must stay unquoted."""
    lines = []
    for key, item in value.items():
        if isinstance(item, str) and item.startswith("!function "):
            lines.append(f"{key}: {item}")
        else:
            lines.append(f"{key}: {json.dumps(item, ensure_ascii=False)}")
    return "\n".join(lines) + "\n"


def write_task(out: Path, facts_path: Path, limit: int, max_new_tokens: int, eos_token: str) -> Path:
    """Write the task folder `out/titanmem_facts`; returns it."""
    facts = sample_facts(load_facts(facts_path, "--facts"), limit)
    if not facts:
        raise ConfigError("--facts", f"{facts_path} holds no facts")
    folder = out / GROUP
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in task_files(facts, max_new_tokens, eos_token).items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to pass to lm_eval's --include_path")
    parser.add_argument("--facts", default=Data.facts_path, help="facts file (data.facts_path)")
    parser.add_argument("--limit", type=int, default=Eval.facts_limit,
                        help="facts to ask about, the same sample as eval.facts_limit's (0: all)")
    parser.add_argument("--max_new_tokens", type=int, default=Eval.max_new_tokens, help="eval.max_new_tokens")
    parser.add_argument("--eos_token", default=Tokenizer.eos_token, help="the tokenizer's end-of-text token")
    args = parser.parse_args(argv)
    if args.limit < 0 or args.max_new_tokens < 1:
        parser.error("--limit takes a count >= 0 (0: all facts), --max_new_tokens one >= 1")
    try:
        folder = write_task(args.out, resolve_asset_path(args.facts), args.limit, args.max_new_tokens, args.eos_token)
    except ConfigError as e:
        print_error(e)
        return 2
    print(f"wrote the lm-eval task {GROUP} to {folder}; run it with --include_path {args.out} --tasks {GROUP}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
