"""Host (CPU) memory of loading a checkpoint with ``qlora_ds.from_pretrained``, and of one training step,
predicted from ``config.json`` alone. Validated against fresh processes by ``python -m bench scale``.

Load, from first principles (what the loader does, tensor by tensor, in ``named_modules`` order):

* every tensor is read from safetensors into memory the process owns (no mmap: page cache is not RSS),
  in the checkpoint dtype (config.json's ``torch_dtype``, c B/element), then converted to the load dtype (a new
  e-byte tensor while the c-byte one is alive, when the dtypes differ: an fp32 checkpoint loaded in bf16 holds
  6 B/element while a tensor is read);
* a target linear of n weights is quantized (NF4 + double quant, block 64/256): it keeps n/2 code bytes,
  n/64 absmax codes, 4·⌈n/64/256⌉ nested absmax and a 4-byte offset; while it runs, the float weight and
  the fp32 per-block absmax (4·n/64) are alive. Its LoRA A, B (fp32, r·(in+out)) and bias (load dtype) stay;
* embeddings, norms and lm_head (once when tied) stay in the load dtype; a MoE's fused 3-D experts are quantized as
  a linear's weight is (``quantize_experts``, no LoRA), else kept in the load dtype, their routers kept.
* allocator: the transients are freed before the next tensor; large blocks (> glibc's mmap threshold) go
  back to the OS at ``free``, small ones at the loader's ``malloc_trim`` after each layer. So the peak is
  the largest (resident so far + this tensor's transient) over the load order, not a sum.

ZeRO-3 (2 ranks): rank 0 reads and quantizes, ``deepspeed.zero.Init`` then broadcasts each parameter and
allocates this rank's 1/world partition while the whole tensor is still alive (``_partition_param``), so
a 16-bit tensor costs 1.5x itself for a moment: with Qwen2's tied 151936-row embedding that is the peak.

Step (the first one, as bench/scripts/scale_worker.py runs it): ``estimate_first_step``, three phases that
do not overlap under non-reentrant checkpointing (loss backward; the layers' backward; Adam's first step).

Not derivable from the shapes — the memory the process holds before the model (interpreter, torch,
transformers, qlora_ds and its compiled op; with DeepSpeed for a ZeRO-3 rank), the non-tensor memory of
the built model, and what the first training step adds beyond its tensors (code pages of the kernels it
runs, autograd and oneDNN state, heap kept by the allocator: a slack of about one layer's activations). These are
the only constants (plus the 5 % fragmentation allowance of ``memory.py``); they were measured once on ONE
model, ``CALIBRATION_MODEL``, and frozen here. Every other model's prediction is out of sample (bench/RESULTS.md,
"scale").
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import QLoRADSError
from .memory import (ALL_LINEAR, DTYPE_BYTES, FRAGMENTATION, MiB, MemoryEstimate, PlanConfig, activation_bytes,
                     activation_bytes_per_token_layer, base_weight_bytes, estimate_memory, lora_params,
                     unfused_linears)
from .moe import experts_transients, nf4_part_bytes
from .presets import ModelShape, shape_from_hf_config

# ---- the frozen calibration: bench/scale.py on llama-0.4b (SmolLM2-360M's shape) only, 2026-12-03, AMD EPYC
# (AVX-512 + AVX512_BF16, 2 cores), torch 2.13.0, transformers 5.23.0, deepspeed 0.19.8, bf16 step at seq 256,
# 1 thread. Do not refit on other models: they validate it. (AVX2 box, same model: 371 / 248 / 140 / 8 MiB.)
CALIBRATION_MODEL = "llama-0.4b"
RUNTIME_BYTES = 372 * MiB          # bench/scripts/scale_worker.py after its imports and warm-up (371.6 measured)
ZERO3_RUNTIME_BYTES = 249 * MiB    # bench/scripts/zero3_load.py rank before from_pretrained (DeepSpeed imported)
ZERO3_LAZY_IMPORT_BYTES = 136 * MiB  # that script's first from_pretrained imports the modeling code + op
LOAD_OVERHEAD_BYTES = 9 * MiB      # non-tensor memory of the built model (modules, hooks), measured after load (8.7)
# ---- the step beyond its tensors: glibc keeps freed blocks between live ones even with qlora_ds.heap's release (it
# runs between layers in the forward pass; the fragments form inside a layer's forward and backward), plus the code
# pages, autograd and oneDNN state the first step adds. Modelled as a constant + a slack proportional to ONE decoder
# layer's activations at this batch (what each layer's forward and recomputation allocate and free: the heap keeps
# fragments of about that size, however deep the model), both from llama-0.4b alone (gated heap release, bf16, Intel
# Xeon AMX, 2026-12-05): its seq-256 first step (849 MiB) and its seq-4096 later step with the chunked loss (974 MiB
# over the loaded model). Two equations: 2.44 x one layer's activations and -7.6 MiB, taken as 0. Frozen; validated at
# other models, depths and lengths (bench/RESULTS.md, "scale" and "longctx"). A slack proportional to all L layers'
# saved inputs (the first form, 1.67 x L.b.s.e.h) fitted the same two points but gave shallow models half their step
# (0.51-0.73 on a 12-layer model): the fragments do not grow with depth.
STEP_RUNTIME_BYTES = 0
HEAP_SLACK_PER_LAYER_ACTIVATION = 2.44


@dataclass(frozen=True)
class LoadEstimate:
    resident: float          # model bytes after the load (this rank)
    peak: float              # RSS high-water mark of the process during the load
    runtime: float
    largest_transient: float  # the bytes alive for the tensor at which the peak is reached (its kept bytes included)
    where: str               # the tensor at which the peak is reached

    def as_dict(self) -> dict:
        return {"resident_mib": round(self.resident / MiB, 1), "peak_mib": round(self.peak / MiB, 1),
                "runtime_mib": round(self.runtime / MiB, 1), "transient_mib": round(self.largest_transient / MiB, 1),
                "peak_at": self.where}


def nf4_dq_bytes(n: int, blocksize: int = 64, nested: int = 256) -> int:
    """Stored bytes of one NF4 + double-quant weight of n elements (QLoRALinear's frozen parameters)."""
    return sum(nf4_part_bytes(n, True, blocksize, nested))


def _ds_partition(nbytes: float, elem: int, world: int) -> float:
    """Bytes of one rank's ZeRO-3 partition of a tensor of ``nbytes``: DeepSpeed pads the element count to
    a multiple of world (``_aligned_size``) and each rank keeps ``aligned // world`` elements."""
    n = -(-int(nbytes) // elem)
    return -(-n // world) * elem


def load_order(cfg: dict, quantize_experts: bool = True) -> list[tuple[str, int, bool, int, int]]:
    """(name, elements, quantized, in, out) for every tensor the loader fills, in its order (a norm's weight and
    bias as one entry); names are the layout's (layouts.py), under ``layers.{k}``; in, out 0: no LoRA."""
    s = shape_from_hf_config(cfg)
    lay, h = s.layout, s.hidden
    npw = lay.norm_params_per_width
    out = [("embed_tokens", s.vocab * s.embed_width, False, 0, 0)]
    if lay.positions:
        out.append(("embed_positions", lay.positions * h, False, 0, 0))
    if lay.embed_width:     # OPT's project_in / project_out (16-bit)
        out += [("project_in", h * lay.embed_width, False, 0, 0), ("project_out", h * lay.embed_width, False, 0, 0)]
    if lay.embed_norm:
        out.append(("embed_norm", h * npw, False, 0, 0))
    qk = {"": [], "head": [s.head_dim] * 2, "full": [s.q_dim, s.kv_dim]}[lay.qk_norm]
    for k in range(s.layers):
        for lin in s.layer_linears():
            out.append((f"layers.{k}.{lin.name}", lin.in_features * lin.out_features, True, lin.in_features,
                        lin.out_features))
            if lin.bias:
                out.append((f"layers.{k}.{lin.name}.bias", lin.out_features, False, 0, 0))
            if s.experts and lin.name == lay.out:
                # MoE (named_modules order): the router, then the fused 3-D experts (4-bit, or the load dtype)
                gate_up, down = s.expert_tensors()
                out += [(f"layers.{k}.mlp.gate", s.experts * h, False, 0, 0),
                        (f"layers.{k}.mlp.experts.gate_up_proj", gate_up, quantize_experts, 0, 0),
                        (f"layers.{k}.mlp.experts.down_proj", down, quantize_experts, 0, 0)]
        if s.shared_expert_intermediate:
            out.append((f"layers.{k}.mlp.shared_expert_gate", h, False, 0, 0))
        out += [(f"layers.{k}.qk_norm{j}", w * npw, False, 0, 0) for j, w in enumerate(qk) if npw]
        out += [(f"layers.{k}.norm{j}", h * npw, False, 0, 0) for j in range(lay.norms) if npw]
    if lay.final_norm and npw:
        out.append(("norm", h * npw, False, 0, 0))
    if not s.tie_embeddings:
        out.append(("lm_head", s.vocab * s.embed_width, False, 0, 0))
    if lay.head_bias:
        out.append(("lm_head.bias", s.vocab, False, 0, 0))
    return out


_CKPT_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def checkpoint_dtype(cfg: dict) -> str:
    """The dtype the checkpoint of ``cfg`` (a config.json dict) stores its weights in, as config.json says
    (``torch_dtype``; ``dtype`` from transformers 5): bf16 when it says nothing."""
    named = cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"
    named = str(named).removeprefix("torch.")
    if _CKPT_DTYPES.get(named, named) not in DTYPE_BYTES:
        raise QLoRADSError(f"config.json's torch_dtype {named!r} is not one of {sorted(_CKPT_DTYPES)}; pass "
                           f"ckpt_dtype= with the dtype the safetensors files hold")
    return _CKPT_DTYPES.get(named, named)


def estimate_load(cfg: dict, dtype: str = "bf16", lora_r: int = 16, world: int = 1, zero_stage: int = 0,
                  runtime_bytes: float | None = None, ckpt_dtype: str | None = None,
                  quantize_experts: bool = True) -> LoadEstimate:
    """Peak RSS of one rank while ``from_pretrained`` loads the checkpoint described by ``cfg`` (a
    config.json dict), stored in ``ckpt_dtype`` (None: ``checkpoint_dtype(cfg)``) and loaded in ``dtype``.
    ZeRO-3 (``world`` > 1): rank 0 reads and quantizes each module whole, then keeps 1/world of its parameters
    (DeepSpeed pads each to a multiple of world). ``quantize_experts``: a MoE's experts are stored in 4 bit."""
    for what, name in (("dtype", dtype), ("ckpt_dtype", ckpt_dtype or "bf16")):
        if name not in DTYPE_BYTES:
            raise QLoRADSError(f"{what}={name!r}: use one of {sorted(DTYPE_BYTES)}")
    stored = ckpt_dtype or checkpoint_dtype(cfg)
    e, c, convert = DTYPE_BYTES[dtype], DTYPE_BYTES[stored], stored != dtype
    share = world if zero_stage == 3 else 1
    if runtime_bytes is None:
        runtime_bytes = RUNTIME_BYTES if share == 1 else ZERO3_RUNTIME_BYTES + ZERO3_LAZY_IMPORT_BYTES
    resident, best, where, at_peak = 0.0, 0.0, "", 0.0
    for name, n, quantized, i, o in load_order(cfg, quantize_experts):
        read = c * n + (e * n if convert else 0)             # the stored tensor (+ its converted copy)
        if quantized:
            kept = nf4_dq_bytes(n) + 4 * lora_r * (i + o)
            transient = read + 4 * -(-n // 64) + kept        # float weight + fp32 absmax while quantizing
        else:
            kept = e * n
            transient = read if convert else kept
        if share > 1:   # zero.Init's _partition_param: the 1/world ds_tensor is allocated while the whole is alive
            transient = max(transient, kept + _ds_partition(kept, e, world))
        if resident + transient > best:
            best, where, at_peak = resident + transient, name, transient
        resident += kept / share if share == 1 else _ds_partition(kept, e if not quantized else 1, world)
    resident_total = resident + LOAD_OVERHEAD_BYTES
    peak = max(best, resident) + LOAD_OVERHEAD_BYTES + runtime_bytes
    return LoadEstimate(resident_total, peak, runtime_bytes, at_peak, where)


def step_config(cfg: dict, dtype: str = "fp32", seq_len: int = 256, batch: int = 1, lora_r: int = 16,
                runtime_bytes: float | None = None, chunked_loss: bool = False,
                fused_cpu_linear: bool = False) -> PlanConfig:
    """The planner's config for one plain training step (LoRA r on all linears, dropout 0, gradient
    checkpointing, Adam 32-bit, one batch shape; ``chunked_loss``: ``qlora_ds.loss.causal_lm_loss``;
    ``fused_cpu_linear``: the host runs the fused AMX linear, ``qlora_ds.ops.fused_linear.available()``)."""
    shape: ModelShape = shape_from_hf_config(cfg)
    return PlanConfig(shape=shape, device="cpu", zero_stage=0, gpus_per_node=1, seq_len=seq_len, micro_batch=batch,
                      grad_accum=1, lora_r=lora_r, lora_targets=ALL_LINEAR, lora_dropout=0.0, grad_ckpt=True,
                      compute_dtype=dtype, pad_multiple=seq_len, chunked_loss=chunked_loss,
                      fused_cpu_linear=fused_cpu_linear,
                      runtime_bytes=int(RUNTIME_BYTES + LOAD_OVERHEAD_BYTES if runtime_bytes is None
                                        else runtime_bytes))


@dataclass(frozen=True)
class StepEstimate:
    """The first training step as bench/scripts/scale_worker.py runs it, phase by phase (bytes)."""
    base: float              # resident model + LoRA A/B + process runtime + the step's non-tensor memory
    phases: dict             # transient bytes of "loss", "layers", "optimizer" (each on top of ``base``)
    fragmentation: float
    loaded: float            # the part of ``base`` resident before the step: model, LoRA A/B, process runtime

    def over_loaded(self) -> float:
        """The step's peak above the RSS of the loaded model (what a run can measure: VmHWM - RSS after load)."""
        return self.peak - self.loaded

    @property
    def peak(self) -> float:
        worst = max(self.phases, key=self.phases.get)
        return self.base + self.phases[worst] * (1 + (self.fragmentation if worst != "optimizer" else 0))

    @property
    def where(self) -> str:
        return max(self.phases, key=self.phases.get)

    def as_dict(self) -> dict:
        return {"base_mib": round(self.base / MiB, 1), "peak_mib": round(self.peak / MiB, 1), "peak_in": self.where,
                **{f"{k}_mib": round(v / MiB, 1) for k, v in self.phases.items()}}


def estimate_first_step(cfg: dict, dtype: str = "fp32", seq_len: int = 256, batch: int = 1,
                        lora_r: int = 16, chunked_loss: bool = False, later: bool = False,
                        fused_cpu_linear: bool = False) -> StepEstimate:
    """Peak RSS of the first step: plain torch AdamW on the LoRA A/B, which stay fp32 as ``QLoRALinear``
    builds them whatever the compute dtype (the forward casts them): fp32 grads, no master copy. Under
    non-reentrant checkpointing the step passes through three phases that do not overlap:

    * loss: the layer inputs saved by checkpointing (L·b·s·e·h), the 12 B/logit of the loss backward
      (``memory.activation_bytes``) and the kept-weight pool after the forward — one buffer of the largest
      linear (the discarded first pass frees each at once, so the next linear reuses it); no LoRA gradient
      exists yet in the first step;
    * layers (backward from the last layer to the first): every LoRA gradient (fp32, at most), the saved
      inputs, one recomputed layer's activations with the gradient in flight, the pool holding that layer's
      weights (at most its limit) and, when a layer does not fit in the pool, the dequantization workspace;
    * optimizer: the gradients and Adam's two fp32 moments, allocated in that first step; the pool and the
      workspace stay allocated (``qlora_ds.nn.functional``'s caches), so they are alive here too.

    The fp32 logits of the loss are freed before the first layer's backward, so they do not add to it
    (``memory.estimate_memory`` sums the backward terms, an upper bound). Memory kept per batch shape after
    a step (``memory.cpu_shape_cache_bytes``) is not alive inside the first one.

    ``later``: a step after the first (same shape): Adam's moments (8 B per LoRA parameter) are resident from
    the start, and its update allocates nothing new. Both assume ``qlora_ds.heap``'s release of the heap's
    free pages after each decoder layer (on by default): without it glibc keeps each layer's freed
    intermediates resident and a long-sequence step runs up to ~2x these figures (bench/RESULTS.md)."""
    pc = step_config(cfg, dtype, seq_len, batch, lora_r, chunked_loss=chunked_loss, fused_cpu_linear=fused_cpu_linear)
    shape, e, tokens = pc.shape, pc.elem, batch * seq_len
    p = lora_params(shape, lora_r, pc.lora_targets)
    act = activation_bytes(pc)
    stored = shape.layers * tokens * e * shape.hidden
    dequantized = [a * b for a, b in unfused_linears(pc).values()] or [0]     # the fused AMX path writes none
    largest = max(dequantized) * e
    per_layer = sum(dequantized) * e
    keep = min(pc.keep_dequant_bytes, per_layer)
    pools = keep + (largest if per_layer > pc.keep_dequant_bytes else 0)   # allocated once, then kept
    moments = 8 * p
    experts = sum(v for _, v, _ in experts_transients(pc, 4))    # one MoE layer's (or group's), in backward
    phases = {"loss": stored + min(largest, keep) + act["logits_loss"],
              "layers": 4 * p + act["activations"] + pools + experts,
              "optimizer": 4 * p + (0 if later else moments) + pools}
    weights = base_weight_bytes(shape, pc.base_bits_per_param, e, pc.experts_4bit, pc.double_quant)
    loaded = sum(weights.values()) + 4 * p + RUNTIME_BYTES + LOAD_OVERHEAD_BYTES
    layer_act = tokens * activation_bytes_per_token_layer(shape, lora_r, pc.lora_targets, pc.lora_dropout, e,
                                                          mask_bytes=0,      # the CPU's dropout keeps no mask
                                                          quantized_experts=pc.experts_4bit)
    base = loaded + STEP_RUNTIME_BYTES + HEAP_SLACK_PER_LAYER_ACTIVATION * layer_act + (moments if later else 0)
    return StepEstimate(base, phases, FRAGMENTATION, loaded)


@dataclass(frozen=True)
class Prediction:
    peak: float
    detail: object           # LoadEstimate | MemoryEstimate


def predict(cfg: dict, phase: str, dtype: str = "bf16", seq_len: int = 256, world: int = 1, zero_stage: int = 0,
            first_step: bool = True, fused_cpu_linear: bool = False) -> Prediction:
    """``phase`` "load": peak RSS of the load; "step": peak RSS of the training step after it (the first
    step when ``first_step``), the load's own peak excluded."""
    if phase == "load":
        est = estimate_load(cfg, dtype, world=world, zero_stage=zero_stage)
        return Prediction(est.peak, est)
    if phase == "step":
        if first_step:
            est = estimate_first_step(cfg, dtype, seq_len, fused_cpu_linear=fused_cpu_linear)
            return Prediction(est.peak, est)
        mem: MemoryEstimate = estimate_memory(step_config(cfg, dtype, seq_len, fused_cpu_linear=fused_cpu_linear))
        return Prediction(mem.peak, mem)
    raise QLoRADSError(f"phase={phase!r}: use 'load' or 'step'")
