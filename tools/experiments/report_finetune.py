"""Report the [finetune] experiment from the files run_finetune_experiment.sh (beside it) leaves (base.eval.jsonl, and
<arm>.seed0.log, .eval.jsonl, .wall per arm): learning and forgetting per arm and eval step, the goal met or missed
for each sparse_memory arm, and plots (PNG) against steps.

    python -m tools.experiments.report_finetune --runs /tmp/finetune --out docs/experiments/finetune

Per eval, as averages over the relations (each relation counts once, as in the [quality] report):
- new: recall of the facts the base never saw (`unseen/...`), in the training phrasing and as Q/A;
- old: recall of the facts the base was pretrained on (`seen/...`), training phrasing;
- held-out perplexity of the pretraining corpus.
Learned = new − the base's new; forgetting = the base's old − old, and perplexity − the base's perplexity.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tools.experiments.report_experiment import find_runs, in_order, macro_average

ARMS = {
    "full": "full",
    "values_only": "values only",
    "sparse_t1k": "sparse, t = 1k per step",
    "sparse_t10k": "sparse, t = 10k per step",
    "sparse_t100k": "sparse, t = 100k per step",
    "sparse_dataset_t10k": "sparse, t = 10k per dataset",
}
# The goal: a sparse arm learns at least this share of what `full` learns ...
LEARNED_SHARE = 0.9
# ... with at most this share of its forgetting, on each forgetting measure.
FORGETTING_SHARE = 1 / 3


def relation_recall(recall: dict[str, float], split: str, phrasing: str) -> float | None:
    prefix = f"{split}/{phrasing}/"
    return macro_average({k: v for k, v in recall.items() if k.startswith(prefix) and not k.endswith("/all")})


def measures(evaluation: dict) -> dict[str, float | None]:
    recall = evaluation.get("recall", {})
    return {"new": relation_recall(recall, "unseen", "train"), "new_qa": relation_recall(recall, "unseen", "qa"),
            "old": relation_recall(recall, "seen", "train"), "perplexity": evaluation["perplexity"]}


def read_base(folder: Path) -> dict:
    lines = [line for line in (folder / "base.eval.jsonl").read_text().splitlines() if line.strip()]
    if not lines:
        sys.exit(f"error: {folder / 'base.eval.jsonl'} holds no evaluation")
    return measures(json.loads(lines[-1]))


def effects(final: dict, base: dict) -> dict[str, float]:
    """What an arm learned and forgot, against the base (points of recall, and perplexity)."""
    return {"learned": 100 * (final["new"] - base["new"]), "learned_qa": 100 * (final["new_qa"] - base["new_qa"]),
            "forgot": 100 * (base["old"] - final["old"]), "perplexity_rise": final["perplexity"] - base["perplexity"]}


def table(runs: dict, base: dict) -> str:
    header = ["arm", "step", "new facts (train phrasing)", "new facts (Q/A)", "old facts", "held-out perplexity",
              "learned (points)", "old-fact recall lost (points)", "perplexity rise", "wall (s)"]
    rows = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    rows.append(f"| base | 0 | {100 * base['new']:.1f} | {100 * base['new_qa']:.1f} | {100 * base['old']:.1f} | "
                f"{base['perplexity']:.2f} | | | | |")
    for arm, by_seed in runs.items():
        run = by_seed[min(by_seed)]
        for evaluation in run["evals"]:
            m, e = measures(evaluation), effects(measures(evaluation), base)
            rows.append(f"| {ARMS.get(arm, arm)} | {evaluation['step']} | {100 * m['new']:.1f} | "
                        f"{100 * m['new_qa']:.1f} | {100 * m['old']:.1f} | {m['perplexity']:.2f} | "
                        f"{e['learned']:.1f} | {e['forgot']:.1f} | {e['perplexity_rise']:+.2f} | "
                        f"{run['wall_seconds'] if evaluation is run['evals'][-1] else ''} |")
    return "\n".join(rows)


def goal(runs: dict, base: dict) -> list[str]:
    """Each sparse arm against `full` at their last evals: learned ≥ 90% of full's, forgetting ≤ 1/3 of full's."""
    if "full" not in runs:
        return ["no `full` arm: the goal cannot be judged"]
    full = effects(measures(runs["full"][min(runs["full"])]["evals"][-1]), base)
    lines = []
    for arm, by_seed in runs.items():
        if not arm.startswith("sparse"):
            continue
        e = effects(measures(by_seed[min(by_seed)]["evals"][-1]), base)
        learned = e["learned"] / full["learned"] if full["learned"] > 0 else float("nan")
        checks = [learned >= LEARNED_SHARE]
        parts = [f"learned {e['learned']:.1f} points, {learned:.2f}× full's {full['learned']:.1f}"]
        for key, what in (("forgot", "old-fact recall lost"), ("perplexity_rise", "perplexity rise")):
            if full[key] > 0:
                share = e[key] / full[key]
                checks.append(share <= FORGETTING_SHARE)
                parts.append(f"{what} {e[key]:.2f}, {share:.2f}× full's {full[key]:.2f}")
            else:
                checks.append(e[key] <= 0)
                parts.append(f"{what} {e[key]:.2f} (full's is {full[key]:.2f}, no forgetting to compare with)")
        verdict = "met" if all(checks) else "missed"
        lines.append(f"- {ARMS.get(arm, arm)}: {'; '.join(parts)}: **{verdict}**")
    return lines


def plot(runs: dict, base: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    panels = (("new", "new facts, training phrasing (%)", 100), ("new_qa", "new facts, Q/A (%)", 100),
              ("old", "old facts, training phrasing (%)", 100), ("perplexity", "held-out perplexity", 1))
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4))
    for arm, by_seed in runs.items():
        evals = by_seed[min(by_seed)]["evals"]
        steps = [0] + [e["step"] for e in evals]
        for axis, (key, label, scale) in zip(axes, panels):
            axis.plot(steps, [scale * base[key]] + [scale * measures(e)[key] for e in evals], marker="o",
                      label=ARMS.get(arm, arm))
            axis.set(xlabel="finetuning step", ylabel=label)
            axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.suptitle("finetuning Memory+ 134m on the unseen facts: learning (left) and forgetting (right)")
    figure.tight_layout()
    path = out / "learning_and_forgetting.png"
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, required=True, help="OUT_DIR of run_finetune_experiment.sh")
    parser.add_argument("--out", type=Path, default=None, help="folder for the PNG (none: no plot)")
    args = parser.parse_args()
    if not (args.runs / "base.eval.jsonl").is_file():
        sys.exit(f"error: no base.eval.jsonl in {args.runs}; run the prepare phase")
    base = read_base(args.runs)
    runs = find_runs(args.runs)
    if not runs:
        sys.exit(f"error: no <arm>.seed0.eval.jsonl files in {args.runs}")
    runs = in_order(runs, ARMS)
    print(table(runs, base), "", *goal(runs, base), sep="\n")
    if args.out is not None:
        print(f"wrote {plot(runs, base, args.out)}")


if __name__ == "__main__":
    main()
