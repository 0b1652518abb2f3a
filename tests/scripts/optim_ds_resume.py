"""Train a tiny QLoRA model under DeepSpeed with our optimizer as the client optimizer, then resume.

usage (torchrun, CPU/gloo): optim_ds_resume.py STAGE OPTIMIZER CKPT_DIR OUT_JSON [STEPS] [offload]
Run A trains 2·STEPS steps and saves a checkpoint after STEPS; run B builds a fresh engine, loads that
checkpoint and trains STEPS more. Rank 0 writes OUT_JSON: {"full": losses A, "resumed": losses B (its last
STEPS steps), "wrapped": the DeepSpeed optimizer class, "inner": ours, "tag": our state dict's tag as found
in DeepSpeed's checkpoint files, "state": dtype and step of each state entry}. Losses are means over ranks.
``offload``: ZeRO offload_optimizer to the CPU (with "zero_force_ds_cpu_optimizer": false).
"""
import gc
import glob
import json
import os
import sys

import deepspeed
import torch
import torch.distributed as dist
import torch.nn as nn

from qlora_ds.nn import QLoRAConfig, QLoRALinear
from qlora_ds.optim import deepspeed_initialize, split_ds_config

DIM, MICRO = 128, 4


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        cfg = QLoRAConfig(r=8, alpha=16, dropout=0.0, compute_dtype=torch.bfloat16)
        self.fc1 = QLoRALinear.from_linear(nn.Linear(DIM, DIM), cfg)
        self.fc2 = QLoRALinear.from_linear(nn.Linear(DIM, DIM), cfg)

    def forward(self, x, y):
        out = self.fc2(torch.relu(self.fc1(x)))
        return nn.functional.mse_loss(out.float(), y)


def build(stage: int, ds_config: dict) -> nn.Module:
    torch.manual_seed(0)
    model = Net()
    for m in (model.fc1, model.fc2):  # nonzero B so both adapters get gradients from step 1
        nn.init.normal_(m.lora_B.weight, std=0.02)
    if stage == 3:
        plain, _ = split_ds_config(ds_config)
        deepspeed.zero.Init(module=model, config_dict_or_path=plain, mem_efficient_linear=False)
    return model


def batch(step: int, rank: int):
    g = torch.Generator().manual_seed(1000 * (step % 4) + rank)
    x = torch.randn(MICRO, DIM, generator=g)
    target = torch.Generator().manual_seed(7)
    w = torch.randn(DIM, DIM, generator=target) / DIM ** 0.5
    return x.bfloat16(), torch.tanh(x @ w)


def train(engine, steps, rank, world) -> list[float]:
    losses = []
    for step in steps:
        x, y = batch(step, rank)
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        mean = loss.detach().float().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
    return losses


def _saved_tag(ckpt: str):
    """The qlora_ds tag of our optimizer state inside DeepSpeed's checkpoint files (ZeRO 0 keeps it with the model)."""
    found = []

    def walk(obj):
        if isinstance(obj, dict):
            if "qlora_ds" in obj and "state" in obj:
                found.append(obj["qlora_ds"])
            for v in obj.values():
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)

    for path in sorted(glob.glob(os.path.join(ckpt, "half", "*.pt"))):
        walk(torch.load(path, map_location="cpu", weights_only=False))
    return found[0] if found else None


def main(stage: int, optim: str, ckpt: str, out: str, steps: int, offload: bool) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    params = {"lr": 1e-2, "weight_decay": 0.01}
    if "8bit" in optim.lower():
        params["min_8bit_size"] = 256
    ds_config = {
        "train_batch_size": MICRO * world, "train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1,
        "optimizer": {"type": optim, "params": params},
        "bf16": {"enabled": True}, "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 10_000,
    }
    if offload:
        ds_config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        ds_config["zero_force_ds_cpu_optimizer"] = False
    engine, opt, *_ = deepspeed_initialize(build(stage, ds_config), ds_config)
    full = train(engine, range(steps), rank, world)
    engine.save_checkpoint(ckpt, tag="half")
    full += train(engine, range(steps, 2 * steps), rank, world)
    wrapped, inner = type(engine.optimizer).__name__, type(getattr(engine.optimizer, "optimizer", opt)).__name__
    del engine, opt
    gc.collect()

    engine, opt, *_ = deepspeed_initialize(build(stage, ds_config), ds_config)
    engine.load_checkpoint(ckpt, tag="half")
    ours = getattr(engine.optimizer, "optimizer", opt)
    tag = _saved_tag(ckpt) if rank == 0 else None
    state = [{k: (str(v.dtype) if torch.is_tensor(v) else v) for k, v in s.items()} for s in ours.state.values()]
    resumed = train(engine, range(steps, 2 * steps), rank, world)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"full": full, "resumed": resumed, "wrapped": wrapped, "inner": inner, "tag": tag,
                       "state": state}, f)
    del engine, opt
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]) if len(sys.argv) > 5 else 4,
         "offload" in sys.argv[6:])
