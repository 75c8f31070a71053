#!/usr/bin/env bash
# The [quality] experiment (docs/experiments.md): each arm for each seed, one run after the other on this machine's
# GPU (set CUDA_VISIBLE_DEVICES to pick one; start one runner per GPU with its own ARMS to use several).
#   ARMS     config stems under train_configs/ (default: the five quality_* arms)
#   SEEDS    training seeds (default: 0 1 2)
#   OUT_DIR  where each run's console log and eval results go (default /tmp/experiment)
#   RUN_DIR  the runs' dump folders (checkpoints, TensorBoard), kept apart from OUT_DIR (default /tmp/experiment_runs)
# The arms read the large corpus: build it first with
#   python -m tools.assets.build_assets --large-corpus data/large_corpus
# Extra arguments go to every run, e.g. --checkpoint.enable false. Report with
#   python -m tools.experiments.report_experiment --runs OUT_DIR
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT_DIR="${OUT_DIR:-/tmp/experiment}"
ARMS="${ARMS:-quality_dense_134m quality_memory_134m quality_dense_373m quality_memory_pkm_134m quality_memory_adamw_134m}"
SEEDS="${SEEDS:-0 1 2}"
RUN_DIR="${RUN_DIR:-/tmp/experiment_runs}"
mkdir -p "$OUT_DIR" "$RUN_DIR"
for seed in $SEEDS; do
  for arm in $ARMS; do
    name="$arm.seed$seed"
    dump="$RUN_DIR/$name"
    rm -rf "$dump"
    start=$(date +%s)
    CONFIG_FILE="$ROOT/train_configs/$arm.toml" "$ROOT/run_train.sh" --job.dump_folder "$dump" \
      --training.seed "$seed" "$@" > "$OUT_DIR/$name.log" 2>&1 || { tail -30 "$OUT_DIR/$name.log"; exit 1; }
    echo "$name: $(( $(date +%s) - start )) s wall, including start-up and evals" | tee "$OUT_DIR/$name.wall"
    if [ -f "$dump/eval/results.jsonl" ]; then
      cp "$dump/eval/results.jsonl" "$OUT_DIR/$name.eval.jsonl"
      grep -E "eval step" "$OUT_DIR/$name.log" | tail -1 | cut -c1-240
    else
      echo "$name: no eval results (is eval.interval 0?); the report leaves this run out" >&2
    fi
  done
done
