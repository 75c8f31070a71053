#!/usr/bin/env bash
# The parallel plans of one model on this host's GPUs: each run's per-GPU tokens/s, peak memory and first losses,
# against the 1-GPU run of the same model and per-GPU batch in the same session.
#   CONFIG_FILE  default train_configs/llama_134m_memory.toml
#   STEPS        default 60 (tokens/s is the window of the last log_freq steps)
#   PLANS        space-separated "name:overrides" (overrides joined by ','), default: 1 GPU, FSDP=2, MP=2, TP=2
# Writes each run's log to $OUT_DIR (default /tmp/bench_parallel) and prints a markdown table.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CONFIG_FILE="${CONFIG_FILE:-$ROOT/train_configs/llama_134m_memory.toml}"
STEPS="${STEPS:-60}"
LOG_FREQ="${LOG_FREQ:-20}"
OUT_DIR="${OUT_DIR:-/tmp/bench_parallel}"
PLANS="${PLANS:-1gpu:1: fsdp2:2:--parallelism.dp_shard,2 mp2:2:--parallelism.mp,2 tp2:2:--parallelism.tp,2}"
mkdir -p "$OUT_DIR"
echo "| plan | GPUs | tokens/s per GPU | vs 1 GPU | peak memory (GiB) | losses at steps 1, 2, 3 | last loss |"
echo "| --- | --- | --- | --- | --- | --- | --- |"
base=""
for plan in $PLANS; do
  name="${plan%%:*}"; rest="${plan#*:}"; ngpu="${rest%%:*}"; overrides="${rest#*:}"
  log="$OUT_DIR/$name.log"
  # shellcheck disable=SC2086
  if ! NGPU="$ngpu" CONFIG_FILE="$CONFIG_FILE" LOG_RANK=0 "$ROOT/run_train.sh" --training.steps "$STEPS" \
      --metrics.log_freq 1 --checkpoint.enable false --metrics.enable_tensorboard false \
      --job.dump_folder "$OUT_DIR/$name" ${overrides//,/ } >"$log" 2>&1; then
    echo "| $name | $ngpu | failed: see $log | | | | |"; tail -30 "$log" >&2; continue
  fi
  # tokens/s: mean of the per-step figures over the last LOG_FREQ steps (log_freq 1 logs every step).
  read -r tps mem first last < <(python3 - "$log" "$LOG_FREQ" <<'PY'
import re, sys
lines = [l for l in open(sys.argv[1]) if re.search(r"step +\d+ \| loss", l)]
rows = []
for l in lines:
    step = int(re.search(r"step +(\d+)", l).group(1))
    loss = float(re.search(r"loss ([\d.]+)", l).group(1))
    tps = float(re.search(r"tok/s ([\d,]+)", l).group(1).replace(",", ""))
    mem = re.search(r"mem ([\d.]+) GiB", l)
    rows.append((step, loss, tps, float(mem.group(1)) if mem else 0.0))
window = rows[-int(sys.argv[2]):]
print(f"{sum(r[2] for r in window) / len(window):.0f} {max(r[3] for r in rows):.2f} "
      f"{','.join(f'{r[1]:.4f}' for r in rows[:3])} {rows[-1][1]:.4f}")
PY
)
  [ -z "$base" ] && base="$tps"
  ratio=$(python3 -c "print(f'{$tps / $base:.2f}')")
  echo "| $name | $ngpu | $tps | ${ratio}× | $mem | ${first//,/, } | $last |"
done
