"""Per-GPU peak memory of QLoRA training under DeepSpeed, from the model shape alone.

Every term is a pure function of ``PlanConfig``; ``estimate_memory`` returns the items by name so a
user can see where the memory goes. Units: bytes. Formulas (b = micro batch, s = sequence length,
h = hidden, i = intermediate, kv = key/value width, L = layers, V = vocab, P = LoRA parameters,
N = data-parallel world size):

* quantized linears: L·Σ(in·out) · bits/8, bits = 4 + 8/64 + 32/(64·256) = 4.127 (NF4 + double quant);
  16 for a bf16 base. Embedding, lm_head and norms stay 16-bit. ZeRO-3 divides both by N. A MoE's fused 3-D experts
  (``moe_experts``, plan/moe.py) in the same 4-bit format per tensor (``quantize_experts``, the default), else
  16-bit; their routers 16-bit; ZeRO-3 divides them by N too.
* LoRA: P = L·Σ r·(in+out) over the target linears, + L·r·E·(2h + 3I) on a MoE's 4-bit experts with
  ``lora_experts`` (moe.py; their weights' gradients in backward: ``moe_experts_lora_grads``). Working copy bf16
  (2 B; fp32, 4 B, under ZeRO-3 in bf16: zero.Init partitions A/B as built), gradients 16-bit (2 B), master copy
  fp32 (4 B; bf16 with ``bf16_master``), Adam moments 2×4 B (2×1 B + 8 B per 256-block absmax for 8-bit Adam, whose
  step dequantizes per block: no fp32 moments). ZeRO-1 divides master + moments by N, ZeRO-2 also the gradients,
  ZeRO-3 also the working copy.
  The optimizer step, when activations are already freed, is the "step" phase: ZeRO-0 (FP16_UnfusedOptimizer)
  converts the 16-bit gradients to fp32 (4·P) inside step() only; ZeRO-1/2/3 flatten this rank's gradient
  partition (2·P/N; 4·P/N in fp32) and copy that to fp32 (4·P/N; none when it is fp32 already).
  ``grad_accum_fp32`` (data_types.grad_accum_dtype "fp32") at ZeRO-1 in bf16 selects BF16_Optimizer: a full fp32
  gradient buffer (4·P) beside the bf16 gradients, no bucket, no step copy; DeepSpeed refuses it at ZeRO-0. At
  ZeRO-2/3 (16-bit compute) the gradient partition is fp32 (4·P/N in place of 2·P/N), the buckets stay 16-bit, and
  the step makes no fp32 copy (ZeRO-2's buffer is flat already; ZeRO-3's flatten of it is 4·P/N).
* ZeRO-Offload (``offload_optimizer`` cpu/nvme): masters, moments and the fp32 gradient partition (at ZeRO-1/2
  with a 16-bit staging copy; at ZeRO-3 also the gradient partitions) live on the host: the "host" phase, outside
  the GPU figures, and the GPU makes no step copy. ``offload_param`` (ZeRO-3) moves the partitioned weights too.
* compute dtype (``compute_dtype``, e bytes per element: 2 for bf16/fp16, 4 for fp32): activations,
  embeddings and dequantized weights are e bytes. With fp32 compute the LoRA weights train in fp32
  themselves: 4 B working copy, 4 B gradients, no master copy, no fp32 gradient copy at the step.
* activations, per token and layer, saved for backward (e bytes unless noted), by the model's layout (layouts.py):
  each RMSNorm its fp32 input 4h and fp32 rstd 4 (the norm weights are frozen, so the e-byte output is kept only
  by what reads it: LoRA's input below), OLMo's parameter-free LayerNorm its fp32 input 4h + mean and rstd 8, each
  LayerNorm its e·h input (once when a parallel block's norms read one input) + mean and rstd; the attention and q/k
  norms (attention.py: SDPA's q, k, v, output and log-sum-exp, Falcon's masks, eager attention's probabilities
  per head and key, what dropout and packed rows add); a gated MLP's gate, up, act(gate) 3·e·i, a plain MLP's
  activation input e·i (×4 for GPT-2's composite gelu_new); a MoE layer's routing (moe.py: router probabilities,
  top-k indices, Qwen2-MoE's shared-expert gate; 16-bit experts: their gate/up/act over the top-k experts, index
  tensors, routing weights and outputs; 4-bit experts, checkpointed: their inputs only, and in backward one
  layer's experts recomputed with their dequantized weights, ``moe_experts_recompute``). LoRA
  adds per target linear the dropped input e·in (+1·in bool mask when dropout > 0; an input the layer's linears
  share, once when dropout = 0) and A·x e·r.
  Without checkpointing: L·b·s·(that). With checkpointing: L·b·s·e·h (layer inputs) plus one
  layer's full activations recomputed, plus the input gradient in flight (e·b·s·max(h, i)).
  Logits: b·s·V·12 B: at the backward peak the fp32 log-softmax output, the gradient coming into it
  and the gradient it produces (measured with the profiler: 12.0 B/element), plus e B for Gemma-2's soft cap (its
  tanh output); ``chunked_loss`` plans the chunked loss instead where it runs on the model (plan/loss.py).
* ZeRO-3 gather: the layer in use plus the prefetched one (packed bytes), or the lm_head, whichever
  is larger; dequantization workspace: the largest linear in the compute dtype; NF4 weights kept from
  forward to backward: one layer's linears (all layers without checkpointing), at most 256 MiB. On a CPU that
  runs the fused AMX linear (``fused_cpu_linear``, bf16) the linears it takes at b·s rows (≤ 256; ≤ 1024 for
  weights of ≥ 8M elements) never write a dequantized weight: neither term counts them.
* overhead: the runtime before the model — on a GPU the CUDA context + cuBLAS workspace (640 MiB); on
  CPU the process itself (interpreter, torch, transformers, DeepSpeed, tokenizer: 420 MiB measured with
  the pinned versions, what ``launch/finetune.py`` holds before it loads the model); ``runtime_bytes``
  overrides either, e.g. with a measured value. On CPU, training adds memory that is not tensors:
  30 MiB of kernel code, JIT kernels and engines, and — the large part — memory kept for every
  distinct batch shape run so far, about that batch's fp32 logits (4·b·w·V bytes for width w; oneDNN's
  primitive cache holds part of it): over a run 4·b·V·Σw over the widths met, which padding batches
  to a multiple (``pad_multiple``, ``launch/finetune.py --pad-to-multiple-of``, default 16) keeps to L/16 widths
  (a run's own check sums the widths it met, ``width_sum``: packed rows meet one or two).
  Both figures were measured on finetunes of a 2-layer, hidden-64 model (tensors negligible) at
  max_len 48 and 128, and checked on SmolLM2-135M runs. Plus 5 % of the transient tensors for allocator
  fragmentation. ZeRO-1/2 gradient bucket: DeepSpeed allocates ``reduce_bucket_size`` elements
  (bf16 at ZeRO-2, the fp32 accumulator at ZeRO-1; twice with ``overlap_comm``) every micro step; ZeRO-3 with
  ``contiguous_gradients`` (DeepSpeed's default) keeps one such 16-bit buffer; a GPU holds all of it, a CPU only
  the pages written (min(bucket, P) elements).
* QA-LoRA bases (``quant="int"``): bits + 64/group bits/param (an fp32 scale and zero per group).
* paged optimizer: the Adam moments live in unified memory and are evicted to host under pressure,
  so they are counted as spillable: the run fits when peak − spillable ≤ GPU memory.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..errors import QLoRADSError
from .attention import PACKED_SHORT_LEN  # noqa: F401 (tests/test_packing.py reads it here)
from .attention import (attention_bytes_per_token, model_dropout_bytes_per_token, packed_eager_bytes_per_token,
                        qk_norm_bytes)
from .loss import CHUNK_LOGITS, chunked_loss_bytes, logits_loss_bytes  # noqa: F401 (read here by tests)
from .moe import (DEQUANT_LIMIT, check_lora_experts, expert_lora_params, experts_transients, experts_words,
                  lora_on_experts, moe_routing_bytes_per_token, moe_weight_bytes)
from .presets import Linear, ModelShape

GiB = 1 << 30
MiB = 1 << 20
NF4_DQ_BITS = 4 + 8 / 64 + 32 / (64 * 256)   # 4.127 bits/param
NF4_BITS = 4 + 32 / 64                        # 4.5 without double quant
ALL_LINEAR = "all-linear"      # LoRA on every linear of the layer (inject's default: no target_modules)
CUDA_CONTEXT_BYTES = 640 * MiB
CPU_RUNTIME_BYTES = 420 * MiB
CPU_TRAINING_RUNTIME_BYTES = 30 * MiB
CPU_SHAPE_CACHE_BYTES_PER_LOGIT = 4
FRAGMENTATION = 0.05
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
OFFLOAD = ("none", "cpu", "nvme")


@dataclass(frozen=True)
class PlanConfig:
    shape: ModelShape
    gpus_per_node: int = 1
    nodes: int = 1
    gpu_mem_bytes: int = 48 * GiB
    seq_len: int = 512
    micro_batch: int = 1
    grad_accum: int = 16
    zero_stage: int = 2
    lora_r: int = 64
    lora_targets: tuple | str = ALL_LINEAR   # module names (leaf or path in the layer), or ALL_LINEAR
    lora_dropout: float = 0.05
    grad_ckpt: bool = True
    bf16_master: bool = False
    base_bits: int = 4
    quant: str = "nf4"                   # nf4 (QLoRA; FP4 is the same size) | int (QA-LoRA INT-N)
    group_size: int = 32                 # QA-LoRA's quantization group
    double_quant: bool = True
    optim_bits: int = 32
    paged: bool = False
    device: str = "cuda"
    reduce_bucket_elems: int = 50_000_000
    overlap_comm: bool = False
    interconnect_gbps: float = 100.0     # per node NIC, Gbit/s
    intra_node_gbps: float = 2400.0      # NVLink-class, Gbit/s (300 GB/s)
    tflops: float = 100.0                # achieved bf16 TFLOP/s per GPU
    runtime_bytes: int | None = None     # memory held before the model; None: the device's default
    compute_dtype: str = "bf16"          # bf16 | fp16 | fp32: activations, embeddings and (fp32) LoRA bytes
    pad_multiple: int = 16               # batch widths are rounded up to this (CPU shape cache)
    chunked_loss: bool = False           # LM head + CE over token chunks (qlora_ds.loss) where it runs: plan/loss.py
    keep_dequant_bytes: int = 256 * MiB  # qlora_ds.nn.functional.KEEP_LIMIT: NF4 weights kept from forward to backward
    fused_cpu_linear: bool = False       # the CPU runs NF4 linears fused (AMX, bf16: qlora_ds.ops.fused_linear)
    quantize_experts: bool = True        # QLoRAConfig.quantize_experts: MoE experts in 4 bit (plan/moe.py)
    lora_experts: bool = False           # QLoRAConfig.lora_experts: LoRA on those 4-bit experts (dropout 0; moe.py)
    experts_dequant_bytes: int = DEQUANT_LIMIT  # quantized_experts.DEQUANT_LIMIT: larger layers run in expert groups
    packing: bool = False                # finetune --packing: attention per example (qlora_ds.nn.packed_attention)
    width_sum: int | None = None         # Σ of the batch widths met (a run's check); None: every padded width
    contiguous_gradients: bool = True    # DeepSpeed's default; ZeRO-3 then keeps a reduce_bucket_size buffer
    offload_optimizer: str = "none"      # none | cpu | nvme (ZeRO-Offload: masters, moments, fp32 grads on the host)
    offload_param: str = "none"          # none | cpu | nvme (ZeRO-3: the partitioned weights on the host)
    grad_accum_fp32: bool = False        # ds_config data_types.grad_accum_dtype = "fp32"
    persistence_threshold: int = 100_000  # ZeRO-3: tensors this small stay gathered (DeepSpeed default)
    max_live_parameters: int = 1_000_000_000
    max_reuse_distance: int = 1_000_000_000

    def __post_init__(self):
        checks = [
            (self.gpus_per_node >= 1, "gpus", self.gpus_per_node, "use --gpus 1 or more"),
            (self.nodes >= 1, "nodes", self.nodes, "use --nodes 1 or more"),
            (self.gpu_mem_bytes > 0, "gpu_mem", self.gpu_mem_bytes, "give e.g. --gpu-mem 48GB"),
            (self.seq_len >= 1, "seq_len", self.seq_len, "use a positive --seq-len"),
            (self.micro_batch >= 1, "batch", self.micro_batch, "use a positive --batch"),
            (self.grad_accum >= 1, "grad_accum", self.grad_accum, "use a positive --grad-accum"),
            (self.zero_stage in (0, 1, 2, 3), "zero", self.zero_stage, "use --zero 0, 1, 2 or 3"),
            (self.lora_r >= 0, "lora_r", self.lora_r, "use --lora-r 0 or more"),
            (self.base_bits in ((4, 16) if self.quant == "nf4" else (2, 3, 4, 16)), "bits", self.base_bits,
             "use --bits 4 or 16 (2, 3, 4 with --quant int)"),
            (self.quant in ("nf4", "int"), "quant", self.quant, "use --quant nf4 or int"),
            (self.group_size >= 1, "group_size", self.group_size, "use a positive --group-size"),
            (self.pad_multiple >= 1, "pad_multiple", self.pad_multiple, "use --pad-multiple 1 or more"),
            (self.runtime_bytes is None or self.runtime_bytes >= 0, "runtime_bytes", self.runtime_bytes,
             "give a size of 0 or more, e.g. --runtime-mem 400MB"),
            (self.optim_bits in (8, 32), "optim_bits", self.optim_bits, "use --optim-bits 8 or 32"),
            (0.0 <= self.lora_dropout < 1.0, "lora_dropout", self.lora_dropout, "use a value in [0, 1)"),
            (self.device in ("cuda", "cpu"), "device", self.device, "use cuda or cpu"),
            (self.interconnect_gbps > 0 and self.intra_node_gbps > 0, "interconnect_gbps",
             self.interconnect_gbps, "use a positive bandwidth"),
            (self.tflops > 0, "tflops", self.tflops, "use a positive --tflops"),
            (self.compute_dtype in DTYPE_BYTES, "compute_dtype", self.compute_dtype, "use bf16, fp16 or fp32"),
            (self.offload_optimizer in OFFLOAD, "offload_optimizer", self.offload_optimizer, "use none, cpu or nvme"),
            (self.offload_param in OFFLOAD, "offload_param", self.offload_param, "use none, cpu or nvme"),
            (self.offload_optimizer == "none" or self.zero_stage >= 1, "offload_optimizer", self.offload_optimizer,
             "offload needs ZeRO stage 1, 2 or 3"),
            # DeepSpeed 0.19.8 raises "unsupported mix of model_dtype and grad_accum_dtype" at ZeRO-0
            (not self.grad_accum_fp32 or self.zero_stage >= 1 or self.compute_dtype == "fp32", "grad_accum_dtype",
             "fp32", f"DeepSpeed refuses fp32 gradient accumulation with {self.compute_dtype} at ZeRO-0; use ZeRO "
             "stage 1 or more, or remove data_types.grad_accum_dtype"),
        ]
        for ok, name, value, fix in checks:
            if not ok:
                raise QLoRADSError(f"planner: {name}={value!r} is invalid; {fix}")
        check_lora_experts(self)
        if self.lora_targets != ALL_LINEAR and self.lora_targets and not targeted(self.shape, self.lora_targets):
            names = ", ".join(lin.name for lin in self.shape.layer_linears())
            raise QLoRADSError(f"the planner models LoRA on the linears of this {self.shape.layout.family} layout "
                               f"({names}; by leaf name or this path, as target_modules): lora targets "
                               f"{list(self.lora_targets)} match none of them")
        if self.quant == "int" and self.base_bits < 16:
            # what QALoRALinear requires (qlora_ds.quant.intn.check_group_size) of every linear it wraps
            bad = sorted({a for a, _ in self.shape.linears().values() if a and a % self.group_size})
            if self.group_size % 8 or bad:
                raise QLoRADSError(f"planner: QA-LoRA group_size={self.group_size} must be a multiple of 8 that "
                                   f"divides every linear's input width{f' (not {bad})' if bad else ''}; use e.g. "
                                   "--group-size 32, 64 or 128")

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def elem(self) -> int:
        """Bytes per element of the compute dtype (activations, embeddings, dequantized weights)."""
        return DTYPE_BYTES[self.compute_dtype]

    @property
    def base_bits_per_param(self) -> float:
        if self.base_bits == 16:
            return 16.0
        if self.quant == "int":
            return self.base_bits + 64 / self.group_size
        return NF4_DQ_BITS if self.double_quant else NF4_BITS

    @property
    def experts_4bit(self) -> bool:
        """A MoE's experts are stored in 4 bit: ``quantize_experts`` with an NF4/FP4 base (inject leaves them
        16-bit under QA-LoRA; a 16-bit base quantizes nothing)."""
        return bool(self.shape.experts) and self.quantize_experts and self.quant == "nf4" and self.base_bits < 16

    @property
    def runtime(self) -> tuple[str, int, str]:
        """(item name, bytes, note) of what the process holds before the model is loaded."""
        if self.device == "cuda":
            name, default, note = "cuda_context", CUDA_CONTEXT_BYTES, "context + cuBLAS workspace"
        else:
            name, default, note = "process_runtime", CPU_RUNTIME_BYTES, "interpreter + libraries + tokenizer"
        if self.runtime_bytes is None:
            return name, default, note
        return name, self.runtime_bytes, note + " (given)"


@dataclass(frozen=True)
class Item:
    name: str
    bytes: float
    phase: str = "static"        # static | backward | step | host (ZeRO-Offload: not on the GPU)
    spillable: bool = False
    note: str = ""


@dataclass(frozen=True)
class MemoryEstimate:
    items: tuple
    capacity: int

    def phase_bytes(self, phase: str) -> float:
        return sum(it.bytes for it in self.items if it.phase == phase)

    def get(self, name: str) -> float:
        return sum(it.bytes for it in self.items if it.name == name)

    @property
    def peak(self) -> float:
        """Per-GPU peak if every tensor were resident: static + the larger transient phase."""
        return self.phase_bytes("static") + max(self.phase_bytes("backward"), self.phase_bytes("step"))

    @property
    def first_step_peak(self) -> float:
        """Peak of the very first optimizer step: Adam allocates its moments in that step, after the
        backward pass, so they are not resident during the first backward (later steps: ``peak``)."""
        moments = sum(it.bytes for it in self.items if it.name == "optimizer_states" and it.phase == "static")
        static = self.phase_bytes("static") - moments
        return static + max(self.phase_bytes("backward"), moments + self.phase_bytes("step"))

    @property
    def spillable(self) -> float:
        return sum(it.bytes for it in self.items if it.spillable and it.phase != "host")

    @property
    def host(self) -> float:
        """What ZeRO-Offload keeps in host memory (or NVMe) instead: not part of the GPU figures."""
        return self.phase_bytes("host")

    @property
    def required(self) -> float:
        """Device memory that must be resident (paged optimizer state may leave)."""
        return self.peak - self.spillable

    @property
    def device_peak(self) -> float:
        """Predicted device peak: what is resident after paging evicts what does not fit."""
        return min(self.peak, max(self.required, self.capacity))

    @property
    def paged_out(self) -> float:
        return max(0.0, self.peak - self.capacity) if self.fits else 0.0

    @property
    def fits(self) -> bool:
        return self.required <= self.capacity

    def as_dict(self) -> dict:
        return {"items": {it.name: {"bytes": int(it.bytes), "phase": it.phase, "spillable": it.spillable}
                          for it in self.items},
                "peak_bytes": int(self.peak), "required_bytes": int(self.required),
                "device_peak_bytes": int(self.device_peak), "spillable_bytes": int(self.spillable),
                "paged_out_bytes": int(self.paged_out), "capacity_bytes": int(self.capacity),
                "host_bytes": int(self.host), "fits": self.fits}


# ---- pure pieces -------------------------------------------------------------------------------

def targeted(shape: ModelShape, targets=ALL_LINEAR) -> tuple[Linear, ...]:
    """The linears of one layer that LoRA wraps: every one for ``ALL_LINEAR``, else those whose path inside the
    layer is a target or ends with "." + a target ('q_proj', 'self_attn.q_proj') — PEFT's and inject's rule
    (``QLoRAConfig.matches``); a name the layer lacks matches nothing, as there."""
    if targets == ALL_LINEAR:
        return shape.layer_linears()
    return tuple(lin for lin in shape.layer_linears()
                 if any(lin.name == t or lin.name.endswith("." + t) for t in targets))


def lora_params(shape: ModelShape, r: int, targets=ALL_LINEAR, pool_group: int = 1) -> int:
    """LoRA parameters: r·(in+out) per target linear, over all layers; QA-LoRA (``pool_group`` = its group size)
    pools A's input per group: r·(in/group + out)."""
    return shape.layers * sum(r * (lin.in_features // pool_group + lin.out_features)
                              for lin in targeted(shape, targets))


def cfg_lora_params(cfg: "PlanConfig") -> int:
    """``lora_params`` of a plan (QA-LoRA's A is in/group_size wide), + the 4-bit experts' with ``lora_experts``."""
    return (lora_params(cfg.shape, cfg.lora_r, cfg.lora_targets, cfg.group_size if cfg.quant == "int" else 1)
            + (expert_lora_params(cfg.shape, cfg.lora_r) if cfg.lora_experts else 0))


def rank_for_fraction(shape: ModelShape, fraction: float, targets=ALL_LINEAR) -> float:
    """The (real-valued) r whose LoRA has ``fraction`` of the model's parameters."""
    return fraction * shape.total_params / lora_params(shape, 1, targets)


def base_weight_bytes(shape: ModelShape, bits_per_param: float, embed_bytes: int = 2, experts_4bit: bool = False,
                      double_quant: bool = True) -> dict:
    """The frozen weights by kind; ``moe_experts`` (a MoE's experts and routers) in 4 bit with ``experts_4bit``."""
    return {"quantized_linears": shape.linear_params * bits_per_param / 8,
            "embeddings_norms": (shape.embedding_params - shape.expert_params) * embed_bytes,
            "moe_experts": moe_weight_bytes(shape, embed_bytes, experts_4bit, double_quant)}


def activation_bytes_per_token_layer(shape: ModelShape, r: int, targets=ALL_LINEAR, dropout: float = 0.05,
                                     elem: int = 2, mask_bytes: int = 1, keys: int = 0, batch: int = 1,
                                     quantized_experts: bool = True) -> float:
    """Bytes autograd keeps per token in one decoder layer (see the module docstring); ``elem``: bytes per
    element of the compute dtype (2 for bf16/fp16, 4 for fp32; the norms' fp32 part is 4 either way);
    ``mask_bytes``: dropout's saved mask per element (torch's bool mask on CUDA; 0 on the CPU, where
    ``qlora_ds.nn.dropout`` regenerates it from a seed); ``keys``: the keys each token attends to (the sequence
    length; 0 leaves out eager attention's probabilities), ``batch``: the micro batch; ``quantized_experts``: a MoE's
    experts are 4-bit (checkpointed: moe.py). The model's own dropout: ``model_dropout_bytes_per_token``."""
    lay, h, i, e = shape.layout, shape.hidden, shape.intermediate, elem
    if lay.norm == "layer":
        # nn.LayerNorm keeps its e-byte input (once when both norms read the layer input) and its mean and rstd
        norms = (1 if lay.parallel else lay.norms) * e * h + lay.norms * 2 * e
    else:
        # fp32 input and rstd (RMSNorm) or mean and rstd (OLMo's LayerNorm without parameters)
        norms = lay.norms * (4 * h + (8 if lay.norm == "fixed" else 4))
    attention = attention_bytes_per_token(shape, e, keys, batch) + qk_norm_bytes(shape, e)
    if shape.experts:
        i = shape.shared_expert_intermediate      # the routed experts' gate/up/act are moe.py's
    mlp = 3 * e * i if lay.gated else lay.act_saved * e * i   # gate, up, act(gate) | the activation's input (+ parts)
    lin = targeted(shape, targets) if r and targets else ()
    # LoRA with dropout 0 on a linear reading the MoE block's input keeps the tensor the 4-bit experts' checkpoint keeps
    shared = dropout == 0 and any(t.reads == "mlp_in" for t in lin)
    base = norms + attention + mlp + moe_routing_bytes_per_token(shape, e, quantized=quantized_experts,
                                                                 input_saved=shared)
    if not lin:
        return base
    if dropout > 0:
        lora = sum((e + mask_bytes) * t.in_features + e * r for t in lin)   # dropped copy (+ mask)
    else:
        # linears reading one tensor (q/k/v, gate/up; a parallel block's attention and MLP) store it once
        distinct = {t.reads: t.in_features for t in lin}
        lora = sum(e * v for v in distinct.values()) + e * r * len(lin)
    return base + lora


def activation_bytes(cfg: PlanConfig) -> dict:
    s = cfg.shape
    tokens = cfg.micro_batch * cfg.seq_len
    e = cfg.elem
    per_layer = tokens * activation_bytes_per_token_layer(s, cfg.lora_r, cfg.lora_targets, cfg.lora_dropout, e,
                                                          mask_bytes=1 if cfg.device == "cuda" else 0,
                                                          keys=cfg.seq_len, batch=cfg.micro_batch,
                                                          quantized_experts=cfg.experts_4bit)
    drop_layer, drop_once = model_dropout_bytes_per_token(s, e, cfg.device, cfg.seq_len, cfg.micro_batch)
    per_layer += tokens * drop_layer
    if cfg.packing and cfg.device == "cpu" and e == 2:
        per_layer += tokens * packed_eager_bytes_per_token(s, cfg.seq_len, e)
    if cfg.grad_ckpt:
        # only the layer being recomputed holds its activations (eager attention's probabilities included)
        stored = s.layers * tokens * e * s.hidden + per_layer + e * tokens * max(s.hidden, s.intermediate)
    else:
        stored = s.layers * per_layer
    stored += tokens * drop_once
    return {"activations": stored, "logits_loss": logits_loss_bytes(cfg, tokens)}


def cpu_shape_cache_bytes(cfg: PlanConfig) -> float:
    """4·b·V·Σw over the widths w = m, 2m, …, up to seq_len (m = pad_multiple), or over the widths a run met
    (``width_sum``: packed rows all have about the same width): see the module doc."""
    if cfg.width_sum is not None:
        return CPU_SHAPE_CACHE_BYTES_PER_LOGIT * cfg.micro_batch * cfg.shape.vocab * cfg.width_sum
    m = cfg.pad_multiple
    n = -(-cfg.seq_len // m)
    widths = m * n * (n + 1) / 2 - (n * m - cfg.seq_len)     # the last width is capped at seq_len
    return CPU_SHAPE_CACHE_BYTES_PER_LOGIT * cfg.micro_batch * cfg.shape.vocab * widths


# = qlora_ds.ops.fused_linear's MAX_ROWS, MAX_ROWS_LARGE, LARGE_WEIGHT (tests/test_plan.py checks they agree)
FUSED_MAX_ROWS, FUSED_MAX_ROWS_LARGE, FUSED_LARGE_WEIGHT = 256, 1024, 1 << 23


def fused_linear_takes(in_f: int, out_f: int, rows: int, blocksize: int = 64) -> bool:
    """Whether ``qlora_ds.ops.fused_linear`` computes an NF4 linear of this shape at ``rows`` tokens (on a CPU
    where the path is on): no bf16 weight is ever written for it, so it needs no workspace and no kept copy."""
    if in_f % 64 or out_f % 32 or blocksize < 64 or blocksize & (blocksize - 1):
        return False
    return rows <= (FUSED_MAX_ROWS_LARGE if in_f * out_f >= FUSED_LARGE_WEIGHT else FUSED_MAX_ROWS)


def unfused_linears(cfg: PlanConfig) -> dict[str, tuple[int, int]]:
    """The linears of one decoder layer whose weights are dequantized into memory for the widest batch
    (b·s rows): every one, unless the CPU runs the fused path (``fused_cpu_linear``: AMX, bf16, NF4 base)."""
    lin = cfg.shape.linears()
    if not (cfg.fused_cpu_linear and cfg.device == "cpu" and cfg.compute_dtype == "bf16" and cfg.quant == "nf4"):
        return lin
    rows = cfg.micro_batch * cfg.seq_len
    return {name: io for name, io in lin.items() if not fused_linear_takes(*io, rows)}


def _step_copies(cfg: PlanConfig, p: int, grad_bytes: int) -> list[Item]:
    """The gradient copies DeepSpeed's optimizer step makes and frees (no offload; see the module doc). ZeRO-1/2/3
    flatten this rank's gradient partition (stage_1_and_2.py / stage3.py step: a copy, unless ZeRO-2 accumulated it
    in its flat fp32 buffer) and convert it to the masters' dtype (a copy only where the two differ)."""
    z, n, fp32 = cfg.zero_stage, cfg.world_size, cfg.compute_dtype == "fp32"
    if z == 0:
        return [] if fp32 else [Item("step_fp32_grad_copy", p * 4, "step", note="FP16_UnfusedOptimizer's fp32 grads")]
    flat = cfg.grad_accum_fp32 and z == 2 and not fp32
    master = 2 if cfg.bf16_master and not fp32 else 4
    items = [] if flat else [Item("step_grad_flatten", p * grad_bytes / n, phase="step",
                                  note="this rank's gradient partition")]
    if grad_bytes != master:
        items.append(Item("step_fp32_grad_copy", p * master / n, phase="step",
                          note="this rank's gradient partition" + (" (bf16 masters)" if master == 2 else "")))
    return items


def estimate_memory(cfg: PlanConfig) -> MemoryEstimate:
    s, n = cfg.shape, cfg.world_size
    z = cfg.zero_stage
    w = base_weight_bytes(s, cfg.base_bits_per_param, cfg.elem, cfg.experts_4bit, cfg.double_quant)
    p = cfg_lora_params(cfg)
    part_params = n if z >= 3 else 1
    part_grads = n if z >= 2 else 1
    part_optim = n if z >= 1 else 1
    # 8-bit: two uint8 codes + two fp32 absmax per 256-block; the step is fused per block (bounded scratch, no fp32
    # copy of the moments: tests/test_optim.py bounds it), so nothing else is counted for it
    moment_bytes = 8 if cfg.optim_bits == 32 else 2 + 8 / 256
    master_bytes = 2 if cfg.bf16_master else 4
    fp32 = cfg.compute_dtype == "fp32"     # LoRA trains in fp32 itself: no 16-bit copy, no master, fp32 grads
    # ZeRO-3 partitions LoRA A/B as QLoRALinear builds them, fp32 (inject/loading.py halves them for fp16 only; the
    # engine casts only ZeRO 0-2 models): a 4-byte working copy
    lora_bytes = 4 if fp32 or (z >= 3 and cfg.compute_dtype == "bf16") else 2
    # bf16 with fp32 accumulation at ZeRO-1: DeepSpeed's BF16_Optimizer, a full fp32 gradient buffer beside the bf16
    # grads, no reduce bucket, no step copy. Otherwise gradients stay 16-bit until the step (ZeRO-0's
    # FP16_UnfusedOptimizer included: its fp32 grads exist only inside step())
    bf16_accum = cfg.grad_accum_fp32 and z == 1 and cfg.compute_dtype == "bf16"
    # fp32 accumulation at ZeRO-2/3 (DeepSpeed 0.19.8): this rank's gradient partition is fp32 (ZeRO-2's compact flat
    # buffer, stage_1_and_2.py _use_compact_grad_partition_buffer, replaces grads_in_partition; ZeRO-3's
    # grad_partitions_flat_buffer), the reduce buckets keep the 16-bit gradients, the step uses the fp32 partition
    # as it is; not counted: the fp32 cast of each reduced bucket as it is added in (backward, ≤ 4·min(bucket, P)/N)
    accum32 = cfg.grad_accum_fp32 and z >= 2 and not fp32
    grad_bytes = 4 if fp32 or accum32 else 2 + 4 if bf16_accum else 2
    if bf16_accum:
        part_grads = 1
    # ZeRO-Offload (on a GPU; on a CPU the host is the device): its terms go to the host column
    off_opt = cfg.offload_optimizer != "none" and cfg.device == "cuda"
    off_param = cfg.offload_param != "none" and z >= 3 and cfg.device == "cuda"
    opt_phase = "host" if off_opt else "static"
    param_phase = "host" if off_param else "static"
    where = f" (offloaded: {cfg.offload_optimizer})" if off_opt else ""

    items = [
        Item("quantized_linears" if cfg.base_bits < 16 else "bf16_linears", w["quantized_linears"] / part_params,
             param_phase, note=f"{cfg.base_bits_per_param:.3f} bit/param"),
        Item("embeddings_norms", w["embeddings_norms"] / part_params, param_phase, note=cfg.compute_dtype),
        *([Item("moe_experts", w["moe_experts"] / part_params, param_phase, note=experts_words(cfg))]
          if s.experts else []),
        Item("lora_params", p * lora_bytes / part_params, param_phase,
             note=f"{p:,} params in {'fp32' if lora_bytes == 4 else cfg.compute_dtype}{lora_on_experts(cfg)}"),
        # ZeRO-3 with offload keeps its gradient partitions in host memory (stage3.py: self.device is the CPU)
        Item("lora_grads", p * grad_bytes / part_grads, opt_phase if z >= 3 else "static",
             note="fp32" if fp32 else "bf16 + fp32 accumulation (BF16_Optimizer)" if bf16_accum else
             "fp32 accumulation (grad_accum_dtype)" if accum32 else "16-bit"),
        Item("master_weights", 0 if fp32 else p * master_bytes / part_optim, opt_phase,
             note=("none (fp32 training)" if fp32 else "bf16" if cfg.bf16_master else "fp32") + where),
        Item("optimizer_states", p * moment_bytes / part_optim, opt_phase, spillable=cfg.paged and not off_opt,
             note=f"Adam {cfg.optim_bits}-bit{' paged' if cfg.paged else ''}" + where),
    ]
    bucket_elems = cfg.reduce_bucket_elems if cfg.device == "cuda" else min(cfg.reduce_bucket_elems, p)
    if z in (1, 2) and p and not bf16_accum:
        items.append(Item("reduce_bucket", bucket_elems * (4 if z == 1 or fp32 else 2) * (2 if cfg.overlap_comm else 1),
                          note="double-buffered (overlap_comm)" if cfg.overlap_comm else ""))
    if z == 3 and p and cfg.contiguous_gradients:
        items.append(Item("reduce_bucket", bucket_elems * (4 if fp32 else 2), note="contiguous_gradients (ZeRO-3)"))
    if off_opt:
        # the fp32 gradient partition the host step reads (ZeRO-1/2: and the 16-bit staging copy of the update)
        items.append(Item("offload_grad_buffers", p * (4 + (2 if z < 3 else 0)) / n, "host",
                          note="fp32 grads" + (" + 16-bit staging" if z < 3 else "") + where))
    elif not bf16_accum:
        items += _step_copies(cfg, p, grad_bytes)

    act = activation_bytes(cfg)
    items += [Item(k, v, phase="backward") for k, v in act.items()]
    items += [Item(k, v, phase="backward", note=note) for k, v, note in experts_transients(cfg, lora_bytes)]
    # the linears whose weight is dequantized into memory: all of them, but the ones the fused CPU path computes
    lin = [a * b for a, b in unfused_linears(cfg).values()]
    if cfg.base_bits < 16 and lin:
        items.append(Item("dequant_workspace", max(lin) * cfg.elem, phase="backward",
                          note=f"largest linear in {cfg.compute_dtype}"))
    if cfg.base_bits < 16 and cfg.quant == "nf4" and cfg.keep_dequant_bytes and lin:
        # the kept-weight pool holds the layers alive between a forward and its backward: one decoder layer under
        # checkpointing (the recomputed one), else all of them, never more than its limit; it stays allocated
        per_layer = sum(lin) * cfg.elem
        items.append(Item("dequant_keep", min(cfg.keep_dequant_bytes, per_layer * (1 if cfg.grad_ckpt else s.layers)),
                          phase="backward", note="dequantized weights kept for backward (bounded pool)"))
    if z >= 3 and n > 1:
        layer = (s.linear_params_per_layer * cfg.base_bits_per_param / 8 + cfg_lora_params(cfg) / s.layers
                 * lora_bytes + w["moe_experts"] / s.layers)
        head = s.vocab * s.hidden * cfg.elem
        items.append(Item("zero3_gathered", max(2 * layer, head), phase="backward",
                          note="layer in use + prefetched layer, or lm_head"))
    transient = sum(it.bytes for it in items if it.phase == "backward")
    name, runtime, note = cfg.runtime
    items.append(Item(name, runtime, note=note))
    if cfg.device == "cpu":
        items.append(Item("cpu_training_runtime", CPU_TRAINING_RUNTIME_BYTES,
                          note="kernel code, JIT kernels, engines: not tensors"))
        items.append(Item("cpu_shape_cache", cpu_shape_cache_bytes(cfg),
                          note=f"kept per batch shape (oneDNN), widths padded to {cfg.pad_multiple}"))
    items.append(Item("fragmentation", FRAGMENTATION * transient, phase="backward"))
    return MemoryEstimate(tuple(items), cfg.gpu_mem_bytes)


# ---- advice ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Advice:
    knob: str
    flag: str
    peak_after: float
    fits_after: bool


def _candidates(cfg: PlanConfig):
    if cfg.base_bits == 16:
        yield "quantize the base model to NF4", "--bits 4", replace(cfg, base_bits=4)
    if cfg.shape.experts and not cfg.quantize_experts and cfg.quant == "nf4" and cfg.base_bits < 16:
        yield "store the MoE experts in 4 bit", "drop --no-quantize-experts", replace(cfg, quantize_experts=True)
    if cfg.lora_experts and cfg.shape.experts:
        yield "LoRA on the linears only, not the MoE experts", "drop --lora-experts", replace(cfg, lora_experts=False)
    if not cfg.grad_ckpt:
        yield "turn gradient checkpointing on", "(drop --no-grad-ckpt)", replace(cfg, grad_ckpt=True)
    if not cfg.paged:
        yield "use the paged optimizer", "--paged", replace(cfg, paged=True)
    if cfg.zero_stage < 3 and cfg.world_size > 1:
        yield "ZeRO-3 across the GPUs you have", "--zero 3", replace(cfg, zero_stage=3)
    per_node = cfg.gpus_per_node if cfg.nodes > 1 or cfg.gpus_per_node >= 8 else 8
    for gpus in (2, 4, 8, 16, 32, 64):
        if gpus <= cfg.world_size:
            continue
        g, nodes = (gpus, 1) if gpus <= per_node else (per_node, -(-gpus // per_node))
        c = replace(cfg, zero_stage=3, gpus_per_node=g, nodes=nodes)
        if estimate_memory(c).fits:
            yield f"ZeRO-3 across {c.world_size} GPUs", f"--zero 3 --gpus {g} --nodes {nodes}", c
            break
    if cfg.optim_bits == 32:
        yield "8-bit Adam states", "--optim-bits 8", replace(cfg, optim_bits=8)
    if not cfg.bf16_master:
        yield "bf16 master weights (bf16_master_weights_and_grads)", "--bf16-lora", replace(cfg, bf16_master=True)
    if cfg.micro_batch > 1:
        yield "a smaller micro batch (raise grad accumulation)", f"--batch {cfg.micro_batch // 2}", replace(
            cfg, micro_batch=cfg.micro_batch // 2, grad_accum=cfg.grad_accum * 2)
    if cfg.seq_len > 256:
        yield "shorter sequences", f"--seq-len {cfg.seq_len // 2}", replace(cfg, seq_len=cfg.seq_len // 2)
    if cfg.lora_r > 8:
        yield "a lower LoRA rank", f"--lora-r {cfg.lora_r // 4}", replace(cfg, lora_r=cfg.lora_r // 4)


def advise(cfg: PlanConfig) -> list[Advice]:
    """Knobs that lower the peak, each tried alone; those that make it fit come first."""
    base = estimate_memory(cfg).required
    out = []
    for knob, flag, c in _candidates(cfg):
        e = estimate_memory(c)
        if e.required < base:
            out.append(Advice(knob, flag, e.required, e.fits))
    return sorted(out, key=lambda a: (not a.fits_after, a.peak_after))
