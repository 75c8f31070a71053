"""The fact corpus: relations and their templates, the seen/unseen split, the text mixed into training, and the
prompts the factual-recall eval asks (its scorer is `titanmem.eval.facts`).

A fact is (relation, subject, answer), e.g. ("capital", "Botswana", "Gaborone"). Training sees *seen* facts only:
as statements from the relation's training templates ("The capital of Botswana is Gaborone."), and, for the seen
facts marked `qa`, also as question-answer pairs ("Q: What is the capital of Botswana?\nA: Gaborone."). Eval
completes prompts greedily and scores exact match after normalisation, for:
- `train`: the first training template cut before the answer ("The capital of Botswana is");
- `qa`: the Q/A template cut before the answer. On seen facts never trained as Q/A, it measures the transfer from
  statements to questions;
- `heldout`: phrasings never in training ("The capital city of Botswana is", "Question: Which city is the capital of
  Botswana?\nAnswer:").
Unseen facts are asked the same way: their recall is what guessing gives, the floor to read the seen numbers against.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from titanmem.data.records import Record, bad_record_error, json_records

ANSWER = "{answer}"


@dataclass(frozen=True)
class Relation:
    """Templates use {subject} and {answer}. Training templates and the Q/A template end with the answer and a full
    stop, so that the text before {answer} is a prompt; held-out prompts are complete prompts, answered right after
    them."""

    name: str
    train_templates: tuple[str, ...]
    qa_template: str
    heldout_prompts: tuple[str, ...]

    def statement(self, subject: str, answer: str, template: int) -> str:
        return self.train_templates[template].format(subject=subject, answer=answer)

    def qa_pair(self, subject: str, answer: str) -> str:
        return self.qa_template.format(subject=subject, answer=answer)

    def training_prompt(self, subject: str) -> str:
        return _cut_before_answer(self.train_templates[0], subject)

    def qa_prompt(self, subject: str) -> str:
        return _cut_before_answer(self.qa_template, subject)

    def heldout(self, subject: str) -> list[str]:
        return [prompt.format(subject=subject) for prompt in self.heldout_prompts]


def _cut_before_answer(template: str, subject: str) -> str:
    return template.split(ANSWER)[0].format(subject=subject).rstrip()


RELATIONS: dict[str, Relation] = {
    relation.name: relation
    for relation in (
        Relation(
            "capital",
            ("The capital of {subject} is {answer}.", "{subject} has its capital in {answer}.",
             "The seat of government of {subject} is {answer}."),
            "Q: What is the capital of {subject}?\nA: {answer}.",
            ("The capital city of {subject} is", "Question: Which city is the capital of {subject}?\nAnswer:"),
        ),
        Relation(
            "subregion",
            ("{subject} is a country in {answer}.", "The country of {subject} lies in {answer}.",
             "On a map, {subject} is found in {answer}."),
            "Q: In which region of the world is {subject}?\nA: {answer}.",
            ("{subject} is located in the region of", "Question: Which part of the world is {subject} in?\nAnswer:"),
        ),
        Relation(
            "demonym",
            ("A person from {subject} is called {answer}.", "The people of {subject} are known as {answer}.",
             "The demonym of {subject} is {answer}."),
            "Q: What do you call a person from {subject}?\nA: {answer}.",
            ("Someone born in {subject} is described as", "Question: What are people from {subject} called?\nAnswer:"),
        ),
        Relation(
            "city_country",
            ("{subject} is a city in {answer}.", "The city of {subject} is located in {answer}.",
             "{subject} lies in the country of {answer}."),
            "Q: In which country is the city of {subject}?\nA: {answer}.",
            ("The country in which {subject} lies is", "Question: Which country is {subject} in?\nAnswer:"),
        ),
        Relation(
            "element_symbol",
            ("The chemical symbol of {subject} is {answer}.", "{subject} has the symbol {answer}.",
             "In chemistry, {subject} is written as {answer}."),
            "Q: What is the chemical symbol of {subject}?\nA: {answer}.",
            ("The symbol used for the element {subject} is",
             "Question: How is {subject} written in chemical formulas?\nAnswer:"),
        ),
        Relation(
            "atomic_number",
            ("The atomic number of {subject} is {answer}.", "{subject} has atomic number {answer}.",
             "{subject} is element number {answer}."),
            "Q: What is the atomic number of {subject}?\nA: {answer}.",
            ("The number of protons in an atom of {subject} is",
             "Question: How many protons does an atom of {subject} have?\nAnswer:"),
        ),
        Relation(
            "discovery_year",
            ("{subject} was discovered in {answer}.", "The element {subject} was first identified in {answer}.",
             "The discovery of {subject} dates from {answer}."),
            "Q: In what year was {subject} discovered?\nA: {answer}.",
            ("The year in which {subject} was discovered is", "Question: When was {subject} first found?\nAnswer:"),
        ),
        Relation(
            "airport_city",
            ("The airport code {subject} belongs to {answer}.", "Flights marked {subject} land in {answer}.",
             "{subject} is the code of an airport serving {answer}."),
            "Q: Which city does the airport code {subject} serve?\nA: {answer}.",
            ("Travellers flying to {subject} arrive in", "Question: In what city is the airport {subject}?\nAnswer:"),
        ),
        Relation(
            "iso_alpha3",
            ("The ISO code of {subject} is {answer}.", "{subject} is abbreviated {answer}.",
             "The three-letter code for {subject} is {answer}."),
            "Q: What is the three-letter country code of {subject}?\nA: {answer}.",
            ("The alpha-3 country code of {subject} is",
             "Question: Which ISO 3166 code stands for {subject}?\nAnswer:"),
        ),
        Relation(
            "iso_numeric",
            ("The ISO numeric code of {subject} is {answer}.", "{subject} has the country number {answer}.",
             "In ISO 3166, {subject} is numbered {answer}."),
            "Q: What is the numeric country code of {subject}?\nA: {answer}.",
            ("The three-digit country code of {subject} is",
             "Question: Which number does ISO 3166 give {subject}?\nAnswer:"),
        ),
        Relation(
            "currency",
            ("The currency of {subject} is the {answer}.", "In {subject}, people pay with the {answer}.",
             "The money used in {subject} is the {answer}."),
            "Q: What is the currency of {subject}?\nA: {answer}.",
            ("The official currency of {subject} is the", "Question: Which currency is used in {subject}?\nAnswer:"),
        ),
        Relation(
            "state_capital",
            ("The capital of the US state of {subject} is {answer}.", "{subject}'s state capital is {answer}.",
             "The state government of {subject} sits in {answer}."),
            "Q: What is the capital of the state of {subject}?\nA: {answer}.",
            ("The capital city of the state of {subject} is",
             "Question: Which city is the state capital of {subject}?\nAnswer:"),
        ),
        Relation(
            "statehood_year",
            ("{subject} became a US state in {answer}.", "{subject} joined the Union in {answer}.",
             "The statehood of {subject} dates from {answer}."),
            "Q: In what year did {subject} become a state?\nA: {answer}.",
            ("The year {subject} was admitted to the Union was",
             "Question: When did {subject} achieve statehood?\nAnswer:"),
        ),
        Relation(
            "county_state",
            ("{subject} is in the state of {answer}.", "{subject} lies within {answer}.",
             "{subject} is a county of {answer}."),
            "Q: Which state is {subject} in?\nA: {answer}.",
            ("{subject} is part of the US state of", "Question: In which state does {subject} lie?\nAnswer:"),
        ),
    )
}


@dataclass(frozen=True)
class Fact:
    relation: str
    subject: str
    answer: str
    seen: bool
    qa: bool = False
    """Also trained as question-answer pairs (seen facts only)."""

    def to_json(self) -> dict:
        return {"relation": self.relation, "subject": self.subject, "answer": self.answer, "seen": self.seen,
                "qa": self.qa}


def _key_hash(*key: str) -> int:
    return int.from_bytes(hashlib.sha256("\x00".join(key).encode()).digest()[:8], "big")


def is_unseen(relation: str, subject: str, unseen_fraction: float) -> bool:
    """The split, a pure function of the fact's key: stable across builds, orders and subsets of the sources."""
    return _key_hash(relation, subject) < unseen_fraction * 2**64


def is_qa_trained(relation: str, subject: str, qa_fraction: float) -> bool:
    """Whether a seen fact is also trained as Q/A pairs: a pure function of its key, independent of `is_unseen`."""
    return _key_hash("qa", relation, subject) < qa_fraction * 2**64


_FACT_FIELDS = {"relation", "subject", "answer", "seen"}


def _fact_problem(value) -> str | None:
    """Why a JSON value is not a fact, or None. `qa` is optional (files built before it have none)."""
    fields = set(value) if isinstance(value, dict) else set()
    if not (_FACT_FIELDS <= fields <= _FACT_FIELDS | {"qa"}
            and all(isinstance(value[k], str) for k in ("relation", "subject", "answer"))
            and isinstance(value["seen"], bool) and isinstance(value.get("qa", False), bool)):
        return (f"not a fact: {json.dumps(value)[:120]} (a fact has string relation, subject and answer, boolean "
                "seen, and optionally boolean qa)")
    if value["relation"] not in RELATIONS:
        return f"unknown relation {value['relation']!r}; known: {sorted(RELATIONS)}"
    if value.get("qa") and not value["seen"]:
        return f"an unseen fact marked qa: {json.dumps(value)[:120]} (only seen facts are trained as Q/A pairs)"
    return None


def load_facts(path: str | Path, field: str = "data.facts_path") -> list[Fact]:
    """The facts of a JSON-lines file; a bad line stops with its line and reason (a config error in `field`)."""
    facts = []
    for record in json_records(path):
        if record.problem is None and (problem := _fact_problem(record.value)) is not None:
            record = Record(record.path, record.line, problem=problem)
        if record.problem is not None:
            raise bad_record_error(record.description, field)
        facts.append(Fact(**record.value))
    return facts


class FactText:
    """The training text about the seen facts: items one at a time, each a statement of a random seen fact in a
    random training template or, with probability `qa_share`, a Q/A pair of a random seen fact marked `qa`. Every
    seen fact is stated equally often, so the Q/A facts differ from the stated-only ones by their Q/A pairs alone."""

    def __init__(self, facts: list[Fact], qa_share: float = 0.0):
        self.seen = [fact for fact in facts if fact.seen]
        self.qa = [fact for fact in self.seen if fact.qa]
        self.qa_share = qa_share if self.qa else 0.0

    def item(self, rng: random.Random) -> str:
        if self.qa_share and rng.random() < self.qa_share:
            fact = self.qa[rng.randrange(len(self.qa))]
            return RELATIONS[fact.relation].qa_pair(fact.subject, fact.answer)
        fact = self.seen[rng.randrange(len(self.seen))]
        relation = RELATIONS[fact.relation]
        return relation.statement(fact.subject, fact.answer, rng.randrange(len(relation.train_templates)))

    def text(self, rng: random.Random, count: int) -> str:
        """`count` items, one per line."""
        return "\n".join(self.item(rng) for _ in range(count))


def guessing_floor(facts: list[Fact]) -> dict[str, float]:
    """Per relation, the recall on its unseen facts of always answering the relation's most common seen answer: the
    floor that priors alone reach, without a model."""
    floors = {}
    for name in sorted({fact.relation for fact in facts}):
        seen = Counter(fact.answer for fact in facts if fact.relation == name and fact.seen)
        unseen = [fact.answer for fact in facts if fact.relation == name and not fact.seen]
        if seen and unseen:
            guess = min(seen, key=lambda answer: (-seen[answer], answer))
            floors[name] = sum(answer == guess for answer in unseen) / len(unseen)
    return floors
