"""Persistent buffers under ZeRO-3: every rank must hold the checkpoint's values, not the skeleton's.

usage: zero_buffers.py CKPT_DIR OUT_DIR  (torchrun, 2 ranks, gloo). Registers a tiny Llama variant with two
persistent buffers (stock HF causal LMs keep none in their checkpoints today: rotary tables and causal masks
are non-persistent), rank 0 saves it with non-default buffer values, then every rank loads it with
``qlora_ds.from_pretrained`` under ZeRO-3 and writes OUT_DIR/rank<r>.json with the buffers it holds.
"""
import gc
import json
import os
import sys

import deepspeed
import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from qlora_ds.inject import from_pretrained
from qlora_ds.nn.config import QLoRAConfig


class BufferLlamaConfig(LlamaConfig):
    model_type = "qlora_ds_buffer_llama"


class BufferLlama(LlamaForCausalLM):
    config_class = BufferLlamaConfig

    def __init__(self, config):
        super().__init__(config)
        self.register_buffer("calibration", torch.zeros(6))                 # top-level module
        self.model.norm.register_buffer("steps", torch.zeros(2, 3, dtype=torch.int64))   # nested, integer


AutoConfig.register(BufferLlamaConfig.model_type, BufferLlamaConfig)
AutoModelForCausalLM.register(BufferLlamaConfig, BufferLlama)


def main(ckpt: str, out: str) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    if rank == 0:
        cfg = BufferLlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
        torch.manual_seed(0)
        model = BufferLlama(cfg)
        model.calibration.copy_(torch.linspace(0.5, 3.0, 6))
        model.model.norm.steps.copy_(torch.arange(6).view(2, 3) + 40)
        model.save_pretrained(ckpt)
        assert "calibration" in model.state_dict() and "model.norm.steps" in model.state_dict()
    dist.barrier()
    ds_config = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    model = from_pretrained(ckpt, QLoRAConfig(r=4, alpha=8, dropout=0.0, compute_dtype=torch.float32),
                            ds_config=ds_config, torch_dtype=torch.float32)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"calibration": model.calibration.tolist(), "steps": model.model.norm.steps.tolist(),
                   "steps_dtype": str(model.model.norm.steps.dtype)}, f)
    del model
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
