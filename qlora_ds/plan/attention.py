"""What a decoder layer's attention keeps for backward, per token, and what dropout adds to it (the planner's
activation terms beside the norms, MLP and LoRA of memory.py). Units: bytes per token and layer; e = bytes per
element of the compute dtype, q = heads·head_dim, kv = kv_heads·head_dim, H = heads, k = the keys each token attends
to (the sequence length). Measured with autograd's saved tensors around one decoder layer of transformers 5.23
(tests/test_plan_attention.py, tests/test_plan_dropout.py), with the KV cache off as qlora-ds trains
(``use_cache=False``: qlora_ds.loss, the HF Trainer integration). A train-mode forward that builds transformers'
cache keeps its concatenated copies of k and v too: e·2kv more where q or k stay views of a fused q|k|v output
(GPT-2: the "copies" an earlier measurement found), which no qlora-ds training run has.

* SDPA (transformers' ``sdpa`` interface, flash kernel, grouped-query heads inside it): q, k, v after RoPE
  e·(q + 2kv), the output e·q and its fp32 log-sum-exp 4·H. Where q|k|v is one fused linear and RoPE copies q and k
  (GPT-NeoX, Phi-3, Falcon), v reaches the kernel as a view of the fused output, which therefore stays: e·(q + kv)
  more. GPT-2 (no RoPE: all three are views of c_attn's output) keeps exactly e·(q + 2kv).
* Falcon calls SDPA itself with a materialized mask in the compute dtype, which the kernel keeps: [b, 1, s, s]
  (e·k), with ALiBi the bias [b, H, s, s] (e·H·k). Its new architecture hands SDPA k and v expanded to every head
  (e·3q in place of e·(q + 2kv)); the old multi-query one a single k/v head, which SDPA's fused kernels refuse: its
  math path, in fp32 for every dtype, keeps q·scale 4·q, k and v 4·q each (4·kv each at batch 1, where the head
  broadcast stays a view) and the fp32 softmax output per head and key, 4·H·k (falcon-7b's default).
* eager attention (BLOOM, Gemma-2: no SDPA path in transformers 5.23): q and k, v repeated to every head e·3q, per
  head and key the fp32 softmax output 4, its e-byte copy the second matmul reads (none when e = 4: the cast is a
  no-op) and Gemma-2's soft-capping tanh output e: H·k·(4 + e [+ e]); the largest term at long sequences.
* q/k norms: RMSNorm over heads (Qwen3, Gemma-3) or the full width (OLMo2) keeps its fp32 input 4·(q + kv) and
  fp32 rstd 4 per row (H + kv_heads rows, or 2); Phi's LayerNorm over heads its e-byte input and mean and rstd.
* The model's own dropout (layouts.py reads which are on from the config; GPT-2 and OPT default to 0.1) keeps per
  element m bytes, torch's mask: a bool (m = 1) on CUDA, the scaled noise in the input's dtype (m = e) on the CPU:
  m·h per hidden-wide dropout of a layer (residual branches) and m·h once per token for the embedding's (outside
  the layers, so with checkpointing too). Attention dropout: on CUDA SDPA's flash / efficient kernels regenerate it
  from a seed (nothing kept); on the CPU SDPA with dropout_p > 0 leaves its flash kernel for the math path above,
  with k and v at every head and per head and key the fp32 softmax output, noise and dropped probabilities:
  12·q + 12·H·k in place of the SDPA terms (Falcon's multi-query math path: 8·H·k more; on CUDA, not measured, a
  bool mask: 5·H·k); in fp32 at batch 1 a fused q|k|v output (no grouped heads) stays in place of v's copy:
  4·(q + kv) more. Eager attention keeps m + (4 when e = 4: its fp32 probabilities are no longer the matmul's
  input) per head and key more.
* Packed rows (``packing``) on the CPU in bf16/fp16 add what eager attention over the short examples keeps:
  per token, H·k·(4 + e) with k ≤ 192 keys (its example's group width; counted as 192, an upper bound).
"""
from __future__ import annotations

from .presets import ModelShape

PACKED_SHORT_LEN = 192     # = qlora_ds.nn.packed_attention.SHORT_LEN (tests/test_packing.py checks they agree)


def flash_attention_bytes(shape: ModelShape, elem: int) -> float:
    """What SDPA's flash kernel keeps per token: q, k, v (e bytes), its output and fp32 log-sum-exp per head."""
    return elem * (shape.q_dim + 2 * shape.kv_dim) + elem * shape.q_dim + 4 * shape.heads


def _single_kv_head(shape: ModelShape) -> bool:
    """Falcon's old multi-query attention: SDPA gets one k/v head for all query heads (no enable_gqa)."""
    lay = shape.layout
    return lay.family == "falcon" and not lay.kv_expanded and shape.kv_heads < shape.heads


def math_attention_bytes(shape: ModelShape, elem: int, keys: int, batch: int = 1, dropout: bool = False,
                         device: str = "cpu") -> float:
    """SDPA's math path (fp32 whatever the compute dtype): q·scale, k and v at every head, the softmax output per
    head and key, and with dropout its noise (a bool mask on CUDA) and the dropped probabilities."""
    lay, q = shape.layout, shape.q_dim
    kv = shape.kv_dim if batch == 1 and _single_kv_head(shape) else q
    per_key = 4 + ((1 if device == "cuda" else 4) + 4 if dropout else 0)
    kept = 4 * q + 2 * 4 * kv + shape.heads * keys * per_key
    if elem == 4 and batch == 1 and len(lay.qkv) == 1 and shape.kv_dim == q and not lay.kv_expanded:
        kept += 4 * (q + shape.kv_dim)    # fp32, one row: v is kept as the view of the fused q|k|v output it is
    return kept


def attention_bytes_per_token(shape: ModelShape, elem: int, keys: int = 0, batch: int = 1, device: str = "cuda",
                              dropout: bool = False) -> float:
    """Bytes one decoder layer's attention keeps per token (see the module docstring): ``keys`` per token (the
    sequence length; 0 leaves out the terms that grow with it), ``batch`` the micro batch, ``dropout`` attention
    dropout on (in training, where the layout's config turns it on)."""
    lay, e, q, kv, heads = shape.layout, elem, shape.q_dim, shape.kv_dim, shape.heads
    if lay.attention == "eager":
        per_key = 4 + (e if lay.softcap else 0)
        per_key += (e + (1 if device == "cuda" else e)) if dropout else (e if e != 4 else 0)
        return 3 * e * q + heads * keys * per_key
    if (dropout and device == "cpu") or _single_kv_head(shape):
        return math_attention_bytes(shape, e, keys, batch, dropout, device)
    alibi = lay.attention == "sdpa_bias"
    if lay.kv_expanded:
        qkv = 3 * e * q
    else:
        rope_copies = len(lay.qkv) == 1 and lay.positions == 0 and not alibi
        qkv = e * (q + 2 * kv) + (e * (q + kv) if rope_copies else 0)    # + the fused output v is a view of
    mask = e * keys * (heads if alibi else 1) if lay.family == "falcon" else 0
    return qkv + e * q + 4 * heads + mask


def qk_norm_bytes(shape: ModelShape, elem: int) -> float:
    """Per token, what the q and k norms keep (the layout's ``qk_norm``): see the module docstring."""
    lay, q, kv = shape.layout, shape.q_dim, shape.kv_dim
    if not lay.qk_norm:
        return 0
    rows = shape.heads + shape.kv_heads if lay.qk_norm == "head" else 2
    if lay.norm == "layer":
        return elem * (q + kv) + 2 * elem * rows
    return 4 * (q + kv) + 4 * rows


def model_dropout_bytes_per_token(shape: ModelShape, elem: int = 2, device: str = "cuda", keys: int = 0,
                                  batch: int = 1) -> tuple[float, float]:
    """(per decoder layer, once outside the layers) bytes per token that the model's own dropout adds for backward
    (see the module docstring); ``keys``: the keys each token attends to (the sequence length)."""
    lay, e = shape.layout, elem
    m = 1 if device == "cuda" else e
    per_layer = lay.hidden_dropouts * m * shape.hidden
    if lay.attn_dropout:
        per_layer += (attention_bytes_per_token(shape, e, keys, batch, device, dropout=True)
                      - attention_bytes_per_token(shape, e, keys, batch, device))
    return per_layer, (m * shape.hidden if lay.embed_dropout else 0)


def packed_eager_bytes_per_token(shape: ModelShape, seq_len: int, elem: int) -> float:
    """Packed short examples on the CPU in bf16/fp16 run eager attention, which keeps its probabilities (fp32
    softmax output + the e-byte copy) per head and key: at most PACKED_SHORT_LEN keys per token."""
    return shape.heads * min(seq_len, PACKED_SHORT_LEN) * (4 + elem)
