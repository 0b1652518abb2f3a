"""Per-rank bytes after ``from_pretrained`` under ZeRO-3 (run under torchrun; CPU/gloo or CUDA/nccl).

usage: zero3_load.py CKPT_DIR OUT_JSON [DTYPE]
DTYPE: the compute dtype the model loads in (bf16, fp16 or fp32; default bf16).
Rank 0 writes OUT_JSON: per rank, the quantized bytes it holds (``quantized_bytes_on_this_rank``), the
full quantized size, RSS after load and the RSS high-water mark of the load (CUDA: max allocated; CPU: with its
file-backed part, ``peak_load_rss_file``, and the rest, ``peak_load_anon``).
"""
import json
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.common import peak_fields  # noqa: E402
from qlora_ds.hardware import resolve_dtype  # noqa: E402
from qlora_ds.memstats import cuda_peak, reset_peak, rss  # noqa: E402
from qlora_ds.inject import from_pretrained, quantized_bytes_on_this_rank  # noqa: E402
from qlora_ds.nn import QLoRAConfig  # noqa: E402


def main(ckpt: str, out: str, dtype_name: str = "bf16") -> None:
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    ds_config = {"train_batch_size": 4 * world, "train_micro_batch_size_per_gpu": 4,
                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    dtype = resolve_dtype(dtype_name)
    before = rss()
    reset_peak()
    model = from_pretrained(ckpt, QLoRAConfig(r=16, alpha=16, dropout=0.0, compute_dtype=dtype), ds_config=ds_config,
                            torch_dtype=dtype)
    local, full = quantized_bytes_on_this_rank(model)
    mine = {"rank": rank, "quantized_local": local, "quantized_full": full, "rss_before": before,
            "rss_after": rss(),
            **({"peak_load": cuda_peak()} if torch.cuda.is_available() else peak_fields("peak_load")),
            "params_local_bytes": sum((p.ds_tensor if hasattr(p, "ds_tensor") else p).numel() * p.element_size()
                                      for p in model.parameters())}
    per_rank = [None] * world
    dist.all_gather_object(per_rank, mine)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"world": world, "ranks": per_rank}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
