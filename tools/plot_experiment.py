"""Plot the dense vs Memory+ experiment from the files tools/run_experiment.sh leaves (<arm>.log, <arm>.eval.jsonl):
loss curves and fact recall against steps, as PNG, plus a markdown table of the final numbers.

    pip install -e ".[plot]"   # matplotlib: only this tool needs it
    python tools/plot_experiment.py --runs /tmp/experiment --out docs/experiments
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

STEP_LINE = re.compile(r"step +(\d+) \| loss ([\d.]+) .*?tok/s ([\d,]+)")
ARM_LABELS = {"experiment_134m_dense": "dense 134m", "experiment_134m_memory": "Memory+ 134m"}


def read_arm(folder: Path, arm: str) -> dict:
    losses = {}
    speeds = []
    for line in (folder / f"{arm}.log").read_text().splitlines():
        match = STEP_LINE.search(line)
        if match:
            step = int(match.group(1))
            losses[step] = float(match.group(2))
            speeds.append(float(match.group(3).replace(",", "")))
    evals = [json.loads(line) for line in (folder / f"{arm}.eval.jsonl").read_text().splitlines() if line.strip()]
    return {"losses": losses, "evals": evals, "tokens_per_second": speeds[-1] if speeds else None}


def plot(arms: dict[str, dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for color, (arm, data) in zip(("tab:blue", "tab:red", "tab:green", "tab:purple"), arms.items()):
        steps = sorted(data["losses"])
        axis.plot(steps, [data["losses"][s] for s in steps], color=color, label=ARM_LABELS.get(arm, arm))
    axis.set(xlabel="step", ylabel="training loss", title="Training loss (same tokens, same order)")
    axis.grid(alpha=0.3)
    axis.legend()
    loss_path = out / "loss.png"
    figure.tight_layout()
    figure.savefig(loss_path, dpi=120)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(7, 4.5))
    styles = {"seen/train": "-", "seen/heldout": "--", "unseen/train": ":"}
    for color, (arm, data) in zip(("tab:blue", "tab:red", "tab:green", "tab:purple"), arms.items()):
        for key, style in styles.items():
            points = [(e["step"], e["recall"].get(f"{key}/all")) for e in data["evals"]]
            points = [(s, 100 * v) for s, v in points if v is not None]
            if points:
                axis.plot(*zip(*points), style, color=color, marker="o", label=f"{ARM_LABELS.get(arm, arm)}: {key}")
    axis.set(xlabel="step", ylabel="exact-match recall (%)", title="Fact recall (greedy completion)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    recall_path = out / "recall.png"
    figure.tight_layout()
    figure.savefig(recall_path, dpi=120)
    plt.close(figure)
    return [loss_path, recall_path]


def table(arms: dict[str, dict]) -> str:
    rows = ["| model | final loss | held-out perplexity | recall seen, training template | recall seen, held-out "
            "phrasings | recall unseen, training template | tokens/s |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for arm, data in arms.items():
        last = data["evals"][-1]
        recall = last["recall"]

        def pct(key):
            return f"{100 * recall[key]:.1f}%" if key in recall else "n/a"

        final_step = max(data["losses"])
        rows.append(f"| {ARM_LABELS.get(arm, arm)} | {data['losses'][final_step]:.4f} | {last['perplexity']:.2f} | "
                    f"{pct('seen/train/all')} | {pct('seen/heldout/all')} | {pct('unseen/train/all')} | "
                    f"{data['tokens_per_second'] or 0:,.0f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, required=True, help="OUT_DIR of tools/run_experiment.sh")
    parser.add_argument("--out", type=Path, default=Path("docs/experiments"), help="folder for the PNGs")
    parser.add_argument("--arms", nargs="+", default=list(ARM_LABELS), help="config stems to compare")
    args = parser.parse_args()
    arms = {arm: read_arm(args.runs, arm) for arm in args.arms}
    for path in plot(arms, args.out):
        print(f"wrote {path}")
    print(table(arms))


if __name__ == "__main__":
    main()
