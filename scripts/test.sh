#!/usr/bin/env bash
# Set up (venv + pinned deps) and run the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
export DS_ACCELERATOR=cpu
# compiled ops are cached outside the clone; builds are keyed by source hash, so a stale one is never used
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/qlora_ds/torch_extensions}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
set +e
python -m pytest -q --durations=15 "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
exit "$rc"
