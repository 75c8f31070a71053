"""The fact corpus: relations and their templates, the seen/unseen split, the statements mixed into training, and
the prompts the factual-recall eval asks (its scorer is `titanmem.eval.facts`).

A fact is (relation, subject, answer), e.g. ("capital", "Botswana", "Gaborone"). Training sees *seen* facts only, as
statements from the relation's training templates ("The capital of Botswana is Gaborone."). Eval completes prompts
greedily and scores exact match after normalisation, for:
- the training phrasing: the first training template cut before the answer ("The capital of Botswana is");
- held-out phrasings, never in training ("The capital city of Botswana is", "Q: What is the capital of Botswana?").
Unseen facts are asked the same way: their recall is what guessing gives, the floor to read the seen numbers against.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from titanmem.data.records import Record, bad_record_error, json_records

ANSWER = "{answer}"


@dataclass(frozen=True)
class Relation:
    """Templates use {subject} and {answer}. Training templates end with the answer and a full stop, so that the
    text before {answer} is a prompt; held-out prompts are complete prompts, answered right after them."""

    name: str
    train_templates: tuple[str, ...]
    heldout_prompts: tuple[str, ...]

    def statement(self, subject: str, answer: str, template: int) -> str:
        return self.train_templates[template].format(subject=subject, answer=answer)

    def training_prompt(self, subject: str) -> str:
        return self.train_templates[0].split(ANSWER)[0].format(subject=subject).rstrip()

    def heldout(self, subject: str) -> list[str]:
        return [prompt.format(subject=subject) for prompt in self.heldout_prompts]


RELATIONS: dict[str, Relation] = {
    relation.name: relation
    for relation in (
        Relation(
            "capital",
            ("The capital of {subject} is {answer}.", "{subject} has its capital in {answer}.",
             "The seat of government of {subject} is {answer}."),
            ("The capital city of {subject} is", "Q: What is the capital of {subject}?\nA:"),
        ),
        Relation(
            "subregion",
            ("{subject} is a country in {answer}.", "The country of {subject} lies in {answer}.",
             "On a map, {subject} is found in {answer}."),
            ("{subject} is located in the region of", "Q: In which region of the world is {subject}?\nA:"),
        ),
        Relation(
            "demonym",
            ("A person from {subject} is called {answer}.", "The people of {subject} are known as {answer}.",
             "The demonym of {subject} is {answer}."),
            ("Someone born in {subject} is described as", "Q: What do you call a person from {subject}?\nA:"),
        ),
        Relation(
            "city_country",
            ("{subject} is a city in {answer}.", "The city of {subject} is located in {answer}.",
             "{subject} lies in the country of {answer}."),
            ("The country in which {subject} lies is", "Q: In which country is the city of {subject}?\nA:"),
        ),
        Relation(
            "element_symbol",
            ("The chemical symbol of {subject} is {answer}.", "{subject} has the symbol {answer}.",
             "In chemistry, {subject} is written as {answer}."),
            ("The symbol used for the element {subject} is", "Q: What is the chemical symbol of {subject}?\nA:"),
        ),
        Relation(
            "atomic_number",
            ("The atomic number of {subject} is {answer}.", "{subject} has atomic number {answer}.",
             "{subject} is element number {answer}."),
            ("The number of protons in an atom of {subject} is", "Q: What is the atomic number of {subject}?\nA:"),
        ),
        Relation(
            "discovery_year",
            ("{subject} was discovered in {answer}.", "The element {subject} was first identified in {answer}.",
             "The discovery of {subject} dates from {answer}."),
            ("The year in which {subject} was discovered is", "Q: In what year was {subject} discovered?\nA:"),
        ),
    )
}


@dataclass(frozen=True)
class Fact:
    relation: str
    subject: str
    answer: str
    seen: bool

    def to_json(self) -> dict:
        return {"relation": self.relation, "subject": self.subject, "answer": self.answer, "seen": self.seen}


_FACT_FIELDS = {"relation", "subject", "answer", "seen"}


def is_unseen(relation: str, subject: str, unseen_fraction: float) -> bool:
    """The split, a pure function of the fact's key: stable across builds, orders and subsets of the sources."""
    digest = hashlib.sha256(f"{relation}\x00{subject}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < unseen_fraction * 2**64


def load_facts(path: str | Path, field: str = "data.facts_path") -> list[Fact]:
    """The facts of a JSON-lines file; a bad line stops with its line and reason (a config error in `field`)."""
    facts = []
    for record in json_records(path):
        value = record.value
        if record.problem is None and not (isinstance(value, dict) and set(value) == _FACT_FIELDS
                                           and all(isinstance(value[k], str) for k in _FACT_FIELDS - {"seen"})
                                           and isinstance(value["seen"], bool)):
            record = Record(record.path, record.line, problem=f"not a fact: {json.dumps(value)[:120]} (a fact has "
                            "string relation, subject and answer, and boolean seen)")
        elif record.problem is None and value["relation"] not in RELATIONS:
            record = Record(record.path, record.line, problem=f"unknown relation {value['relation']!r}; known: "
                            f"{sorted(RELATIONS)}")
        if record.problem is not None:
            raise bad_record_error(record.description, field)
        facts.append(Fact(**value))
    return facts


def fact_statements(facts: list[Fact], rng: random.Random, count: int) -> str:
    """`count` training statements of random seen facts, each in a random training template, as one text."""
    statements = []
    for _ in range(count):
        fact = facts[rng.randrange(len(facts))]
        relation = RELATIONS[fact.relation]
        statements.append(relation.statement(fact.subject, fact.answer, rng.randrange(len(relation.train_templates))))
    return " ".join(statements)
