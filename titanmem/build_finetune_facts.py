"""Write the facts a pretraining run never saw as a finetuning corpus: one JSON line per statement.

    titanmem-build-facts --out data/new_facts.jsonl [--facts assets/facts/facts.jsonl.gz]
        [--no-qa] [--seed 0]

Every unseen fact of the facts file (the ones `data.facts_fraction` never states, whose recall the eval reports as
`unseen/...`) is written in each training template of its relation ("The capital of Botswana is Gaborone."), and,
unless --no-qa, as a question-answer pair ("Q: What is the capital of Botswana?\\nA: Gaborone."), in a shuffled
order. Train on it with `--data.path FILE --data.facts_fraction 0`, keeping `data.facts_path` on the same facts file:
the eval's `unseen/...` recall then measures what the finetuning taught, and `seen/...` what it kept.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from titanmem.config.manager import resolve_asset_path
from titanmem.data.facts import RELATIONS, load_facts
from titanmem.entry import ends_in_one_line
from titanmem.utils import print_error


def finetune_texts(facts, qa: bool, seed: int) -> list[str]:
    """Every unseen fact in each training template of its relation (and as a Q/A pair with `qa`), in an order
    shuffled by `seed`."""
    texts = []
    for fact in facts:
        if fact.seen:
            continue
        relation = RELATIONS[fact.relation]
        texts += [relation.statement(fact.subject, fact.answer, t) for t in range(len(relation.train_templates))]
        if qa:
            texts.append(relation.qa_pair(fact.subject, fact.answer))
    random.Random(seed).shuffle(texts)
    return texts


@ends_in_one_line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="the JSON-lines file to write (new)")
    parser.add_argument("--facts", default="assets/facts/facts.jsonl.gz", help="the facts file")
    parser.add_argument("--no-qa", action="store_true", help="statements only, no question-answer pairs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the order")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        print_error(f"--out {out} exists; choose a new file")
        return 2
    facts = load_facts(resolve_asset_path(args.facts), field="--facts")
    texts = finetune_texts(facts, qa=not args.no_qa, seed=args.seed)
    if not texts:
        print_error(f"--facts {args.facts} holds no unseen fact")
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    partial.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    partial.replace(out)
    unseen = sum(not fact.seen for fact in facts)
    print(f"wrote {out}: {len(texts):,} texts of {unseen:,} unseen facts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
