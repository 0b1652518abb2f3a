"""Decoder-layer layouts: which linears a layer holds (by the model's own module names), what shares an input, the
MLP kind, biases, norms, position table and the dropouts its config turns on, per Hugging Face ``model_type``, read
from ``config.json`` alone.

``Layout`` is the structure; ``ModelShape`` (presets.py) adds the widths. ``layout_fields(cfg)`` gives the
``ModelShape`` keyword arguments a config implies beyond the LLaMA-style keys (its layout, and the MLP width and
head counts where the config names them otherwise). tests/test_plan_layouts.py builds every model type below with
transformers from a tiny config and counts.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import QLoRADSError

NORMS = ("rms", "layer", "fixed")       # RMSNorm (weight) | LayerNorm (weight + bias) | no parameters (OLMo)


@dataclass(frozen=True)
class Layout:
    """One decoder layer's structure. Names are module paths inside the layer (a LoRA target matches one by its leaf
    name or that path, as ``qlora_ds.inject`` matches). ``qkv``: three names, or one fused q|k|v linear; ``mlp_in``:
    gated (gate, up) or one fused gate|up, plain (up,); ``shared_norm``: attention and MLP read one norm's output
    (parallel blocks: Falcon, Phi), so their first linears share an input; ``act_saved``: tensors of the MLP width
    the activation keeps for backward (1 for a fused op; 4 for GPT-2's composite ``gelu_new``).

    The model's own dropout, as transformers 5.23 applies it in training (``_dropouts``: a probability > 0 in the
    config): ``hidden_dropouts`` on hidden-wide tensors per layer (residual branches), ``attn_dropout`` on the
    attention probabilities, ``embed_dropout`` on the embedding output. ``attention``: how transformers runs it:
    "sdpa", "eager" (no SDPA path for the model type: BLOOM, Gemma-2) or "sdpa_bias" (SDPA with Falcon's ALiBi as a
    float bias per head); ``kv_expanded``: k and v reach attention expanded to every head (Falcon's new
    architecture); ``softcap``: Gemma-2's attention logit soft-capping (a tanh in eager attention). What each keeps:
    attention.py; what a MoE layer's routing keeps (``norm_topk``, ``router_jitter``): moe.py."""

    family: str = "llama"
    qkv: tuple = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    out: str = "self_attn.o_proj"
    mlp_in: tuple = ("mlp.gate_proj", "mlp.up_proj")
    mlp_out: str = "mlp.down_proj"
    gated: bool = True
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    norm: str = "rms"
    norms: int = 2                # hidden-wide norms per decoder layer
    parallel: bool = False        # attention and MLP both read the layer's input (GPT-NeoX, Falcon, Phi)
    shared_norm: bool = False
    qk_norm: str = ""             # "head": q and k norms of head_dim (Qwen3, Phi) | "full": of q and kv width (OLMo2)
    final_norm: bool = True
    positions: int = 0            # rows of a learned position table (OPT, GPT-2); 0: rotary or ALiBi
    embed_norm: bool = False      # BLOOM's LayerNorm after the embedding
    embed_width: int = 0          # OPT's word_embed_proj_dim when it differs from hidden (then project_in/out)
    head_bias: bool = False       # Phi's lm_head bias
    act_saved: int = 1
    conv1d: bool = False          # GPT-2's Conv1D: the weight is stored (in, out)
    hidden_dropouts: int = 0
    attn_dropout: bool = False
    embed_dropout: bool = False
    attention: str = "sdpa"
    kv_expanded: bool = False
    softcap: bool = False
    norm_topk: bool = False       # MoE: the top-k routing weights renormalized (norm_topk_prob; Mixtral always)
    router_jitter: bool = False   # MoE: Mixtral's router_jitter_noise > 0 (multiplicative noise in training)

    def __post_init__(self):
        if self.norm not in NORMS or self.qk_norm not in ("", "head", "full"):
            raise QLoRADSError(f"layout {self.family!r}: norm={self.norm!r}, qk_norm={self.qk_norm!r}; use norm "
                               f"{NORMS} and qk_norm '', 'head' or 'full'")
        if self.attention not in ("sdpa", "eager", "sdpa_bias"):
            raise QLoRADSError(f"layout {self.family!r}: attention={self.attention!r}; use sdpa, eager or sdpa_bias")
        if len(self.qkv) not in (1, 3) or len(self.mlp_in) not in ((1, 2) if self.gated else (1,)):
            raise QLoRADSError(f"layout {self.family!r}: qkv {self.qkv} needs 1 or 3 names, mlp_in {self.mlp_in} "
                               "1 (plain or fused gate|up) or 2 (gate, up)")

    @property
    def norm_params_per_width(self) -> int:
        return {"rms": 1, "layer": 2, "fixed": 0}[self.norm]


LLAMA = Layout()

_NEOX = dict(qkv=("attention.query_key_value",), out="attention.dense", mlp_in=("mlp.dense_h_to_4h",),
             mlp_out="mlp.dense_4h_to_h", gated=False, norm="layer")
_FAMILIES = {   # model_type -> the layout's fixed part; config-dependent fields come from layout_fields below
    "phi3": Layout("phi3", qkv=("self_attn.qkv_proj",), mlp_in=("mlp.gate_up_proj",)),
    "gpt_neox": Layout("gpt_neox", **_NEOX, mlp_bias=True, parallel=True),
    "bloom": Layout("bloom", **{**_NEOX, "qkv": ("self_attention.query_key_value",), "out": "self_attention.dense"},
                    qkv_bias=True, out_bias=True, mlp_bias=True, embed_norm=True),
    "falcon": Layout("falcon", **{**_NEOX, "qkv": ("self_attention.query_key_value",),
                                  "out": "self_attention.dense"}),
    "opt": Layout("opt", out="self_attn.out_proj", mlp_in=("fc1",), mlp_out="fc2", gated=False, norm="layer"),
    "gpt2": Layout("gpt2", qkv=("attn.c_attn",), out="attn.c_proj", mlp_in=("mlp.c_fc",), mlp_out="mlp.c_proj",
                   gated=False, qkv_bias=True, out_bias=True, mlp_bias=True, norm="layer", conv1d=True),
    "starcoder2": Layout("starcoder2", mlp_in=("mlp.c_fc",), mlp_out="mlp.c_proj", gated=False, norm="layer"),
    "phi": Layout("phi", out="self_attn.dense", mlp_in=("mlp.fc1",), mlp_out="mlp.fc2", gated=False, qkv_bias=True,
                  out_bias=True, mlp_bias=True, norm="layer", norms=1, parallel=True, shared_norm=True, head_bias=True),
}
# LLaMA layout (q/k/v/o, gated gate/up/down, RMSNorm), biases and extra norms read from the config
LLAMA_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
               "smollm3", "olmo", "olmo2", "granite", "gemma3_text")
MODEL_TYPES = LLAMA_TYPES + tuple(_FAMILIES)
# activations transformers writes as several autograd ops (each keeps a tensor of the MLP width); others are one op
_COMPOSITE_ACTS = {"gelu_new": 4}


def _act_saved(cfg: dict) -> int:
    return _COMPOSITE_ACTS.get(str(cfg.get("hidden_act") or cfg.get("activation_function") or ""), 1)


# transformers' config defaults for the dropout keys a config.json may leave out (GPT-2 and OPT train with 0.1)
_DROPOUT_DEFAULTS = {"gpt2": {"resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1}, "opt": {"dropout": 0.1}}


def _dropouts(mt: str, cfg: dict) -> dict:
    """The Layout's dropout fields: which of the model's dropouts are on (p > 0) in training, by where
    transformers 5.23's modeling code applies each config key. Falcon applies attention_dropout inside SDPA only
    with ALiBi, and (old architecture, sequential block) to the attention's residual branch."""
    def on(key: str) -> bool:
        return float(cfg.get(key) if cfg.get(key) is not None else _DROPOUT_DEFAULTS.get(mt, {}).get(key, 0.0)) > 0
    attn, embed, hidden = on("attention_dropout"), False, 0
    if mt in ("gpt_neox", "bloom"):
        hidden, embed = 2 * on("hidden_dropout"), mt == "gpt_neox" and on("hidden_dropout")
    elif mt == "falcon":
        sequential = not cfg.get("new_decoder_architecture") and not cfg.get("parallel_attn", True)
        hidden = on("hidden_dropout") + (sequential and attn)
        attn = attn and bool(cfg.get("alibi"))
    elif mt == "opt":
        hidden = 2 * on("dropout")
    elif mt == "gpt2":
        hidden, attn, embed = 2 * on("resid_pdrop"), on("attn_pdrop"), on("embd_pdrop")
    elif mt == "starcoder2":
        hidden, embed = 2 * on("residual_dropout"), on("embedding_dropout")
    elif mt in ("phi", "phi3"):
        hidden, embed = 2 * on("resid_pdrop"), mt == "phi" and on("embd_pdrop")
    return {"hidden_dropouts": int(hidden), "attn_dropout": attn, "embed_dropout": bool(embed),
            "attention": "eager" if mt in ("bloom", "gemma2") else "sdpa_bias" if cfg.get("alibi") else "sdpa"}


def _get(cfg: dict, *keys, default=None):
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


def _llama_family(mt: str, cfg: dict) -> Layout:
    attn = bool(cfg.get("attention_bias", False))
    qkv = True if mt == "qwen2" else bool(cfg.get("qkv_bias", attn)) if mt == "qwen2_moe" else attn
    return Layout(mt, qkv_bias=qkv, out_bias=attn and mt not in ("qwen2", "qwen2_moe"),
                  mlp_bias=bool(cfg.get("mlp_bias", False)), norms=4 if mt in ("gemma2", "gemma3_text") else 2,
                  norm="fixed" if mt == "olmo" else "rms", final_norm=True,
                  qk_norm="head" if mt in ("qwen3", "qwen3_moe", "gemma3_text") else "full" if mt == "olmo2" else "",
                  softcap=mt == "gemma2" and cfg.get("attn_logit_softcapping", 50.0) is not None,
                  norm_topk=mt == "mixtral" or (mt in ("qwen2_moe", "qwen3_moe") and bool(cfg.get("norm_topk_prob"))),
                  router_jitter=mt == "mixtral" and float(cfg.get("router_jitter_noise") or 0) > 0)


def layout_fields(cfg: dict, name: str) -> dict:
    """ModelShape keyword arguments for ``cfg``'s model_type beyond the LLaMA-style keys: ``layout`` and, where the
    config names them differently, the MLP width, heads and key/value heads. None or a LLaMA-layout type: LLAMA."""
    mt = cfg.get("model_type")
    if mt is None:
        return {"layout": LLAMA}
    if mt not in MODEL_TYPES:
        raise QLoRADSError(f"{name}: model_type {mt!r} is not modelled; the planner models {', '.join(MODEL_TYPES)} "
                           "(other layouts: plan a model of the same structure, or add it to plan/layouts.py)")
    if mt in LLAMA_TYPES:
        return {"layout": replace(_llama_family(mt, cfg), **_dropouts(mt, cfg))}
    h = int(_get(cfg, "hidden_size", "n_embd", default=0))
    heads = int(_get(cfg, "num_attention_heads", "n_head", default=1))
    base, out = _FAMILIES[mt], {}
    act = _act_saved(cfg)
    if mt == "gpt2":
        base = Layout(**{**base.__dict__, "positions": int(_get(cfg, "n_positions", default=1024)), "act_saved": act})
        out["intermediate"] = int(_get(cfg, "n_inner", default=4 * h))
        out["max_positions"] = base.positions
    elif mt == "opt":
        bias = bool(cfg.get("enable_bias", True))
        affine = bool(cfg.get("layer_norm_elementwise_affine", True))
        before = bool(cfg.get("do_layer_norm_before", True))
        proj = int(cfg.get("word_embed_proj_dim") or h)
        base = Layout(**{**base.__dict__, "qkv_bias": bias, "out_bias": bias, "mlp_bias": bias,
                         "norm": "layer" if affine else "fixed", "act_saved": act,
                         "final_norm": before and not cfg.get("_remove_final_layer_norm", False),
                         # OPTLearnedPositionalEmbedding keeps 2 rows beyond max_position_embeddings
                         "positions": int(cfg.get("max_position_embeddings", 2048)) + 2,
                         "embed_width": proj if proj != h else 0})
        out["intermediate"] = int(_get(cfg, "ffn_dim", default=4 * h))
    elif mt == "falcon":
        new, mq = bool(cfg.get("new_decoder_architecture")), bool(cfg.get("multi_query", True))
        parallel = bool(cfg.get("parallel_attn", True))
        # FalconDecoderLayer: ln_attn + ln_mlp (num_ln_in_parallel_attn 2, the new architecture's default), one
        # input_layernorm for both, or input + post-attention norms when not parallel
        two = parallel and int(cfg.get("num_ln_in_parallel_attn") or (2 if new else 1)) == 2
        bias = bool(cfg.get("bias", False))
        base = Layout(**{**base.__dict__, "qkv_bias": bias, "out_bias": bias, "mlp_bias": bias,
                         "norms": 2 if two or not parallel else 1, "parallel": parallel,
                         "shared_norm": parallel and not two, "kv_expanded": new,
                         "act_saved": act})
        out["intermediate"] = int(_get(cfg, "ffn_hidden_size", default=4 * h))
        out["kv_heads"] = int(_get(cfg, "num_kv_heads", default=heads)) if new else 1 if mq else heads
    elif mt == "bloom":
        out["intermediate"] = 4 * h
    elif mt == "gpt_neox":
        bias = bool(cfg.get("attention_bias", True))
        base = Layout(**{**base.__dict__, "qkv_bias": bias, "out_bias": bias, "act_saved": act,
                         "parallel": bool(cfg.get("use_parallel_residual", True))})
        out["kv_heads"] = heads
    elif mt == "starcoder2":
        bias = bool(cfg.get("use_bias", True))
        base = Layout(**{**base.__dict__, "qkv_bias": bias, "out_bias": bias, "mlp_bias": bias, "act_saved": act})
    elif mt == "phi":
        base = Layout(**{**base.__dict__, "qk_norm": "head" if cfg.get("qk_layernorm") else "", "act_saved": act})
    return {"layout": replace(base, **_dropouts(mt, cfg)), **out}
