#!/usr/bin/env bash
# The [finetune] experiment (docs/experiments.md, "Sparse memory finetuning"), in two phases on this machine's GPU
# (set CUDA_VISIBLE_DEVICES to pick one):
#   tools/experiments/run_finetune_experiment.sh prepare
#       pretrain the base (the quality experiment's Memory+ 134m, seed 0), count its reads, build the new-facts
#       corpus, evaluate the base (= the phases base, then base_eval; on two GPUs, base_eval may run on the second
#       once the base's checkpoint exists, while the first counts)
#   tools/experiments/run_finetune_experiment.sh arms
#       finetune each arm from the base (after prepare; two runners on two GPUs may split ARMS)
# Settings (environment):
#   OUT_DIR   results: each arm's log, eval results and wall time, the base's eval, the counts (default /tmp/finetune)
#   RUN_DIR   dump folders: the base's checkpoint and the arms' runs (default /tmp/finetune_runs)
#   ARMS      arms to run (default: all, in the order below)
#   BASE_CONFIG  the base's pretraining config (default train_configs/quality_memory_134m.toml)
#   BASE_STEPS   the base's pretraining steps (default 1600, as in its protocol)
#   COMMON_ARGS  config overrides for every run of both phases (e.g. a small model for a dry run on CPU)
#   WAIT_FOR_BASE=1  base_eval and arms wait for the base (its checkpoint, its counts) that another runner prepares
# Extra arguments go to every finetuning run. Report with
#   python -m tools.experiments.report_finetune --runs OUT_DIR
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-python3}"
OUT_DIR="${OUT_DIR:-/tmp/finetune}"
RUN_DIR="${RUN_DIR:-/tmp/finetune_runs}"
BASE_CONFIG="${BASE_CONFIG:-$ROOT/train_configs/quality_memory_134m.toml}"
CONFIG="$ROOT/train_configs/finetune_memory_134m.toml"
BASE_STEPS="${BASE_STEPS:-1600}"
read -r -a COMMON <<< "${COMMON_ARGS:-}"
BASE="$RUN_DIR/base/checkpoint/step-$BASE_STEPS"
CORPUS="$ROOT/data/new_facts.jsonl"
declare -A ARM_ARGS=(
  [full]="--finetune.mode full"
  [values_only]="--finetune.mode values_only"
  [sparse_t1k]="--finetune.mode sparse_memory --finetune.top_t 1000"
  [sparse_t10k]="--finetune.mode sparse_memory --finetune.top_t 10000"
  [sparse_t100k]="--finetune.mode sparse_memory --finetune.top_t 100000"
  [sparse_dataset_t10k]="--finetune.mode sparse_memory --finetune.top_t 10000 --finetune.selection per_dataset"
)
ARMS="${ARMS:-full values_only sparse_t1k sparse_t10k sparse_t100k sparse_dataset_t10k}"
mkdir -p "$OUT_DIR" "$RUN_DIR"
phase="${1:-}"
shift || true

timed() {  # name, command...: run it, keep its console log and wall time in OUT_DIR
  local name="$1" start
  shift
  start=$(date +%s)
  "$@" > "$OUT_DIR/$name.log" 2>&1 || { tail -30 "$OUT_DIR/$name.log"; exit 1; }
  echo "$name: $(( $(date +%s) - start )) s wall, including start-up and evals" | tee "$OUT_DIR/$name.wall"
}

case "$phase" in
  prepare)
    "${BASH_SOURCE[0]}" base
    "${BASH_SOURCE[0]}" base_eval
    ;;
  base)
    [ -f "$CORPUS" ] || "$PYTHON" -m titanmem.build_finetune_facts --out "$CORPUS"
    if [ ! -d "$BASE" ]; then
      # The quality arm as its protocol ran it, with its last checkpoint kept and no evals (the base's is below).
      timed base_pretrain env CONFIG_FILE="$BASE_CONFIG" "$ROOT/run_train.sh" --job.dump_folder "$RUN_DIR/base" \
        --training.seed 0 --training.steps "$BASE_STEPS" --eval.interval 0 --checkpoint.interval "$BASE_STEPS" \
        "${COMMON[@]}"
    fi
    # Background: 100 batches of the pretraining data (3.3M tokens); the finetuning set: 25 batches (one pass).
    # The dataset counts come last: a runner waiting for the base (WAIT_FOR_BASE) waits for them.
    rm -f "$OUT_DIR/background.safetensors" "$OUT_DIR/dataset.safetensors"
    for counts in "background $BASE_CONFIG 100" "dataset $CONFIG 25"; do
      set -- $counts
      timed "counts_$1" "$PYTHON" -m titanmem.count_memory_reads --out "$OUT_DIR/$1.safetensors" --batches "$3" \
        --job.config_file "$2" --checkpoint.initial_load_path "$BASE" --job.dump_folder "$RUN_DIR/counting" \
        "${COMMON[@]}"
    done
    ;;
  base_eval)
    while [ "${WAIT_FOR_BASE:-0}" = 1 ] && [ ! -d "$BASE" ]; do sleep 5; done
    rm -rf "$OUT_DIR/base_eval"
    timed base "$PYTHON" -m titanmem.eval --job.config_file "$CONFIG" --checkpoint.initial_load_path "$BASE" \
      --eval.results_folder "$OUT_DIR/base_eval" --job.dump_folder "$RUN_DIR/base_eval" "${COMMON[@]}"
    cp "$OUT_DIR/base_eval/results.jsonl" "$OUT_DIR/base.eval.jsonl"
    ;;
  arms)
    for arm in $ARMS; do
      [ -n "${ARM_ARGS[$arm]:-}" ] || { echo "error: unknown arm $arm; arms: ${!ARM_ARGS[*]}" >&2; exit 1; }
    done
    # The dataset counts are written last, after the base's checkpoint: a second runner may start while the first
    # still counts.
    while [ "${WAIT_FOR_BASE:-0}" = 1 ] && [ ! -f "$OUT_DIR/dataset.safetensors" ]; do sleep 5; done
    [ -d "$BASE" ] && [ -f "$OUT_DIR/dataset.safetensors" ] || { echo "error: run the prepare phase first" >&2; exit 1; }
    for arm in $ARMS; do
      rm -rf "$RUN_DIR/$arm"
      # shellcheck disable=SC2086
      timed "$arm.seed0" env CONFIG_FILE="$CONFIG" "$ROOT/run_train.sh" --job.dump_folder "$RUN_DIR/$arm" \
        --checkpoint.initial_load_path "$BASE" --finetune.background_counts "$OUT_DIR/background.safetensors" \
        --finetune.dataset_counts "$OUT_DIR/dataset.safetensors" ${ARM_ARGS[$arm]} "${COMMON[@]}" "$@"
      cp "$RUN_DIR/$arm/eval/results.jsonl" "$OUT_DIR/$arm.seed0.eval.jsonl"
    done
    ;;
  *)
    echo "usage: $0 prepare|base|base_eval|arms [config overrides for the finetuning runs]" >&2
    exit 2
    ;;
esac
