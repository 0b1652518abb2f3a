"""A MoE decoder layer in the planner: its experts' weights, what its routing and experts keep for backward, and the
transient of recomputing the experts. Units: bytes; per token and layer for the kept terms. e = bytes per element
of the compute dtype, E = experts, k = experts per token, h = hidden, I = expert width.

Weights. transformers 5 fuses a layer's experts into two 3-D parameters, ``gate_up_proj`` (E, 2I, h) and
``down_proj`` (E, h, I). With ``quantize_experts`` (QLoRAConfig's default; qlora_ds.nn.quantized_experts) each is
stored as a quantized linear's weight is, over the flattened tensor: n/2 code bytes, and per 64-block an absmax
code byte + per 256 of those an fp32 absmax + a 4-byte offset (double quant), or an fp32 absmax per block; frozen,
no LoRA unless ``lora_experts``. Without it (or with QA-LoRA or a 16-bit base, which leave them as they are) they are
e-byte. The routers (E·h) and Qwen2-MoE's shared-expert gates (h) stay e-byte either way.

LoRA on the 4-bit experts (``lora_experts``; QLoRA only, dropout 0: qlora_ds.nn.experts_lora): per fused weight a
lora_A (r·E, in) and lora_B (out, r·E), (in, out) = (h, 2I) for gate_up and (I, h) for down: r·E·(2h + 3I) trainable
parameters per layer, counted with the linears' LoRA (memory.py: working copy, gradients, masters, Adam, ZeRO).

Kept for backward, measured with autograd's saved tensors around one decoder layer of transformers 5.23's Mixtral,
Qwen2-MoE and Qwen3-MoE (tests/test_plan_moe.py), whose experts run ``grouped_mm`` (its default experts
implementation, on CUDA and, with torch > 2.10, on the CPU):

* router (``*TopKRouter``): the fp32 softmax output 4·E and top-k's int64 indices 8·k; with ``norm_topk_prob``
  (Mixtral always) the in-place division keeps the sum 4 and the fp32 top-k values it overwrites 4·k.
* 16-bit experts (``grouped_mm_experts_forward``; the weights are frozen, so the gathered inputs are not kept):
  gate, up and act(gate) over the k experts 3·e·k·I; three int64 index tensors of k per token (the sort
  permutation, the token each row gathers, the inverse permutation) 3·8·k; the routing weights gathered per row,
  w·k (w = 4 for Mixtral, whose weights stay fp32; e for Qwen, which casts them to the compute dtype), and the
  expert outputs they scale, e·k·h (their gradient needs it). A (E,) int32 offsets tensor is per layer.
* 4-bit experts run under a non-reentrant activation checkpoint: it keeps only its inputs, the hidden states e·h
  (no new bytes when LoRA with dropout 0 keeps that tensor already: a shared expert's gate/up) and the routing
  weights w·k (the indices are the router's). Backward recomputes the experts one layer at a time: the transient
  ``experts_recompute_bytes``, the dequantized weights E·3·I·h·e + the offsets 4·E + the 16-bit experts' terms
  above per token. A layer whose weights exceed ``PlanConfig.experts_dequant_bytes`` (DeepSeek-V3: ~22 GB in bf16)
  runs its experts in groups that fit, each under its own checkpoint: the weights' term is one group's.
* 4-bit experts with LoRA: each forward adds scaling·B_e·A_e to the dequantized weights (``baddbmm``), so the
  recompute keeps the live weights (the same bytes), the factors cast to the compute dtype when they are stored in
  another (fp32 LoRA under bf16 compute at ZeRO-3: e·r·E·(2h + 3I)), and, as the weights now need a gradient,
  ``grouped_mm``'s inputs, e·k·(h + I) per token (measured). Its backward then materializes each weight's full
  gradient (E×2I×h, E×h×I, e-byte) before reducing it to dA, dB; down's runs first, and its saved weight is freed
  before gate_up's gradient is made, so at the peak (measured live tensors) the weights' gradients add
  ``experts_lora_grad_bytes``: e·E·2I·h (both gradients, less down's weight).
* Qwen2-MoE's shared-expert gate: sigmoid(shared_expert_gate(x)) · shared expert's output keeps both, e·(1 + h).
* Mixtral's ``router_jitter_noise`` > 0 (training only): the in-place multiply keeps its noise, e·h.
"""
from __future__ import annotations

import os

from ..errors import QLoRADSError
from .presets import ModelShape

# qlora_ds.nn.quantized_experts.DEQUANT_LIMIT, read from the same variable (the planner imports no torch)
DEQUANT_LIMIT = int(float(os.environ.get("QLORA_DS_EXPERTS_DEQUANT_MB", "2048")) * (1 << 20))


def top_k(shape: ModelShape) -> int:
    """Experts per token: ModelShape's ``intermediate`` of a MoE is top-k · expert width + the shared expert's."""
    return (shape.intermediate - shape.shared_expert_intermediate) // shape.expert_intermediate


def nf4_part_bytes(n: int, double_quant: bool = True, blocksize: int = 64, nested: int = 256) -> tuple[int, ...]:
    """Bytes of the uint8 tensors one n-element weight is stored as in 4 bit (QLoRALinear, QuantizedExperts): codes,
    absmax codes, nested fp32 absmax, offset with double quant; codes, fp32 absmax without."""
    blocks = -(-n // blocksize)
    if double_quant:
        return (n + 1) // 2, blocks, 4 * -(-blocks // nested), 4
    return (n + 1) // 2, 4 * blocks


def expert_lora_dims(shape: ModelShape) -> tuple[tuple[int, int], ...]:
    """(in, out) of one expert's matrix per fused weight, as PEFT reads them: gate_up (h, 2I), down (I, h)."""
    h, i = shape.hidden, shape.expert_intermediate
    return ((h, 2 * i), (i, h)) if shape.experts else ()


def expert_lora_params(shape: ModelShape, r: int) -> int:
    """``lora_experts``' trainable parameters over all layers: lora_A (r·E, in) + lora_B (out, r·E) per weight."""
    return shape.layers * sum(r * shape.experts * (a + b) for a, b in expert_lora_dims(shape))


def check_lora_experts(cfg) -> None:
    """A PlanConfig's ``lora_experts`` is what finetune --lora-experts (and QLoRAConfig) accept: LoRA on the 4-bit
    experts of an NF4/FP4 base (QLoRA), at LoRA dropout 0; else QLoRADSError, as they refuse it."""
    if not cfg.lora_experts:
        return
    why = ("quantize_experts=False keeps them 16-bit" if not cfg.quantize_experts else
           "QA-LoRA (quant int) leaves them 16-bit" if cfg.quant == "int" else
           "a 16-bit base leaves them unquantized" if cfg.base_bits >= 16 else
           f"lora_dropout={cfg.lora_dropout}: their update is folded into the weights, where dropout cannot act"
           if cfg.lora_dropout else "")
    if why:
        raise QLoRADSError(f"planner: lora_experts=True adapts the 4-bit MoE experts, but {why}; finetune "
                           f"--lora-experts refuses this too: plan QLoRA with 4-bit experts and LoRA dropout 0, "
                           f"or drop lora_experts")


def lora_on_experts(cfg) -> str:
    """The report's words for a plan's (a PlanConfig's) experts' share of its LoRA parameters."""
    n = expert_lora_params(cfg.shape, cfg.lora_r) if cfg.lora_experts else 0
    return f" ({n:,} on the MoE experts)" if n else ""


def router_params_per_layer(shape: ModelShape) -> int:
    """The e-byte MoE parameters of one layer beside the 3-D experts: the router, Qwen2-MoE's shared-expert gate."""
    return shape.expert_params // shape.layers - sum(shape.expert_tensors()) if shape.experts else 0


def moe_weight_bytes(shape: ModelShape, elem: int, quantized: bool, double_quant: bool = True) -> float:
    """Bytes of the model's MoE weights: the 3-D experts in 4 bit (``quantized``) or e-byte, the routers e-byte."""
    if not shape.experts:
        return 0
    experts = (sum(sum(nf4_part_bytes(n, double_quant)) for n in shape.expert_tensors()) if quantized
               else elem * sum(shape.expert_tensors()))
    return shape.layers * (experts + elem * router_params_per_layer(shape))


def _routing_weight_bytes(shape: ModelShape, e: int) -> int:
    return 4 if shape.layout.family == "mixtral" else e


def experts_bytes_per_token(shape: ModelShape, elem: int, lora: bool = False) -> float:
    """What the experts module's own forward keeps per token (16-bit experts; for 4-bit ones, what backward
    recomputes): gate/up/act, the index tensors, the gathered routing weights, the expert outputs; with ``lora``
    (weights that need a gradient) also ``grouped_mm``'s inputs, the gathered hidden states and act(gate)·up."""
    e, k, i = elem, top_k(shape), shape.expert_intermediate
    weights = _routing_weight_bytes(shape, e)
    return 3 * e * k * i + 3 * 8 * k + weights * k + e * k * shape.hidden + (e * k * (shape.hidden + i) if lora else 0)


def moe_routing_bytes_per_token(shape: ModelShape, elem: int, *, quantized: bool, input_saved: bool = False) -> float:
    """Bytes per token one MoE decoder layer keeps for backward beyond its shared expert's gated MLP (see the module
    docstring); 0 if dense. ``quantized``: 4-bit experts (checkpointed); ``input_saved``: another saved tensor is the
    experts' input already (LoRA with dropout 0 on a linear reading it)."""
    if not shape.experts:
        return 0
    lay, e, h, k = shape.layout, elem, shape.hidden, top_k(shape)
    router = 4 * shape.experts + 8 * k + ((4 + 4 * k) if lay.norm_topk else 0)
    if quantized:
        experts = (0 if input_saved else e * h) + _routing_weight_bytes(shape, e) * k
    else:
        experts = experts_bytes_per_token(shape, e)
    shared_gate = e * (1 + h) if shape.shared_expert_intermediate else 0
    return router + experts + shared_gate + (e * h if lay.router_jitter else 0)


def experts_group(shape: ModelShape, elem: int, limit: int) -> int:
    """How many experts one call dequantizes: all of them, or as many as fit ``limit`` bytes (at least one), the
    groups ``qlora_ds.nn.quantized_experts`` runs a layer above its DEQUANT_LIMIT in."""
    per_expert = elem * sum(shape.expert_tensors()) // shape.experts
    return shape.experts if per_expert * shape.experts <= limit else max(1, limit // per_expert)


def experts_recompute_bytes(shape: ModelShape, elem: int, tokens: int, lora_r: int = 0,
                            factor_copies: bool = True, limit: int = DEQUANT_LIMIT) -> float:
    """4-bit experts: what one layer's experts keep in backward (recomputed under their checkpoint): the weights
    dequantized in the compute dtype (one group's, ``experts_group`` under ``limit``), the (E,) int32 offsets and the
    experts' activations for ``tokens``. With LoRA of rank ``lora_r`` (``lora_experts``): those activations with
    LoRA's, and the factors cast to the compute dtype (``factor_copies``: their stored dtype is another). Their
    weights' gradients: ``experts_lora_grad_bytes``. Run in groups, the layer's checkpoints also keep per routing slot
    its token's number, its slot and its renumbered expert (int64; the gathered routing weights replace the whole
    tensor's): 24·k per token (measured: 608 B for 24 slots), counted here for the one layer a checkpointed model
    recomputes; the activations stay the whole layer's, an upper bound."""
    if not shape.experts:
        return 0
    group = experts_group(shape, elem, limit)
    copies = elem * expert_lora_params(shape, lora_r) // shape.layers if lora_r and factor_copies else 0
    slots = 24 * top_k(shape) if group < shape.experts else 0
    return (group / shape.experts * (elem * sum(shape.expert_tensors()) + copies) + 4 * shape.experts
            + tokens * (experts_bytes_per_token(shape, elem, lora=bool(lora_r)) + slots))


def experts_lora_grad_bytes(shape: ModelShape, elem: int, limit: int = DEQUANT_LIMIT) -> float:
    """4-bit experts with LoRA: the weights' full-size gradients one layer's backward (one group's, as
    ``experts_recompute_bytes``) holds beside what it keeps, before they reduce to dA, dB: gate_up's E·2I·h and
    down's E·h·I, less down's weight (freed by then): e·E·2I·h."""
    if not shape.experts:
        return 0
    return elem * shape.expert_tensors()[0] * experts_group(shape, elem, limit) / shape.experts


def experts_transients(cfg, lora_bytes: int) -> list[tuple[str, float, str]]:
    """A plan's (PlanConfig's) backward transients of its 4-bit experts: (item name, bytes, note)."""
    if not cfg.experts_4bit:
        return []
    s, e, limit = cfg.shape, cfg.elem, cfg.experts_dequant_bytes
    r = cfg.lora_r if cfg.lora_experts else 0     # LoRA's factors are cast when not stored in the compute dtype
    group = experts_group(s, e, limit)
    which = "one layer's experts" if group == s.experts else f"{group} of a layer's {s.experts} experts (a group)"
    items = [("moe_experts_recompute", experts_recompute_bytes(s, e, cfg.micro_batch * cfg.seq_len, r,
                                                               lora_bytes != e, limit),
              f"{which} dequantized ({cfg.compute_dtype}), recomputed")]
    if r:
        items.append(("moe_experts_lora_grads", experts_lora_grad_bytes(s, e, limit),
                      f"the full gradients of {which}' weights (their LoRA's dA, dB come from them)"))
    return items


def experts_words(cfg) -> str:
    """How a MoE plan (a PlanConfig) stores its experts: the report's words."""
    s = cfg.shape
    what = f"{s.layers}x{s.experts} experts"
    if cfg.experts_4bit:
        lora = f" + LoRA r={cfg.lora_r}" if cfg.lora_experts else ""
        return f"{what} in 4 bit ({cfg.base_bits_per_param:.3f} bit/param, frozen{lora}), routers {cfg.compute_dtype}"
    why = ("--no-quantize-experts" if not cfg.quantize_experts else "QA-LoRA quantizes the linears only"
           if cfg.quant == "int" else "16-bit base")
    return f"{what} + routers unquantized in {cfg.compute_dtype} ({why})"
