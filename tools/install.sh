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

# A usable torch is one titanmem supports (>= 2.11); an older one would be upgraded by pip to whatever it picks.
has_usable_torch() {
  "$PYTHON" -c "import sys, torch; v = tuple(int(p) for p in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(v < (2, 11))" \
    >/dev/null 2>&1
}

args=(--disable-pip-version-check)
if ! has_usable_torch && ! command -v nvidia-smi >/dev/null 2>&1; then
  args+=(torch==2.13.0 triton==3.7.1)
  [ -n "${TITANMEM_TORCH_INDEX:-}" ] && args+=(--extra-index-url "$TITANMEM_TORCH_INDEX")
  echo "[titanmem] no usable torch and no GPU here: installing the CPU build torch==2.13.0 triton==3.7.1"
fi
"$PYTHON" -m pip install "${args[@]}" -e "$TARGET"
