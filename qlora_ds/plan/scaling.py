"""Per-step communication volume and step time for N nodes × G GPUs.

Ring collectives over a message of S bytes (the full, unpartitioned tensor): all-gather and
reduce-scatter move S·(N−1)/N per rank, all-reduce twice that. Across nodes the collective is taken
as hierarchical: the intra-node part at NVLink speed, and each node's NIC carries S·(M−1)/M for M
nodes (×2 for all-reduce). Times are not overlapped with compute, so ``step_s_upper`` is a bound and
``step_s_lower`` (max of compute and communication) the other.

What moves per optimizer step (``grad_accum`` micro steps):
* ZeRO-3: all-gather of the parameters in forward and again in backward, every micro step. Our base
  is partitioned as *packed* NF4 bytes (4.127 bit/param) instead of bf16: 4.127/16 of the traffic.
* LoRA gradients (bf16): ZeRO-0/1 all-reduce once per step; ZeRO-2/3 reduce-scatter every micro step.
* ZeRO-1/2: all-gather of the updated bf16 LoRA weights after the step.

FLOPs per token: frozen linears 2·W forward + 2·W input gradient (+ 2·W recompute with gradient
checkpointing); LoRA 6·P (+2·P recompute); attention 2·s·h·L forward (causal), ×2 backward, +1 recompute.
"""
from __future__ import annotations

from dataclasses import dataclass

from .memory import PlanConfig, lora_params


@dataclass(frozen=True)
class Scaling:
    volume: dict           # name -> bytes each rank sends (≈ receives) per optimizer step
    comm_s: float
    compute_s: float
    tokens_per_step: int

    @property
    def total_bytes(self) -> float:
        return sum(self.volume.values())

    @property
    def step_s_upper(self) -> float:
        return self.comm_s + self.compute_s

    @property
    def step_s_lower(self) -> float:
        return max(self.comm_s, self.compute_s)

    def as_dict(self) -> dict:
        return {"volume_bytes_per_rank": {k: int(v) for k, v in self.volume.items()},
                "total_bytes_per_rank": int(self.total_bytes), "comm_s": self.comm_s,
                "compute_s": self.compute_s, "step_s_lower": self.step_s_lower,
                "step_s_upper": self.step_s_upper, "tokens_per_step": self.tokens_per_step}


def _ring(size: float, n: int) -> float:
    return size * (n - 1) / n if n > 1 else 0.0


def collective_seconds(cfg: PlanConfig, size: float, kind: str) -> float:
    """Time of one all-gather / reduce-scatter (``kind='gather'``) or all-reduce (``'reduce'``)."""
    factor = 2 if kind == "reduce" else 1
    g, m = cfg.gpus_per_node, cfg.nodes
    intra = _ring(size, g) / (cfg.intra_node_gbps * 1e9 / 8)
    inter = _ring(size, m) / (cfg.interconnect_gbps * 1e9 / 8)
    return factor * (intra + inter)


def comm_volume(cfg: PlanConfig) -> dict:
    """Bytes each rank sends per optimizer step, by what is moved."""
    s, n, z, acc = cfg.shape, cfg.world_size, cfg.zero_stage, cfg.grad_accum
    p = lora_params(s, cfg.lora_r, cfg.lora_targets)
    vol = {}
    if n == 1:
        return vol
    if z >= 3:
        passes = 2 * acc
        vol["allgather_linears"] = passes * _ring(s.linear_params * cfg.base_bits_per_param / 8, n)
        vol["allgather_embeddings"] = passes * _ring(s.embedding_params * 2, n)
        vol["allgather_lora"] = passes * _ring(p * 2, n)
    if z <= 1:
        vol["allreduce_lora_grads"] = 2 * _ring(p * 2, n)
    else:
        vol["reduce_scatter_lora_grads"] = acc * _ring(p * 2, n)
    if z in (1, 2):
        vol["allgather_lora_update"] = _ring(p * 2, n)
    return vol


def _comm_seconds(cfg: PlanConfig) -> float:
    s, n, z, acc = cfg.shape, cfg.world_size, cfg.zero_stage, cfg.grad_accum
    if n == 1:
        return 0.0
    p = lora_params(s, cfg.lora_r, cfg.lora_targets)
    t = 0.0
    if z >= 3:
        weights = s.linear_params * cfg.base_bits_per_param / 8 + s.embedding_params * 2 + p * 2
        t += 2 * acc * collective_seconds(cfg, weights, "gather")
    t += collective_seconds(cfg, p * 2, "reduce") if z <= 1 else acc * collective_seconds(cfg, p * 2, "gather")
    if z in (1, 2):
        t += collective_seconds(cfg, p * 2, "gather")
    return t


def flops_per_token(cfg: PlanConfig) -> float:
    s = cfg.shape
    frozen = s.linear_params + s.vocab * s.hidden
    p = lora_params(s, cfg.lora_r, cfg.lora_targets)
    ck = 1 if cfg.grad_ckpt else 0
    attn = 2 * cfg.seq_len * s.hidden * s.layers
    return (4 + 2 * ck) * frozen + (6 + 2 * ck) * p + (3 + ck) * attn


def estimate_scaling(cfg: PlanConfig) -> Scaling:
    tokens = cfg.micro_batch * cfg.seq_len * cfg.grad_accum
    compute = tokens * flops_per_token(cfg) / (cfg.tflops * 1e12)
    return Scaling(comm_volume(cfg), _comm_seconds(cfg), compute, tokens * cfg.world_size)
