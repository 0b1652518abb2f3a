"""Per-step communication volume and step time for N nodes × G GPUs.

Ring collectives over a message of S bytes (the full, unpartitioned tensor): all-gather and
reduce-scatter move S·(N−1)/N per rank, all-reduce twice that. Across nodes the collective is taken
as hierarchical: the intra-node part at NVLink speed, and each node's NIC carries S·(M−1)/M for M
nodes (×2 for all-reduce). Times are not overlapped with compute, so ``step_s_upper`` is a bound and
``step_s_lower`` (max of compute and communication) the other.

What moves per optimizer step (``grad_accum`` micro steps):
* ZeRO-3: all-gather of the parameters in forward and again for backward, every micro step (details
  in ``zero3_gathers``). Our base is partitioned as *packed* NF4 bytes (4.127 bit/param) instead of
  bf16: 4.127/16 of the traffic. A MoE's fused 3-D experts likewise, packed per tensor when they are 4-bit
  (``quantize_experts``), else in the compute dtype, with their routers.
* LoRA gradients (bf16): ZeRO-0/1 all-reduce once per step; ZeRO-2/3 reduce-scatter every micro step.
* ZeRO-1/2: all-gather of the updated bf16 LoRA weights after the step.

FLOPs per token: frozen linears 2·W forward + 2·W input gradient (+ 2·W recompute with gradient
checkpointing); LoRA 6·P (+2·P recompute); attention 2·s·h·L forward (causal), ×2 backward, +1 recompute; a MoE's
experts the same as frozen linears over the k experts a token reaches (3·h·I each), recomputed whenever they are
4-bit (their own checkpoint) or checkpointing is on; run in n groups (``experts_dequant_bytes``) under checkpointing,
the layer's recompute replays the first n - 1 of them once more.
"""
from __future__ import annotations

from dataclasses import dataclass

from .memory import PlanConfig, cfg_lora_params, targeted
from .moe import expert_lora_params, experts_group, nf4_part_bytes, top_k


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


def _quantized_tensor_sizes(cfg: PlanConfig, fan_in: int, fan_out: int) -> list[tuple[int, int]]:
    """(numel, bytes per element) of the frozen tensors ZeRO-3 partitions for one quantized linear, as
    QLoRALinear / QALoRALinear store them (all uint8 but a 16-bit base)."""
    w = fan_in * fan_out
    if cfg.base_bits == 16:
        return [(w, 2)]
    if cfg.quant == "int":
        groups = w // cfg.group_size
        return [(w * cfg.base_bits // 8, 1), (4 * groups, 1), (4 * groups, 1)]
    return [(n, 1) for n in nf4_part_bytes(w, cfg.double_quant)]


def _expert_tensor_sizes(cfg: PlanConfig) -> list[tuple[int, int]]:
    """(numel, bytes per element) of one MoE layer's experts and routers as ZeRO-3 partitions them: the 3-D
    weights' uint8 parts when they are 4-bit (qlora_ds.nn.quantized_experts), else compute-dtype tensors."""
    s, e = cfg.shape, cfg.elem
    if cfg.experts_4bit:
        weights = [(n, 1) for t in s.expert_tensors() for n in nf4_part_bytes(t, cfg.double_quant)]
    else:
        weights = [(t, e) for t in s.expert_tensors()]
    gates = [(s.experts * s.hidden, e)] + ([(s.hidden, e)] if s.shared_expert_intermediate else [])
    return weights + gates


def zero3_gathers(cfg: PlanConfig) -> dict:
    """Bytes all-gathered per micro step under ZeRO-3, by what is gathered (full, padded sizes).

    DeepSpeed gathers a module's parameters before its forward and backward and frees them after, so
    each decoder-layer tensor is gathered once in forward and once more for backward (with
    checkpointing: for the recomputation, whose parameters the backward then reuses). With
    ``stage3_max_reuse_distance: 0`` nothing is reused: three gathers with checkpointing. The embedding
    is gathered for forward only, an untied lm_head for forward and backward (tied: the one tensor
    three times). Tensors with at most ``stage3_param_persistence_threshold`` elements stay gathered
    for the whole run and cost nothing per step; a model whose gathered elements fit under both
    ``stage3_max_live_parameters`` and ``stage3_max_reuse_distance`` stays gathered between forward
    and backward: one gather per micro step. LoRA A/B stay fp32 under ZeRO-3 (the engine casts them to
    bf16 only at ZeRO 0-2), so they move 4 bytes per element.
    """
    s, n = cfg.shape, cfg.world_size

    def moved(tensors) -> int:   # bytes of the non-persistent tensors, padded to a multiple of n
        return sum(-(-numel // n) * n * size for numel, size in tensors if numel > cfg.persistence_threshold)

    quantized = [t for a, b in s.linears().values() for t in _quantized_tensor_sizes(cfg, a, b)]   # one layer
    layer_linears = moved(quantized)
    layer_lora = moved(t for lin in targeted(s, cfg.lora_targets)
                       for t in ((cfg.lora_r * lin.in_features, 4), (cfg.lora_r * lin.out_features, 4)) if cfg.lora_r)
    # the layer's 16-bit tensors: norm weights (and biases), the linears' biases
    norm_widths = [s.hidden] * s.layout.norms + {"": [], "head": [s.head_dim] * 2,
                                                 "full": [s.q_dim, s.kv_dim]}[s.layout.qk_norm]
    layer_norms = moved([(w, 2) for w in norm_widths for _ in range(s.layout.norm_params_per_width)]
                        + [(lin.out_features, 2) for lin in s.layer_linears() if lin.bias])
    embed = moved([(s.vocab * s.embed_width, 2)])
    final_norm = moved([(s.hidden, 2)])
    experts = _expert_tensor_sizes(cfg) if s.experts else []
    numel = s.layers * sum(numel for numel, _ in quantized + experts) + cfg_lora_params(cfg) \
        + s.vocab * s.hidden * (1 if s.tie_embeddings else 2)
    if numel <= min(cfg.max_live_parameters, cfg.max_reuse_distance):
        layer_passes, embed_passes, head_passes = 1, 1, (0 if s.tie_embeddings else 1)
    else:
        layer_passes = 3 if cfg.grad_ckpt and cfg.max_reuse_distance == 0 else 2
        embed_passes, head_passes = (3, 0) if s.tie_embeddings else (1, 2)
    out = {"linears": layer_passes * s.layers * layer_linears,
           "embeddings_norms": (embed_passes + head_passes) * embed + layer_passes * s.layers * layer_norms
           + (layer_passes if layer_passes == 1 else 2) * final_norm,
           "lora": layer_passes * s.layers * layer_lora}
    if experts:
        out["moe_experts"] = layer_passes * s.layers * moved(experts)
    return out


def _collectives(cfg: PlanConfig) -> list[tuple[str, float, str, int]]:
    """(what, full message bytes, 'gather' | 'reduce' | 'reduce_scatter', times per optimizer step)."""
    s, n, z, acc = cfg.shape, cfg.world_size, cfg.zero_stage, cfg.grad_accum
    if n == 1:
        return []
    p = cfg_lora_params(cfg)
    out = []
    if z >= 3:
        for what, size in zero3_gathers(cfg).items():
            out.append((f"allgather_{what}", size, "gather", acc))
    if z <= 1:
        out.append(("allreduce_lora_grads", p * 2, "reduce", 1))
    else:
        out.append(("reduce_scatter_lora_grads", p * 2, "reduce_scatter", acc))
    if z in (1, 2):
        out.append(("allgather_lora_update", p * 2, "gather", 1))
    return out


def comm_volume(cfg: PlanConfig) -> dict:
    """Bytes each rank sends per optimizer step, by what is moved (ring: S·(N−1)/N, all-reduce twice)."""
    vol: dict[str, float] = {}
    for what, size, kind, times in _collectives(cfg):
        vol[what] = vol.get(what, 0.0) + times * (2 if kind == "reduce" else 1) * _ring(size, cfg.world_size)
    return vol


def _comm_seconds(cfg: PlanConfig) -> float:
    return sum(times * collective_seconds(cfg, size, "reduce" if kind == "reduce" else "gather")
               for _, size, kind, times in _collectives(cfg))


def flops_per_token(cfg: PlanConfig) -> float:
    """Training FLOPs per token. The experts' LoRA (``lora_experts``) is folded into their weights once per micro
    step — B·A added in the forward and its recompute, dA and dB from the weight gradient: 8·r·(E·in·out) per
    weight, shared by the step's tokens — and adds the weight-gradient matmul (2 FLOPs per reached weight) per
    token; it is not a per-token LoRA of its parameter count."""
    s = cfg.shape
    frozen = s.linear_params + s.vocab * s.hidden
    lora_e = expert_lora_params(s, cfg.lora_r) if cfg.lora_experts and s.experts else 0
    p = cfg_lora_params(cfg) - lora_e
    ck = 1 if cfg.grad_ckpt else 0
    attn = 2 * cfg.seq_len * s.hidden * s.layers
    experts = s.layers * top_k(s) * sum(s.expert_tensors()) / s.experts if s.experts else 0   # reached per token
    experts_ck = 1 if cfg.grad_ckpt or cfg.experts_4bit else 0
    fold = 8 * cfg.lora_r * s.layers * sum(s.expert_tensors()) / (cfg.micro_batch * cfg.seq_len) if lora_e else 0
    # experts run in n groups under the model's checkpointing: its recompute replays the n - 1 groups before the last
    # one's checkpoint (torch's nested checkpoints stop at the last saved input), one more forward of them
    groups = -(-s.experts // experts_group(s, cfg.elem, cfg.experts_dequant_bytes)) if cfg.experts_4bit else 1
    replay = 2 * experts * (groups - 1) / groups if s.experts and ck and groups > 1 else 0
    return ((4 + 2 * ck) * frozen + (6 + 2 * ck) * p + (3 + ck) * attn + (4 + 2 * experts_ck) * experts + replay
            + (2 * experts + fold if lora_e else 0))


def estimate_scaling(cfg: PlanConfig) -> Scaling:
    tokens = cfg.micro_batch * cfg.seq_len * cfg.grad_accum
    compute = tokens * flops_per_token(cfg) / (cfg.tflops * 1e12)
    return Scaling(comm_volume(cfg), _comm_seconds(cfg), compute, tokens * cfg.world_size)
