"""Report the [quality] experiment from the files run_experiment.sh (beside it) leaves (<arm>.seed<k>.log, .eval.jsonl,
.wall): the protocol's metrics per arm as a mean over seeds with their min-max spread, the success criteria met or
missed, per-relation recall above the floor, and plots (PNG): recall and perplexity against steps, recall above the
floor per relation in three phrasings, and recall against FLOPs per token and wall time.

    pip install -e ".[plot]"   # matplotlib: only the plots need it
    python -m tools.experiments.report_experiment --runs /tmp/quality --out docs/experiments/quality

Recall above the floor, for one relation and phrasing, is the recall on the seen facts minus the same model's recall
on the unseen facts. A is its average over the relations in the training phrasing (docs/experiments.md).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path


STEP_LINE = re.compile(r"step +(\d+) \| loss ([\d.]+) .*?tok/s ([\d,]+)")
RUN_FILE = re.compile(r"(?P<arm>.+)\.seed(?P<seed>\d+)\.eval\.jsonl")
ARMS = {
    "quality_dense_134m": "dense 134m",
    "quality_memory_134m": "Memory+ 134m",
    "quality_dense_373m": "dense 373m",
    "quality_memory_pkm_134m": "PKM 134m",
    "quality_memory_adamw_134m": "Memory+ 134m, AdamW values",
}
# (name in the tables, split of the seen facts, phrasing): each is read against unseen facts in the same phrasing.
MEASURES = (("A: training phrasing", "seen", "train"), ("held-out phrasings", "seen", "heldout"),
            ("Q/A, trained as Q/A", "seen_qa", "qa"), ("Q/A, stated only (transfer)", "seen_stated", "qa"))


def above_floor(recall: dict[str, float], split: str, phrasing: str) -> dict[str, float]:
    """Per relation: recall of `split` facts minus recall of unseen facts, in `phrasing` (relations with both)."""
    relations = {key.split("/")[2] for key in recall if key.count("/") == 2} - {"all"}
    return {relation: recall[f"{split}/{phrasing}/{relation}"] - recall[f"unseen/{phrasing}/{relation}"]
            for relation in sorted(relations)
            if f"{split}/{phrasing}/{relation}" in recall and f"unseen/{phrasing}/{relation}" in recall}


def macro_average(values: dict[str, float]) -> float | None:
    return statistics.fmean(values.values()) if values else None


def read_run(folder: Path, arm: str, seed: int) -> dict:
    name = f"{arm}.seed{seed}"
    evals = [json.loads(line) for line in (folder / f"{name}.eval.jsonl").read_text().splitlines() if line.strip()]
    for evaluation in evals:
        evaluation.setdefault("recall", {})
    log = folder / f"{name}.log"
    speeds = [float(m.group(3).replace(",", "")) for m in map(STEP_LINE.search, log.read_text().splitlines()) if m] \
        if log.exists() else []
    wall = folder / f"{name}.wall"
    seconds = re.search(r": (\d+) s wall", wall.read_text()) if wall.exists() else None
    return {"evals": evals, "tokens_per_second": statistics.median(speeds[len(speeds) // 2:]) if speeds else None,
            "wall_seconds": int(seconds.group(1)) if seconds else None}


def find_runs(folder: Path) -> dict[str, dict[int, dict]]:
    """Every run with at least one evaluation, by arm and seed; the others are named on stderr and left out."""
    runs: dict[str, dict[int, dict]] = {}
    for path in sorted(folder.glob("*.eval.jsonl")):
        match = RUN_FILE.fullmatch(path.name)
        if match:
            run = read_run(folder, match["arm"], int(match["seed"]))
            if run["evals"]:
                runs.setdefault(match["arm"], {})[int(match["seed"])] = run
            else:
                print(f"warning: {path} holds no evaluation; left out", file=sys.stderr)
    return runs


def in_order(runs: dict[str, dict], names: dict[str, str]) -> dict[str, dict]:
    """`runs` with the arms of `names` first, in its order, then any others by name."""
    return {arm: runs[arm] for arm in [*[a for a in names if a in runs], *sorted(set(runs) - set(names))]}


def final_metrics(run: dict) -> dict:
    last = run["evals"][-1]
    metrics = {"step": last["step"], "perplexity": last["perplexity"]}
    for name, split, phrasing in MEASURES:
        metrics[name] = macro_average(above_floor(last["recall"], split, phrasing))
    return metrics


def spread(values: list[float | None], scale: float = 1.0, digits: int = 1) -> str:
    """ "mean [min–max] (n)" over the seeds that have the value."""
    present = [v * scale for v in values if v is not None]
    if not present:
        return "n/a"
    text = f"{statistics.fmean(present):.{digits}f}"
    if len(present) > 1:
        text += f" [{min(present):.{digits}f}–{max(present):.{digits}f}]"
    return f"{text} ({len(present)})"


def arm_means(runs: dict[int, dict]) -> dict:
    """Per metric, the mean over the seeds that have it (None if none has)."""
    finals = [final_metrics(run) for run in runs.values()]
    means = {}
    for key in finals[0]:
        present = [f[key] for f in finals if f[key] is not None]
        means[key] = statistics.fmean(present) if present else None
    return {"finals": finals, "means": means}


def flops_per_token(arm: str) -> float | None:
    """FLOPs per token of an arm's config, counted on a meta-device model (None if titanmem cannot build it)."""
    try:
        import torch

        from titanmem.config import build_config
        from titanmem.models.accounting import count_parameters, flops_per_token as count_flops
        from titanmem.models.llama import Transformer
        from titanmem.plan import resolve_plan
    except ImportError:
        return None
    config_path = Path(__file__).resolve().parents[2] / "train_configs" / f"{arm}.toml"
    if not config_path.is_file():
        return None
    config, _ = build_config(["--job.config_file", str(config_path)])
    plan = resolve_plan(config, "dry_run", world_size=1, device_type="cuda", tokenizer_vocab_size=4097)
    with torch.device("meta"):
        counts = count_parameters(Transformer(plan.model_args))
    return float(count_flops(plan.model_args, counts, config.training.seq_len))


def summary_table(runs: dict[str, dict[int, dict]], flops: dict[str, float | None]) -> str:
    header = ["arm", "seeds", "step", *[f"{name} (points)" for name, _, _ in MEASURES], "held-out perplexity",
              "tokens/s", "wall (s)", "FLOPs per token"]
    rows = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for arm, by_seed in runs.items():
        finals = [final_metrics(run) for run in by_seed.values()]
        # The step of each seed's last eval: a run cut short shows here rather than being averaged in silently.
        cells = [ARMS.get(arm, arm), ", ".join(str(s) for s in sorted(by_seed)),
                 "/".join(sorted({str(f["step"]) for f in finals}))]
        cells += [spread([f[name] for f in finals], 100) for name, _, _ in MEASURES]
        cells.append(spread([f["perplexity"] for f in finals], digits=2))
        cells.append(spread([run["tokens_per_second"] for run in by_seed.values()], digits=0))
        cells.append(spread([run["wall_seconds"] for run in by_seed.values()], digits=0))
        cells.append(f"{flops[arm]:.3g}" if flops.get(arm) else "n/a")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def relation_table(runs: dict[str, dict[int, dict]]) -> str:
    """Recall above the floor per relation in the training phrasing (points, mean over seeds), and each arm's floor."""
    per_arm = {}
    for arm, by_seed in runs.items():
        tables = [above_floor(run["evals"][-1]["recall"], "seen", "train") for run in by_seed.values()]
        floors = [{k.split("/")[2]: v for k, v in run["evals"][-1]["recall"].items() if k.startswith("unseen/train/")}
                  for run in by_seed.values()]
        relations = set().union(*tables, *floors)
        per_arm[arm] = ({r: statistics.fmean(t[r] for t in tables if r in t) for r in relations
                         if any(r in t for t in tables)},
                        {r: statistics.fmean(f[r] for f in floors if r in f) for r in relations
                         if any(r in f for f in floors)})
    relations = sorted({r for table, _ in per_arm.values() for r in table})
    header = ["relation", *[f"{ARMS.get(arm, arm)} (floor)" for arm in per_arm]]
    rows = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for relation in relations:
        cells = [relation]
        for table, floors in per_arm.values():
            cells.append(f"{100 * table[relation]:.1f} ({100 * floors[relation]:.1f})" if relation in table else "n/a")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def criteria(runs: dict[str, dict[int, dict]]) -> list[str]:
    """The protocol's three success criteria on seed means, each met, missed, or not judged where a number is
    missing."""
    means = {arm: arm_means(by_seed)["means"] for arm, by_seed in runs.items()}
    memory, dense, large = (means.get(k) or {} for k in ("quality_memory_134m", "quality_dense_134m",
                                                         "quality_dense_373m"))
    key = MEASURES[0][0]

    def points(arm_means_: dict) -> str:
        return f"{100 * arm_means_[key]:.1f}" if arm_means_.get(key) is not None else "n/a"

    lines = []
    a_memory, a_dense, a_large = memory.get(key), dense.get(key), large.get(key)
    if a_memory is None or a_dense is None:
        verdict = "not judged: a number is missing"
    elif a_dense <= 0:
        # Twice a non-positive number is no bar: only a positive Memory+ figure over a non-positive dense one meets it.
        verdict = "met" if a_memory > 0 else "missed"
        verdict = f"**{verdict}** (dense is at or below its floor, so the ratio is undefined)"
    else:
        verdict = f"{a_memory / a_dense:.2f}×: **{'met' if a_memory >= 2 * a_dense else 'missed'}**"
    lines.append(f"1. A(Memory+ 134m) = {points(memory)} points against A(dense 134m) = {points(dense)}, target ≥ 2×: "
                 f"{verdict}")
    verdict = ("not judged: a number is missing" if a_memory is None or a_large is None
               else f"**{'met' if a_memory >= a_large else 'missed'}**")
    lines.append(f"2. A(Memory+ 134m) = {points(memory)} against A(dense 373m) = {points(large)}: {verdict}")
    p_memory, p_dense = memory.get("perplexity"), dense.get("perplexity")
    if p_memory is None or p_dense is None:
        lines.append("3. held-out perplexity: not judged: a number is missing")
    else:
        ratio = p_memory / p_dense
        lines.append(f"3. held-out perplexity {p_memory:.2f} against {p_dense:.2f} ({ratio:.3f}×; target ≤ 1.02×): "
                     f"**{'met' if ratio <= 1.02 else 'missed'}**")
    return lines


# The phrasings of the per-relation plot: (title, split of the seen facts, phrasing).
RELATION_PANELS = (("training phrasing", "seen", "train"), ("held-out phrasings", "seen", "heldout"),
                   ("Q/A, facts trained as Q/A", "seen_qa", "qa"))


def plot(runs: dict[str, dict[int, dict]], flops: dict[str, float | None], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, ylabel, value in (
        ("recall_above_floor.png", "recall above the floor, training phrasing (points)",
         lambda e: None if (a := macro_average(above_floor(e["recall"], "seen", "train"))) is None else 100 * a),
        ("perplexity.png", "held-out perplexity", lambda e: e["perplexity"]),
    ):
        figure, axis = plt.subplots(figsize=(7, 4.5))
        for arm, by_seed in runs.items():
            steps = sorted({e["step"] for run in by_seed.values() for e in run["evals"]})
            series = [[v for run in by_seed.values() for e in run["evals"] if e["step"] == s
                       if (v := value(e)) is not None] for s in steps]
            steps, series = zip(*[(s, v) for s, v in zip(steps, series) if v]) if any(series) else ((), ())
            mean = [statistics.fmean(v) for v in series]
            line, = axis.plot(steps, mean, marker="o", label=ARMS.get(arm, arm))
            axis.fill_between(steps, [min(v) for v in series], [max(v) for v in series], color=line.get_color(),
                              alpha=0.15)
        axis.set(xlabel="step", ylabel=ylabel, title="mean over seeds, band: min to max")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(out / name, dpi=120)
        plt.close(figure)
        paths.append(out / name)
    paths.append(_plot_relations(plt, runs, out / "recall_per_relation.png"))
    paths.append(_plot_compute(plt, runs, flops, out / "recall_vs_compute.png"))
    return paths


def _whiskers(values: list[float]) -> tuple[float, float, float]:
    """(mean - min, mean, max - mean), never below 0: matplotlib's error bars, where rounding could make it so."""
    mean = statistics.fmean(values)
    return max(0.0, mean - min(values)), mean, max(0.0, max(values) - mean)


def _plot_relations(plt, runs: dict[str, dict[int, dict]], path: Path) -> Path:
    """Grouped bars: per relation and arm, recall above the floor at the last eval (mean, whiskers min to max)."""
    relations = sorted({r for by_seed in runs.values() for run in by_seed.values()
                        for r in above_floor(run["evals"][-1]["recall"], "seen", "train")})
    figure, axes = plt.subplots(len(RELATION_PANELS), 1, figsize=(12, 3.2 * len(RELATION_PANELS)), sharex=True)
    width = 0.8 / len(runs)
    for axis, (title, split, phrasing) in zip(axes, RELATION_PANELS):
        for index, (arm, by_seed) in enumerate(runs.items()):
            per_seed = [above_floor(run["evals"][-1]["recall"], split, phrasing) for run in by_seed.values()]
            xs, low, mean, high = [], [], [], []
            for position, relation in enumerate(relations):
                values = [100 * table[relation] for table in per_seed if relation in table]
                if values:
                    below, mid, above = _whiskers(values)
                    xs.append(position + (index - (len(runs) - 1) / 2) * width)
                    low.append(below), mean.append(mid), high.append(above)
            axis.bar(xs, mean, width, yerr=[low, high], capsize=2, label=ARMS.get(arm, arm))
        axis.axhline(0, color="black", linewidth=0.6)
        axis.set(ylabel="points above floor", title=title)
        axis.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8, ncol=len(runs))
    axes[-1].set_xticks(range(len(relations)), relations, rotation=30, ha="right")
    figure.suptitle("recall above the floor per relation at the last eval (mean over seeds, whiskers: min to max)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _plot_compute(plt, runs: dict[str, dict[int, dict]], flops: dict[str, float | None], path: Path) -> Path:
    """A at the last eval against each arm's FLOPs per token (the arms train on equal tokens) and its wall time."""
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for arm, by_seed in runs.items():
        scores = [100 * f["A: training phrasing"] for f in map(final_metrics, by_seed.values())
                  if f["A: training phrasing"] is not None]
        walls = [run["wall_seconds"] for run in by_seed.values() if run["wall_seconds"] is not None]
        if not scores:
            continue
        below, mid, above = _whiskers(scores)
        for axis, x in ((axes[0], flops.get(arm)), (axes[1], statistics.fmean(walls) if walls else None)):
            if x is not None:
                axis.errorbar([x], [mid], yerr=[[below], [above]], marker="o", capsize=3,
                              label=ARMS.get(arm, arm))
    axes[0].set(xscale="log", xlabel="FLOPs per token (equal tokens for every arm)")
    axes[1].set(xlabel="wall time per run (s), mean over seeds, with evals")
    for axis in axes:
        axis.set(ylabel="A: recall above the floor (points)")
        axis.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    figure.suptitle("A at the last eval against compute (mean over seeds, whiskers: min to max)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, required=True, help="OUT_DIR of tools/experiments/run_experiment.sh")
    parser.add_argument("--out", type=Path, default=None, help="folder for the PNGs (none: no plots)")
    args = parser.parse_args()
    runs = find_runs(args.runs)
    if not runs:
        sys.exit(f"error: no <arm>.seed<k>.eval.jsonl files in {args.runs}")
    runs = in_order(runs, ARMS)
    flops = {arm: flops_per_token(arm) for arm in runs}
    print(summary_table(runs, flops), "", relation_table(runs), "", *criteria(runs), sep="\n")
    if args.out is not None:
        for path in plot(runs, flops, args.out):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
