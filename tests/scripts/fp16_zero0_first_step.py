"""fp16 without ZeRO (DeepSpeed's FP16_UnfusedOptimizer around our optimizer), one rank on the CPU with fp16
declared supported (as scripts/gpu/fp16.py --cpu-fp16): the optimizer state before and after the first real step.
Prints one JSON line. argv: optimizer type, port."""
import json
import os
import sys

import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")

import deepspeed  # noqa: E402
from deepspeed.accelerator import get_accelerator  # noqa: E402

from qlora_ds.distributed import shutdown  # noqa: E402
from qlora_ds.optim import deepspeed_initialize  # noqa: E402

get_accelerator().is_fp16_supported = lambda: True
deepspeed.init_distributed(dist_backend="gloo")
torch.manual_seed(0)
model = torch.nn.Linear(64, 4, bias=False).half()
lr, wd = 1e-2, 0.5
cfg = {"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 0},
       "optimizer": {"type": sys.argv[1], "params": {"lr": lr, "weight_decay": wd}},
       "fp16": {"enabled": True, "initial_scale_power": 4}}
engine, *_ = deepspeed_initialize(model, cfg)
inner = engine.optimizer.optimizer
master = engine.optimizer.fp32_groups[0][0]
before = master.detach().clone()
out = {"wrapper": type(engine.optimizer).__name__, "steps_before": [s.get("step") for s in inner.state.values()],
       "master_equals_weight": bool(torch.equal(before, model.weight.detach().float()))}
loss = engine(torch.randn(2, 64).half()).float().pow(2).mean()
engine.backward(loss)
engine.step()
# AdamW's first step: w <- w·(1 - lr·wd) - lr·m̂/(√v̂ + eps), with m̂/√v̂ = sign(g) at step 1
step = (before * (1 - lr * wd) - master.detach()) / lr
out["steps_after"] = [int(s["step"]) if torch.is_tensor(s.get("step")) else s.get("step") for s in inner.state.values()]
out["first_update_over_lr"] = step.abs().median().item()
print(json.dumps(out))
shutdown()
