#!/usr/bin/env bash
# Train with torchrun (through titanmem.launch, which ends a failed job with one line).
#   NGPU         processes (GPUs) on this node; default 1. Without a GPU, one CPU process.
#   CONFIG_FILE  TOML config; default train_configs/debug_model.toml
#   LOG_RANK     which local rank's output to show; default 0
# Any other arguments are config overrides, e.g. ./run_train.sh --training.steps 50
# On first use, if titanmem is not importable, it is installed into the current Python (TITANMEM_NO_INSTALL=1 skips).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"
NGPU="${NGPU:-1}"
LOG_RANK="${LOG_RANK:-0}"
CONFIG_FILE="${CONFIG_FILE:-$ROOT/train_configs/debug_model.toml}"

# Checked from the current folder, where the run starts: a checkout's root there must hold an editable install.
if ! "$PYTHON" -c "import titanmem.kernels, torch, torchdata, tiktoken, datasets, safetensors" >/dev/null 2>&1; then
  if [ "${TITANMEM_NO_INSTALL:-0}" = "1" ]; then
    echo "error: titanmem is not importable by $PYTHON and TITANMEM_NO_INSTALL=1; run tools/install.sh" >&2
    exit 1
  fi
  echo "[titanmem] first use: installing titanmem into $("$PYTHON" -c 'import sys; print(sys.prefix)') (TITANMEM_NO_INSTALL=1 skips this)"
  PYTHON="$PYTHON" "$ROOT/tools/install.sh"
fi

if [ "$NGPU" != "1" ] && ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "error: NGPU=$NGPU but no GPU is visible; on CPU run with NGPU=1" >&2
  exit 1
fi

# Check the config in this process first: an error is then one clear line, not buried under torchrun's traceback.
WORLD_SIZE="$NGPU" "$PYTHON" -m titanmem.train --job.config_file "$CONFIG_FILE" "$@" --print_config >/dev/null || exit $?

exec "$PYTHON" -m titanmem.launch --standalone --nproc_per_node="$NGPU" \
  --local-ranks-filter "$LOG_RANK" --role rank --tee 3 \
  -m titanmem.train --job.config_file "$CONFIG_FILE" "$@"
