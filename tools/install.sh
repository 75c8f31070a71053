#!/usr/bin/env bash
# Install titanmem, editable, into the current Python environment (PYTHON, default python3).
# Usage: tools/install.sh [EXTRA]      e.g. tools/install.sh dev
#
# A machine with no torch and no GPU gets the CPU torch wheel pinned together with the triton it expects, in one pip
# command: letting pip choose torch there would pull a multi-GB CUDA build. Outside a mirror that carries the CPU
# wheel, point TITANMEM_TORCH_INDEX at https://download.pytorch.org/whl/cpu.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
EXTRA="${1:-}"
TARGET="$ROOT"
[ -n "$EXTRA" ] && TARGET="$ROOT[$EXTRA]"

pins=()
index=()
if ! "$PYTHON" -c "import torch" >/dev/null 2>&1 && ! command -v nvidia-smi >/dev/null 2>&1; then
  pins=(torch==2.13.0 triton==3.7.1)
  [ -n "${TITANMEM_TORCH_INDEX:-}" ] && index=(--extra-index-url "$TITANMEM_TORCH_INDEX")
  echo "[titanmem] no torch and no GPU here: installing the CPU build ${pins[*]}"
fi
"$PYTHON" -m pip install --disable-pip-version-check "${index[@]}" "${pins[@]}" -e "$TARGET"
