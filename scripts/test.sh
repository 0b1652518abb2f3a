#!/usr/bin/env bash
# Set up (venv + pinned deps) and run the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
export DS_ACCELERATOR=cpu
# compiled ops are cached outside the clone; builds are keyed by source hash, so a stale one is never used
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/qlora_ds/torch_extensions}"
# one pytest worker per core (at most 4; QLORA_DS_TEST_WORKERS=1: one process), each taking whole test files (a
# file's module fixtures are built once) and computing on its share of the cores: half the suite's time is process
# start-up and Python, which one process cannot overlap
cores=$(nproc)
workers="${QLORA_DS_TEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}"
parallel=()
if [ "$workers" -gt 1 ]; then parallel=(-n "$workers" --dist loadfile); fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( cores / workers > 1 ? cores / workers : 1 ))}"
set +e
python -m pytest -q --durations=15 "${parallel[@]}" "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
exit "$rc"
