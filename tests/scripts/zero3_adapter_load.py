"""An adapter loaded into a ZeRO-3 model (``qlora_ds.inject.load_adapter``) reaches every rank's partitions.

usage: zero3_adapter_load.py CKPT_DIR ADAPTER_DIR OUT_DIR  (torchrun, 2 ranks, gloo). Every rank loads the tiny
checkpoint under ZeRO-3, loads the adapter, writes OUT_DIR/rank<r>.json (its layers' scaling, the numel of its
partitions) and the adapter is saved again (gathered) to OUT_DIR/adapter, to compare with the one loaded.
"""
import json
import os
import sys

import deepspeed
import torch
import torch.distributed as dist

from qlora_ds.distributed import shutdown
from qlora_ds.inject import from_pretrained, load_adapter, save_adapter
from qlora_ds.nn import QLoRAConfig


def main(ckpt: str, adapter: str, out: str) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    ds_config = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    model = from_pretrained(ckpt, QLoRAConfig(r=8, alpha=16, dropout=0.0, compute_dtype=torch.float32),
                            ds_config=ds_config, torch_dtype=torch.float32)
    loaded = load_adapter(model, adapter)
    layers = {n: m for n, m in model.named_modules() if hasattr(m, "lora_A")}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"loaded": loaded, "scaling": {n: m.scaling for n, m in layers.items()},
                   "partition_numel": sum(m.lora_B.weight.ds_tensor.numel() for m in layers.values())}, f)
    save_adapter(model, os.path.join(out, "adapter"))
    shutdown()      # a process group left to interpreter exit can die of gloo's SIGABRT there (seen once in CI)


if __name__ == "__main__":
    main(*sys.argv[1:4])
