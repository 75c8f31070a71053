#!/usr/bin/env bash
# Train on several nodes: run this once on every node (Slurm: launch/slurm.sbatch does), with the same settings.
#   NNODES         nodes in the job; default 1
#   NGPU           processes (GPUs) per node; default 8, or 1 on a machine without a GPU (CPU ranks use gloo)
#   RDZV_ENDPOINT  host:port of the c10d rendezvous, reachable from every node (e.g. the first node's, port 29500)
#   RDZV_ID        the job's id, the same on every node, e.g. $SLURM_JOB_ID; a requeued job reuses it and so takes
#                  its dump folder's lock back at once
#   NODE_RANK      this node's rank (optional: without it, the rendezvous assigns ranks)
#   CONFIG_FILE    TOML config; default train_configs/debug_model.toml
#   LOG_RANK       which local ranks' output to show; default 0 (only node 0 has global rank 0)
#   MAX_RESTARTS   times torchrun restarts the workers after a failure (they resume from the last checkpoint); 0
# Any other arguments are config overrides, e.g. --training.steps 1000. launch/env.sh sets NCCL and environment
# defaults. On one node, ./run_train.sh is simpler.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=launch/env.sh
source "$ROOT/launch/env.sh"
PYTHON="${PYTHON:-python3}"
NNODES="${NNODES:-1}"
if "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  NGPU="${NGPU:-8}"
else
  NGPU="${NGPU:-1}"
fi
LOG_RANK="${LOG_RANK:-0}"
MAX_RESTARTS="${MAX_RESTARTS:-0}"
CONFIG_FILE="${CONFIG_FILE:-$ROOT/train_configs/debug_model.toml}"
if [ -z "${RDZV_ENDPOINT:-}" ]; then
  echo "error: set RDZV_ENDPOINT=host:port (a host every node can reach, e.g. the first node's, port 29500)" >&2
  exit 2
fi
if [ -n "${RDZV_ID:-}" ]; then
  # The job's own id: a relaunch under it takes the dump folder's lock from its earlier attempt at once.
  export TITANMEM_RUN_ID="$RDZV_ID"
fi
RDZV_ID="${RDZV_ID:-titanmem}"
if ! [[ "$NNODES" =~ ^[1-9][0-9]*$ && "$NGPU" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: NNODES ($NNODES) and NGPU ($NGPU) must be positive integers" >&2
  exit 2
fi

# The config is checked on every node before the rendezvous: a bad setting is one line here, not a hang there.
WORLD_SIZE=$((NNODES * NGPU)) "$PYTHON" -m titanmem.train --job.config_file "$CONFIG_FILE" "$@" --print_config \
  >/dev/null || exit $?

node_rank=()
if [ -n "${NODE_RANK:-}" ]; then
  node_rank=(--node_rank "$NODE_RANK")
fi
exec "$PYTHON" -m titanmem.launch --nnodes "$NNODES" --nproc_per_node "$NGPU" "${node_rank[@]}" \
  --rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "$RDZV_ID" --max_restarts "$MAX_RESTARTS" \
  --local-ranks-filter "$LOG_RANK" --role rank --tee 3 \
  -m titanmem.train --job.config_file "$CONFIG_FILE" "$@"
