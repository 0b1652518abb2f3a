"""Held-out loss during distributed training: each rank scores its shard of the held-out examples through the
training engine, in step with the other ranks (under ZeRO-3 every forward is a collective)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..data import collate
from ..distributed import collective_device
from ..loss import causal_lm_loss


def sharded_heldout_loss(engine, examples, pad_id: int, batch_size: int, pad_multiple: int = 1,
                         max_width: int | None = None, chunked: bool = True) -> tuple[float, set[int]]:
    """Token-weighted held-out loss over all ranks' shards, in micro batches (the size that fits in
    training), and the batch widths it ran (the planner check counts per-shape memory by them)."""
    # Under ZeRO-3 every forward gathers parameters collectively: every rank runs as many forwards as the rank
    # with the most batches, shorter (or empty) shards padding with a fully masked batch that counts nothing.
    # The loss is token-weighted, so the order is free: batches of similar lengths pad least.
    examples = sorted(examples, key=lambda e: e["input_ids"].numel())
    where = collective_device()     # the collectives' tensors: the GPU under NCCL (it takes no CPU tensors)
    count = torch.tensor([-(-len(examples) // batch_size)], dtype=torch.int64, device=where)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    filler = [{"input_ids": torch.tensor([pad_id]), "labels": torch.tensor([-100])}]
    engine.eval()
    total, widths = torch.zeros(2, dtype=torch.float64, device=where), set()
    with torch.no_grad():
        for i in range(0, int(count) * batch_size, batch_size):
            chunk = examples[i:i + batch_size]
            batch = collate(chunk or filler, pad_id, pad_multiple, max_width)
            batch = {k: v.to(engine.device) for k, v in batch.items()}
            n = int((batch["labels"][:, 1:] != -100).sum())
            loss = causal_lm_loss(engine, batch, chunked=chunked)
            if chunk:
                widths.add(batch["input_ids"].shape[1])
            if n:
                total += torch.tensor([loss.float().item() * n, n], dtype=torch.float64, device=where)
    dist.all_reduce(total)
    engine.train()
    return (total[0] / total[1].clamp(min=1)).item(), widths
