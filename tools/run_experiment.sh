#!/usr/bin/env bash
# The dense vs Memory+ recall experiment (docs/experiments.md), one arm after the other on this machine's first GPU.
#   OUT_DIR  where each arm's console log and eval results go (default /tmp/experiment)
#   RUN_DIR  the runs' dump folders (checkpoints, TensorBoard), kept apart from OUT_DIR (default /tmp/experiment_runs)
#   ARMS     config stems under train_configs/ (default: experiment_134m_dense experiment_134m_memory)
# Extra arguments go to every run, e.g. --training.steps 500. Plot with tools/plot_experiment.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${OUT_DIR:-/tmp/experiment}"
ARMS="${ARMS:-experiment_134m_dense experiment_134m_memory}"
RUN_DIR="${RUN_DIR:-/tmp/experiment_runs}"
mkdir -p "$OUT_DIR" "$RUN_DIR"
for arm in $ARMS; do
  dump="$RUN_DIR/$arm"
  rm -rf "$dump"
  start=$(date +%s)
  CONFIG_FILE="$ROOT/train_configs/$arm.toml" "$ROOT/run_train.sh" --job.dump_folder "$dump" "$@" \
    > "$OUT_DIR/$arm.log" 2>&1 || { tail -30 "$OUT_DIR/$arm.log"; exit 1; }
  echo "$arm: $(( $(date +%s) - start )) s wall, including start-up and evals"
  cp "$dump/eval/results.jsonl" "$OUT_DIR/$arm.eval.jsonl"
  grep -E "eval step|memory \|" "$OUT_DIR/$arm.log" | tail -3 | cut -c1-220
done
