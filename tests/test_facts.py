"""The fact corpus and its scorer: deterministic facts and statements, disjoint splits, and exact match that ignores
accents, case and punctuation."""

import random

import pytest

from titanmem.data.facts import RELATIONS, fact_statements, is_unseen, load_facts
from titanmem.eval.facts import is_exact_match, normalize

FACTS_PATH = "assets/facts/facts.jsonl.gz"


@pytest.fixture(scope="module")
def facts():
    return load_facts(FACTS_PATH)


def test_bundled_facts_cover_every_relation_with_a_seen_and_unseen_split(facts):
    assert {f.relation for f in facts} == set(RELATIONS)
    keys = [(f.relation, f.subject) for f in facts]
    assert len(keys) == len(set(keys)), "a (relation, subject) pair appears twice"
    seen = {(f.relation, f.subject) for f in facts if f.seen}
    unseen = {(f.relation, f.subject) for f in facts if not f.seen}
    assert seen and unseen and not seen & unseen
    assert 0.05 < len(unseen) / len(facts) < 0.15
    # The split is a function of the key alone, so it is the same in any build.
    assert all(f.seen != is_unseen(f.relation, f.subject, 0.1) for f in facts)
    capitals = {f.subject: f.answer for f in facts if f.relation == "capital"}
    assert capitals["France"] == "Paris"


def test_statements_are_deterministic_and_hold_only_the_given_facts(facts):
    seen = [f for f in facts if f.seen]
    first = fact_statements(seen, random.Random(7), 50)
    assert first == fact_statements(seen, random.Random(7), 50)
    assert first != fact_statements(seen, random.Random(8), 50)
    unseen = [f for f in facts if not f.seen]
    # No unseen fact's statement, in any template, appears in the training statements.
    for fact in unseen[:200]:
        relation = RELATIONS[fact.relation]
        for index in range(len(relation.train_templates)):
            assert relation.statement(fact.subject, fact.answer, index) not in first


def test_prompts_end_before_the_answer():
    relation = RELATIONS["capital"]
    assert relation.training_prompt("Botswana") == "The capital of Botswana is"
    assert relation.statement("Botswana", "Gaborone", 0).startswith(relation.training_prompt("Botswana") + " ")
    for relation in RELATIONS.values():
        for template in relation.train_templates:
            assert template.endswith("{answer}."), template
        training_prompts = {t.split("{answer}")[0].rstrip() for t in relation.train_templates}
        for prompt in relation.heldout_prompts:
            assert "{answer}" not in prompt
            assert prompt not in training_prompts, "a held-out prompt repeats a training template"


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        (" Gaborone.", "Gaborone", True),
        (" gaborone, the largest city", "Gaborone", True),
        (" Sao Tome\n", "São Tomé", True),
        (" BOGOTÁ!", "Bogotá", True),
        (" Washington, D.C. is", "Washington, D.C.", True),
        (" Port-au-Prince", "Port au Prince", True),
        (" Gaboronesque", "Gaborone", False),
        (" 18", "1", False),
        (" 1.", "1", True),
        (" The capital is Gaborone", "Gaborone", False),
        ("", "Gaborone", False),
        (" anything", "", False),
    ],
)
def test_exact_match_ignores_accents_case_and_punctuation(completion, answer, expected):
    assert is_exact_match(completion, answer) is expected


def test_normalize():
    assert normalize("  Curaçao’s  CAPITAL:\tWillemstad ") == "curacao s capital willemstad"
