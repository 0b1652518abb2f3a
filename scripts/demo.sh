#!/usr/bin/env bash
# Set up, then run the main job: a real QLoRA finetune of SmolLM2-135M (packaged) on a packaged chat corpus
# under the deepspeed launcher — 2 CPU ranks here, the local GPU(s) where there are any. Extra arguments go
# to launch/finetune.py (e.g. --max-steps 100). Output: runs/demo (adapter, metrics, loss_curve.png).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/qlora_ds/torch_extensions}"
if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  ranks=(--num_gpus 1)
  config=configs/ds_single_gpu.json
else
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  ranks=(--num_accelerators 2)
  config=configs/ds_cpu_demo.json
fi
exec deepspeed "${ranks[@]}" --master_port "${MASTER_PORT:-29500}" launch/finetune.py \
  --recipe configs/recipes/cpu_demo.json --ds-config "$config" --output-dir runs/demo --overwrite "$@"
