#!/usr/bin/env bash
# The prepared GPU proof (issue 13 §4): one command, on a bare CUDA machine (Python 3.12, a CUDA build of torch,
# transformers, peft; no deepspeed, no bitsandbytes, no network; 1 GPU), finishing in <= 8 minutes (total budget
# 470 s, GPU_CHECK_BUDGET), leaving a results directory ($OUT, else ./gpu_results) of at most 8 files:
#
#   summary.md   steps (exit status, seconds, budget), the headline table, the benchmark tables
#   steps.jsonl  one row per step      rows.jsonl  every benchmark / headline row (machine, versions, commit)
#   env.json     GPU, driver, CUDA, packages, commit      log.txt  every step's output
#   pytest.xml   the CUDA test results (junit)             paging.json  the paged-optimizer check
#
# Steps (scripts/gpu/check.py holds the list and the runner), each under its own time budget cut to what is left,
# each recorded and never stopping the run, so one run yields all the evidence (exit 1 at the end if one failed):
#   env -> install deepspeed + bitsandbytes from the carried wheels -> JIT-build our CUDA ops and the CPU quant op
#   (checkpoints are quantized on the CPU as they stream in) through the OpBuilder, at once -> the device tests
#   (pytest --device cuda --device-tests-only) -> paged optimizer (tests/scripts/optim_gpu_paging.py) -> fp16
#   (scripts/gpu/fp16.py: DeepSpeed fp16 ZeRO 0-3 with our optimizers, a forced overflow skipped and reported with
#   its module, resume keeps the loss scale) -> the headline: LLaMA-65B, then 7B shapes, random weights quantized
#   layer by layer onto the GPU, one QLoRA step (seq 512, batch 1, grad ckpt, paged AdamW, r 64 all linears) capped
#   at 48 GiB, peak beside the planner (scripts/gpu/headline.py; the 7B run adds a step at 8192 tokens with the
#   chunked loss) -> python -m bench quant|layer --device cuda -> bench train 135M -> the headline at 33B and 13B ->
#   bench train 1B -> rows.jsonl + summary.md. Correctness first: what the budget does not reach is at the end.
#
#   bash scripts/gpu_check.sh             # on the GPU machine
#   bash scripts/gpu_check.sh --dry-run   # every step on CPU at tiny shapes, in one process (CI: tests/test_gpu_check.py):
#       install runs pip on the wheels folder into a temporary target (for CPython 3.12 manylinux; not put on the
#       path), the builds build the CPU ops and ask the CUDA builders for their plan, the tests step collects the
#       CUDA selection on the CPU, each headline size runs scaled down, paging runs with a fake managed memory,
#       the benchmarks run their bnb+PEFT variants; a step it cannot run is printed as skipped with its reason
#
# Wheels: fetch them HERE, where pip reaches the registry: `bash scripts/gpu/fetch_wheels.sh` fills gpu_wheels/
# (gitignored): bitsandbytes 0.50.2 (manylinux_2_24 x86_64, ~43 MB), deepspeed 0.19.8 (a pure-Python wheel built
# from its sdist, ~1.6 MB), what deepspeed needs and the image lacks (hjson, pydantic, pydantic-core,
# annotated-types, typing-inspection, typing-extensions: ~2.5 MB) and COMMIT. The device tool's call names
# gpu_wheels in `carry`; everything that travels stays under 64 MiB (the tree itself is ~2 MB).
# See scripts/gpu/README.md for the exact `run` invocation.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || PY=python
exec "$PY" scripts/gpu/check.py "$@"
