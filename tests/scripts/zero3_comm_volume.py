"""Bytes moved by ZeRO-3 training steps of a tiny quantized Llama, from DeepSpeed's comms logger.

usage: zero3_comm_volume.py CKPT_DIR OUT_JSON GRAD_CKPT(0|1) PERSISTENCE_THRESHOLD RELEASE(0|1)
RELEASE=1 makes ZeRO-3 release every module's parameters after use and never prefetch
(stage3_max_reuse_distance 0, stage3_prefetch_bucket_size 0): the regime of models too large to keep
gathered, which the planner models; RELEASE=0 keeps DeepSpeed's defaults.
One warm-up step (DeepSpeed records its parameter trace), then the logger is cleared and STEPS
optimizer steps run. Rank 0 writes the logger's raw records {op: {message bytes: count}} and the run's
settings, for comparison with ``qlora_ds.plan.scaling.comm_volume``.
"""
import json
import sys

import deepspeed
import deepspeed.comm as ds_comm
import torch
import torch.distributed as dist

from qlora_ds.inject import from_pretrained, lora_parameters
from qlora_ds.nn.config import QLoRAConfig

STEPS, MICRO, ACCUM, SEQ, R = 2, 2, 2, 32, 8


def main(ckpt: str, out: str, grad_ckpt: bool, threshold: int, release: bool) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    ds_config = {
        "train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": ACCUM,
        "train_batch_size": MICRO * ACCUM * world, "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": threshold,
                              **({"stage3_max_reuse_distance": 0, "stage3_prefetch_bucket_size": 0} if release else {})},
        "comms_logger": {"enabled": True, "verbose": False, "prof_all": True},
        "steps_per_print": 10 ** 9,
    }
    cfg = QLoRAConfig(r=R, alpha=16, dropout=0.0, compute_dtype=torch.bfloat16)
    model = from_pretrained(ckpt, cfg, ds_config=ds_config, torch_dtype=torch.bfloat16)
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    lora = list(lora_parameters(model).values())
    engine, *_ = deepspeed.initialize(model=model, model_parameters=lora, config=ds_config)
    engine.train()
    gen = torch.Generator().manual_seed(rank)

    def step():
        for _ in range(ACCUM):
            ids = torch.randint(0, 128, (MICRO, SEQ), generator=gen)
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            engine.step()

    step()
    ds_comm.comms_logger.comms_dict.clear()
    for _ in range(STEPS):
        step()
    records = {op: {int(size): rec[0] for size, rec in sizes.items()}
               for op, sizes in ds_comm.comms_logger.get_raw_data().items()}
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"records": records, "world": world, "steps": STEPS, "micro_batch": MICRO,
                       "grad_accum": ACCUM, "seq_len": SEQ, "r": R, "grad_ckpt": grad_ckpt,
                       "persistence_threshold": threshold, "release": release, "ds_config": ds_config}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4]), sys.argv[5] == "1")
