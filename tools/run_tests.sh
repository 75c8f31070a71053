#!/usr/bin/env bash
# Run the test suite (CPU, offline). On first use it installs titanmem with its dev extra into the current Python.
# Extra arguments go to pytest, e.g. tools/run_tests.sh -k config
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
# From the root, where the tests start their runs: the checkout there must be installed editable.
NEEDED="titanmem.kernels, torch, torchdata, tiktoken, datasets, safetensors, pytest, transformers, lm_eval"
if ! (cd "$ROOT" && "$PYTHON" -c "import $NEEDED") >/dev/null 2>&1; then
  echo "[titanmem] titanmem or its test dependencies are missing in $("$PYTHON" -c 'import sys; print(sys.prefix)'); installing"
  PYTHON="$PYTHON" "$ROOT/tools/install.sh" dev
fi
cd "$ROOT"
# Tests use local files only; these keep datasets and tiktoken from reaching for the network.
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
exec "$PYTHON" -m pytest "$@"
