"""tools/experiments/report_experiment.py on hand-made run files: recall above the floor, its average over relations
and seeds, and the success criteria, against numbers worked out by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools.experiments import report_experiment as report


def recall(seen_a, unseen_a, seen_b, unseen_b, qa=0.5, stated=0.25, unseen_qa=0.0):
    values = {"seen/train/all": 0.0, "seen/train/a": seen_a, "unseen/train/a": unseen_a, "seen/train/b": seen_b,
              "unseen/train/b": unseen_b, "seen/heldout/a": 0.1, "unseen/heldout/a": 0.0}
    for relation in ("a", "b"):
        values |= {f"seen_qa/qa/{relation}": qa, f"seen_stated/qa/{relation}": stated,
                   f"unseen/qa/{relation}": unseen_qa}
    return values


def write_run(folder: Path, arm: str, seed: int, final: dict, perplexity: float, tokens_per_second: int):
    evals = [{"step": 400, "perplexity": perplexity * 2, "recall": recall(0, 0, 0, 0)},
             {"step": 800, "perplexity": perplexity, "recall": final}]
    (folder / f"{arm}.seed{seed}.eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    (folder / f"{arm}.seed{seed}.log").write_text(
        "".join(f"[rank0] step {s:5d} | loss 2.5000 | lr 1e-4 | tok/s {tokens_per_second:,}\n" for s in (50, 100)))
    (folder / f"{arm}.seed{seed}.wall").write_text(f"{arm}.seed{seed}: 321 s wall, including start-up and evals\n")


@pytest.fixture
def runs(tmp_path):
    # dense: A = mean(0.3 - 0.1, 0.2 - 0.2) = 0.1 (seed 0) and mean(0.4 - 0.1, 0.1 - 0.1) = 0.15 (seed 1)
    write_run(tmp_path, "quality_dense_134m", 0, recall(0.3, 0.1, 0.2, 0.2), 50.0, 400_000)
    write_run(tmp_path, "quality_dense_134m", 1, recall(0.4, 0.1, 0.1, 0.1), 52.0, 410_000)
    # Memory+: A = mean(0.5, 0.1) = 0.3 and mean(0.6, 0.0) = 0.3; perplexity 51.5 and 52.0 (mean 51.75)
    write_run(tmp_path, "quality_memory_134m", 0, recall(0.6, 0.1, 0.3, 0.2), 51.5, 250_000)
    write_run(tmp_path, "quality_memory_134m", 1, recall(0.7, 0.1, 0.2, 0.2), 52.0, 260_000)
    # dense 373m: A = mean(0.8, 0.0) = 0.4, one seed
    write_run(tmp_path, "quality_dense_373m", 0, recall(0.9, 0.1, 0.3, 0.3), 40.0, 150_000)
    return report.find_runs(tmp_path)


def test_recall_above_the_floor_averages_relations_then_seeds(runs):
    assert set(runs) == {"quality_dense_134m", "quality_memory_134m", "quality_dense_373m"}
    assert report.above_floor(recall(0.3, 0.1, 0.2, 0.2), "seen", "train") == {"a": pytest.approx(0.2), "b": 0.0}
    finals = [report.final_metrics(run) for run in runs["quality_dense_134m"].values()]
    assert [f["A: training phrasing"] for f in finals] == [pytest.approx(0.1), pytest.approx(0.15)]
    assert [f["held-out phrasings"] for f in finals] == [pytest.approx(0.1)] * 2  # relation b has no held-out pair
    assert finals[0]["Q/A, trained as Q/A"] == pytest.approx(0.5)
    assert finals[0]["Q/A, stated only (transfer)"] == pytest.approx(0.25)
    means = report.arm_means(runs["quality_dense_134m"])["means"]
    assert means["A: training phrasing"] == pytest.approx(0.125)
    assert means["perplexity"] == pytest.approx(51.0)
    assert runs["quality_dense_134m"][0]["tokens_per_second"] == 400_000
    assert runs["quality_dense_134m"][0]["wall_seconds"] == 321


def test_criteria_are_judged_on_seed_means(runs):
    lines = report.criteria(runs)
    # 0.3 / 0.125 = 2.4× (met); 0.3 < 0.4 (missed); 51.75 / 51.0 = 1.0147× (met)
    assert "2.40×" in lines[0] and "**met**" in lines[0]
    assert "**missed**" in lines[1]
    assert "1.015×" in lines[2] and "**met**" in lines[2]


def test_tables_show_every_arm_with_its_spread(runs):
    table = report.summary_table(runs, {"quality_dense_134m": 7.55e8})
    dense = next(line for line in table.splitlines() if line.startswith("| dense 134m"))
    assert "12.5 [10.0–15.0] (2)" in dense and "51.00 [50.00–52.00] (2)" in dense and "7.55e+08" in dense
    relations = report.relation_table(runs)
    # Columns in the order of the runs given (file order here: dense 134m, dense 373m, Memory+ 134m).
    assert "| a | 25.0 (10.0) | 80.0 (10.0) | 55.0 (10.0) |" in relations
    assert "| b | 0.0 (15.0) | 0.0 (30.0) | 5.0 (20.0) |" in relations


def test_hostile_run_files_are_left_out_or_not_judged(tmp_path, capsys):
    # An empty eval file, an eval with no recall, a dense arm at its floor, and relations only some seeds have.
    (tmp_path / "quality_dense_373m.seed0.eval.jsonl").write_text("")
    (tmp_path / "quality_memory_pkm_134m.seed0.eval.jsonl").write_text(json.dumps({"step": 8, "perplexity": 9.0})
                                                                       + "\n")
    write_run(tmp_path, "quality_dense_134m", 0, recall(0.1, 0.1, 0.2, 0.3), 50.0, 400_000)  # A = -0.05
    write_run(tmp_path, "quality_memory_134m", 0, recall(0.5, 0.1, 0.2, 0.2), 51.0, 250_000)
    only_in_seed1 = recall(0.6, 0.1, 0.3, 0.2) | {"seen/train/c": 0.5, "unseen/train/c": 0.0}
    write_run(tmp_path, "quality_memory_134m", 1, only_in_seed1, 52.0, 260_000)
    runs = report.find_runs(tmp_path)
    assert "left out" in capsys.readouterr().err
    assert set(runs) == {"quality_dense_134m", "quality_memory_134m", "quality_memory_pkm_134m"}
    lines = report.criteria(runs)
    assert "ratio is undefined" in lines[0] and "**met**" in lines[0]  # Memory+ above its floor, dense below
    assert "not judged" in lines[1]  # no dense 373m figures
    assert report.final_metrics(runs["quality_memory_pkm_134m"][0])["A: training phrasing"] is None
    assert "| c |" in report.relation_table(runs)
    # A Memory+ arm below its floor does not pass against a dense arm below its floor.
    write_run(tmp_path, "quality_memory_134m", 0, recall(0.0, 0.2, 0.1, 0.2), 51.0, 250_000)
    write_run(tmp_path, "quality_memory_134m", 1, recall(0.0, 0.2, 0.1, 0.2), 51.0, 250_000)
    assert "**missed**" in report.criteria(report.find_runs(tmp_path))[0]
