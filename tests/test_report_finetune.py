"""tools/experiments/report_finetune.py on hand-made run files: learning and forgetting against the base, and the goal
judged against the full arm, with numbers worked out by hand."""

import json

import pytest

from tools.experiments import report_finetune as report
from tools.experiments.report_experiment import find_runs


def evaluation(step, new, old, perplexity, new_qa=0.0):
    # Two relations: the averages below are over them, not over facts.
    recall = {"unseen/train/a": new[0], "unseen/train/b": new[1], "unseen/train/all": 0.99,
              "unseen/qa/a": new_qa, "unseen/qa/b": new_qa, "seen/train/a": old[0], "seen/train/b": old[1]}
    return {"step": step, "perplexity": perplexity, "recall": recall}


def write_arm(folder, arm, final):
    evals = [evaluation(50, (0.1, 0.1), (0.6, 0.6), 16.0), final]
    (folder / f"{arm}.seed0.eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    (folder / f"{arm}.seed0.wall").write_text(f"{arm}.seed0: 77 s wall, including start-up and evals\n")


@pytest.fixture
def folder(tmp_path):
    # base: new 0.0, old (0.6 + 0.8) / 2 = 0.7, perplexity 15
    (tmp_path / "base.eval.jsonl").write_text(json.dumps(evaluation(1600, (0.0, 0.0), (0.6, 0.8), 15.0)) + "\n")
    # full: learned 60 points, forgot 0.7 - 0.4 = 30 points, perplexity +3
    write_arm(tmp_path, "full", evaluation(150, (0.5, 0.7), (0.3, 0.5), 18.0, new_qa=0.4))
    # sparse_t10k: learned 55 points (0.92×), forgot 5 points (0.17×), perplexity +0.5 (0.17×): met
    write_arm(tmp_path, "sparse_t10k", evaluation(150, (0.5, 0.6), (0.6, 0.7), 15.5))
    # sparse_t1k: learned 50 points (0.83×): missed, however little it forgets
    write_arm(tmp_path, "sparse_t1k", evaluation(150, (0.4, 0.6), (0.6, 0.8), 15.0))
    # sparse_t100k: learned as full, forgot 12 points (0.4×): missed
    write_arm(tmp_path, "sparse_t100k", evaluation(150, (0.6, 0.6), (0.5, 0.66), 15.2))
    return tmp_path


def test_effects_average_relations_against_the_base(folder):
    base = report.read_base(folder)
    assert base["new"] == 0 and base["old"] == pytest.approx(0.7) and base["perplexity"] == 15
    runs = find_runs(folder)
    final = report.measures(runs["full"][0]["evals"][-1])
    effects = report.effects(final, base)
    assert effects["learned"] == pytest.approx(60) and effects["forgot"] == pytest.approx(30)
    assert effects["perplexity_rise"] == pytest.approx(3) and effects["learned_qa"] == pytest.approx(40)


def test_the_goal_is_judged_per_sparse_arm_against_full(folder):
    runs = find_runs(folder)
    lines = {line.split(":")[0]: line for line in report.goal(runs, report.read_base(folder))}
    assert "**met**" in lines["- sparse, t = 10k per step"] and "0.92×" in lines["- sparse, t = 10k per step"]
    assert "**missed**" in lines["- sparse, t = 1k per step"]
    assert "**missed**" in lines["- sparse, t = 100k per step"] and "0.40×" in lines["- sparse, t = 100k per step"]
    assert not any(key.startswith("- full") for key in lines)
    table = report.table(runs, report.read_base(folder))
    assert "| base | 0 | 0.0 | 0.0 | 70.0 | 15.00 |" in table
    assert "| full | 150 | 60.0 | 40.0 | 40.0 | 18.00 | 60.0 | 30.0 | +3.00 | 77 |" in table


def test_without_a_full_arm_the_goal_says_so(folder):
    (folder / "full.seed0.eval.jsonl").unlink()
    assert report.goal(find_runs(folder), report.read_base(folder)) == ["no `full` arm: the goal cannot be judged"]
