"""A few LoRA training steps of a tiny quantized Llama under DeepSpeed (torchrun, CPU/gloo).

usage: zero_train.py CKPT_DIR OUT_DIR STAGE
Writes OUT_DIR/result.json (rank 0): per-step losses (mean over ranks), per-rank quantized bytes,
and OUT_DIR/adapter (PEFT format, via qlora_ds.inject.save_adapter).
"""
import gc
import json
import os
import sys

import deepspeed
import torch
import torch.distributed as dist

from qlora_ds.inject import from_pretrained, lora_parameters, quantized_bytes_on_this_rank, save_adapter
from qlora_ds.nn.config import QLoRAConfig

STEPS, BATCH, SEQ = 3, 4, 16


def main(ckpt: str, out: str, stage: int) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    ds_config = {
        "train_batch_size": BATCH, "train_micro_batch_size_per_gpu": BATCH // world,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 1000,
    }
    cfg = QLoRAConfig(r=8, alpha=16, dropout=0.0, compute_dtype=torch.float32)
    torch.manual_seed(0)
    model = from_pretrained(ckpt, cfg, ds_config=ds_config, torch_dtype=torch.float32)
    loaded_bytes = quantized_bytes_on_this_rank(model)
    lora = list(lora_parameters(model).values())
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=lora, config=ds_config)
    engine.train()
    data = torch.randint(0, 128, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    mine = data.chunk(world)[rank]
    losses = []
    for _ in range(STEPS):
        loss = engine(input_ids=mine, labels=mine).loss
        engine.backward(loss)
        engine.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
    trained_bytes = quantized_bytes_on_this_rank(engine.module)
    save_adapter(engine, os.path.join(out, "adapter"))
    per_rank = [None] * world
    dist.all_gather_object(per_rank, {"loaded": loaded_bytes, "trained": trained_bytes})
    if rank == 0:
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump({"losses": losses, "bytes": per_rank, "world": world, "trainable": trainable}, f)
    del engine, model, lora
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
