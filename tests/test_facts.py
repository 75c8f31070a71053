"""The fact corpus and its scorer: deterministic facts and training text, disjoint splits, a balanced eval sample,
the guessing floor, and exact match that ignores accents, case and punctuation."""

import json
import random
from collections import Counter

import pytest

from titanmem.data.facts import RELATIONS, Fact, FactText, guessing_floor, is_qa_trained, is_unseen, load_facts
from titanmem.eval.facts import is_exact_match, normalize
from titanmem.eval.runner import water_fill, sample_facts

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
    # The splits are functions of the key alone, so they are the same in any build.
    assert all(f.seen != is_unseen(f.relation, f.subject, 0.1) for f in facts)
    assert all(f.qa == (f.seen and is_qa_trained(f.relation, f.subject, 0.5)) for f in facts)
    assert 0.45 < sum(f.qa for f in facts) / sum(f.seen for f in facts) < 0.55
    answers = {(f.relation, f.subject): f.answer for f in facts}
    assert answers["capital", "France"] == "Paris"
    assert answers["iso_numeric", "Botswana"] == "072"
    assert answers["state_capital", "Texas"] == "Austin"
    # No relation carries more than a quarter of the facts.
    assert max(Counter(f.relation for f in facts).values()) < 0.3 * len(facts)


def test_fact_text_is_deterministic_and_trains_only_seen_facts_qa_pairs_only_of_qa_facts(facts):
    fact_text = FactText(facts, qa_share=0.3)
    first = fact_text.text(random.Random(7), 4000)
    assert first == fact_text.text(random.Random(7), 4000)
    assert first != fact_text.text(random.Random(8), 4000)
    lines = iter(first.split("\n"))
    items = [line + "\n" + next(lines) if line.startswith("Q: ") else line for line in lines]
    assert len(items) == 4000
    statement_of, pair_of = {}, {}
    for f in facts:  # every fact, so that a statement or pair of an unseen or non-qa fact would be found
        relation = RELATIONS[f.relation]
        for index in range(len(relation.train_templates)):
            statement_of[relation.statement(f.subject, f.answer, index)] = f
        pair_of[relation.qa_pair(f.subject, f.answer)] = f
    assert all(item in statement_of or item in pair_of for item in items)
    stated = [statement_of[item] for item in items if item in statement_of]
    answered = [pair_of[item] for item in items if item in pair_of]
    assert 0.25 < len(answered) / len(items) < 0.35
    assert all(f.seen for f in stated) and all(f.qa for f in answered)
    # Statements do not favour the Q/A facts: the two kinds are stated at the same rate per fact.
    qa_count, stated_count = sum(f.qa for f in facts), sum(f.seen and not f.qa for f in facts)
    rate_qa = sum(f.qa for f in stated) / qa_count
    rate_stated = sum(not f.qa for f in stated) / stated_count
    assert abs(rate_qa / rate_stated - 1) < 0.15
    # Without a qa share, or without qa facts, the text is statements only.
    assert "Q: " not in FactText(facts, 0.0).text(random.Random(1), 500)
    no_qa = [Fact(f.relation, f.subject, f.answer, f.seen) for f in facts]
    assert "Q: " not in FactText(no_qa, 0.9).text(random.Random(1), 500)


def test_prompts_end_before_the_answer():
    relation = RELATIONS["capital"]
    assert relation.training_prompt("Botswana") == "The capital of Botswana is"
    assert relation.statement("Botswana", "Gaborone", 0).startswith(relation.training_prompt("Botswana") + " ")
    assert relation.qa_prompt("Botswana") == "Q: What is the capital of Botswana?\nA:"
    assert relation.qa_pair("Botswana", "Gaborone") == relation.qa_prompt("Botswana") + " Gaborone."
    for relation in RELATIONS.values():
        for template in (*relation.train_templates, relation.qa_template):
            assert template.endswith("{answer}.") and template.count("{subject}") == 1, template
        assert relation.qa_template.startswith("Q: ") and "\nA: {answer}" in relation.qa_template
        trained = {t.split("{answer}")[0].rstrip() for t in (*relation.train_templates, relation.qa_template)}
        assert len(relation.heldout_prompts) == 2
        for prompt in relation.heldout_prompts:
            assert "{answer}" not in prompt and prompt.count("{subject}") == 1
            assert prompt not in trained, "a held-out prompt repeats a trained phrasing"
        # The held-out question shares no wording with the trained one beyond the subject.
        question = relation.qa_template.split("?")[0].removeprefix("Q: ")
        assert not any(question in prompt for prompt in relation.heldout_prompts)


@pytest.mark.parametrize("sizes, total", [([5, 1, 9], 10), ([0, 3], 2), ([2, 2], 9), ([7, 7, 7], 20), ([], 4),
                                          ([1000, 3, 1], 0), ([4, 11, 6, 2, 30], 37), ([1, 3, 2], 5)])
def test_water_fill_gives_each_group_its_equal_share_or_all_it_has(sizes, total):
    counts = water_fill(sizes, total)
    assert sum(counts) == min(total, sum(sizes))
    assert all(0 <= c <= s for c, s in zip(counts, sizes))
    if sizes:
        assert all(c >= min(s, total // len(sizes)) for c, s in zip(counts, sizes))


def test_water_fill_on_every_small_case_against_its_rounds_done_by_hand():
    """Brute force over all sizes up to 3 groups of 0-5 and every total: the invariants, and the result of the
    rounds replayed one fact at a time (each round deals its equal share, the remainder to the first groups)."""
    import itertools

    def by_hand(sizes, total):
        counts, left = [0] * len(sizes), total
        while left and any(c < s for c, s in zip(counts, sizes)):
            open_groups = [i for i, (c, s) in enumerate(zip(counts, sizes)) if c < s]
            share, extra = divmod(left, len(open_groups))
            for rank, i in enumerate(open_groups):
                for _ in range(share + (rank < extra)):
                    if counts[i] < sizes[i]:
                        counts[i] += 1
                        left -= 1
        return counts

    for n in range(1, 4):
        for sizes in itertools.product(range(6), repeat=n):
            for total in range(sum(sizes) + 2):
                counts = water_fill(list(sizes), total)
                assert counts == by_hand(list(sizes), total), (sizes, total)
                assert sum(counts) == min(total, sum(sizes))
                assert all(c >= min(s, total // n) for c, s in zip(counts, sizes)), (sizes, total)


def test_the_eval_sample_is_fixed_half_unseen_and_spread_over_the_relations(facts):
    for limit in (2000, 600, 97):
        sample = sample_facts(facts, limit)
        assert len(sample) == limit and len(set(sample)) == limit
        assert sample == sample_facts(facts, limit)
        assert max(Counter(f.relation for f in sample).values()) <= 0.25 * limit
        unseen = sum(not f.seen for f in sample)
        assert unseen == min(limit // 2 + limit % 2, sum(not f.seen for f in facts)) or unseen == limit // 2
    assert sample_facts(facts, 0) == facts
    assert set(sample_facts(facts, 10**6)) == set(facts)


def test_guessing_floor_matches_a_hand_count():
    rows = [("capital", "A", "X", True), ("capital", "B", "X", True), ("capital", "C", "Y", True),
            ("capital", "D", "X", False), ("capital", "E", "Z", False), ("capital", "F", "X", False),
            ("currency", "A", "Euro", True), ("currency", "B", "Dollar", True), ("currency", "C", "Dollar", False),
            ("iso_numeric", "A", "1", True)]
    facts = [Fact(*row) for row in rows]
    # capital: the guess X is right on 2 of 3 unseen; currency: a tie goes to the first answer in sort order
    # (Dollar), right on 1 of 1; iso_numeric has no unseen fact.
    assert guessing_floor(facts) == {"capital": pytest.approx(2 / 3), "currency": 1.0}


def test_fact_files_without_qa_still_load(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text(json.dumps({"relation": "capital", "subject": "Botswana", "answer": "Gaborone", "seen": True})
                    + "\n")
    assert load_facts(path) == [Fact("capital", "Botswana", "Gaborone", True, qa=False)]


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
