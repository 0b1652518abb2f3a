"""The chunked LM-head loss under ZeRO-3 on 2 ranks (torchrun, CPU/gloo): loss and gradients equal to the full
logits' on the same batch, for an untied (llama) and a tied (qwen2) head; the head is partitioned.

usage: zero3_chunked_loss.py OUT_JSON     (rank 0 writes {arch: {"loss": [chunked, plain], "grad_rel": worst}})
"""
import json
import sys

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad

from qlora_ds.loss import causal_lm_loss, chunked_supported
from qlora_ds.nn.chunked_loss import IGNORE_INDEX
from tests.tiny_models import tiny_model


def grads(engine, loss, params):
    engine.backward(loss)
    out = [safe_get_full_grad(p).clone() for p in params]
    engine.step()                      # lr 0: clears the gradients, leaves the weights
    return out


def main(out: str) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                 "optimizer": {"type": "AdamW", "params": {"lr": 0.0, "torch_adam": True}},
                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}, "steps_per_print": 1000}
    result = {}
    for arch in ("llama", "qwen2"):
        model = tiny_model(arch).train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for name, p in model.named_parameters():
            p.requires_grad_("q_proj" in name or "down_proj" in name)
        params = [p for p in model.parameters() if p.requires_grad]
        engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config)
        assert hasattr(engine.module.get_output_embeddings().weight, "ds_id")     # partitioned
        assert chunked_supported(engine) is None
        g = torch.Generator().manual_seed(rank)
        ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=g)
        labels = ids.clone()
        labels[:, :5] = IGNORE_INDEX           # a prompt
        labels[1, 17:] = IGNORE_INDEX          # right padding
        mask = (labels != IGNORE_INDEX) | (torch.arange(24) < 5)
        batch = {"input_ids": ids, "attention_mask": mask.long(), "labels": labels}
        losses, all_grads = [], []
        for chunked in (True, False, True):    # chunked again: the second step after a plain one still runs
            loss = causal_lm_loss(engine, batch, chunked=chunked, chunk_tokens=7)
            losses.append(loss.item())
            all_grads.append(grads(engine, loss, params))
        with torch.no_grad():                  # evaluation under ZeRO-3
            losses.append(causal_lm_loss(engine, batch).item())
        worst = max(((a - b).norm() / b.norm()).item() for a, b in zip(all_grads[0], all_grads[1]) if b.norm() > 0)
        result[arch] = {"loss": losses, "grad_rel": worst}
        engine.destroy()
    if rank == 0:
        with open(out, "w") as fh:
            json.dump(result, fh)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
