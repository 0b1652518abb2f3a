"""Model shapes for the planner: shipped presets and HF ``config.json`` files read with json alone.

Only the numbers the memory and traffic model needs; no download. transformers is imported only for a config.json
without ``tie_word_embeddings`` (its model type's default).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from ..errors import QLoRADSError
from .layouts import LLAMA, LLAMA_TYPES, MODEL_TYPES, Layout, layout_fields
from ..loss_support import IGNORED
from .loss import logit_config_of


@dataclass(frozen=True)
class Linear:
    """One quantized linear of a decoder layer: its module path inside the layer, widths, bias, and which input it
    reads (linears reading the same tensor share it: "attn_in", "attn_out", "mlp_in", "mlp_mid")."""
    name: str
    in_features: int
    out_features: int
    bias: bool
    reads: str

    @property
    def leaf(self) -> str:
        return self.name.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class ModelShape:
    """Decoder-only transformer: widths plus its ``layout`` (layouts.py: which linears, biases, norms, positions;
    default the LLaMA layout, q, k, v, o, gate, up, down per layer).

    ``head_dim``: 0 means hidden // heads (a config.json may set its own: Gemma-7b has 16 heads of 256 at
    hidden 3072). ``intermediate``: the MLP width (a plain MLP's up-projection, a gated MLP's gate and up each).
    MoE (``experts`` > 0, the Mixtral / Qwen-MoE layout): per layer ``experts`` routed experts of
    width ``expert_intermediate`` plus their router (transformers fuses the experts into two 3-D parameters, which
    qlora-ds stores in 4 bit by default, ``quantize_experts``, frozen, with LoRA only if ``lora_experts``:
    plan/moe.py; the router stays 16-bit), and a shared expert of width ``shared_expert_intermediate`` (0: none)
    whose gate/up/down are ordinary quantized linears. ``intermediate`` is then the MLP width one token
    passes through (top-k experts + shared expert), which sizes the activations.
    """

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    max_positions: int
    tie_embeddings: bool = False
    explicit_head_dim: int = 0
    experts: int = 0
    expert_intermediate: int = 0
    shared_expert_intermediate: int = 0
    layout: Layout = LLAMA
    frozen_params: int = 0        # outside the text model (a multimodal model's vision tower, projector): 16-bit
    logit_config: tuple = ()      # ((key, value), ...): the config's logit transforms (plan/loss.py; (): the defaults)

    def __post_init__(self):
        for field in ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab", "max_positions"):
            if getattr(self, field) <= 0:
                raise QLoRADSError(f"model shape {self.name!r}: {field}={getattr(self, field)} must be > 0")
        for field in ("explicit_head_dim", "experts", "expert_intermediate", "shared_expert_intermediate",
                      "frozen_params"):
            if getattr(self, field) < 0:
                raise QLoRADSError(f"model shape {self.name!r}: {field}={getattr(self, field)} must be >= 0")
        if self.experts and not self.expert_intermediate:
            raise QLoRADSError(f"model shape {self.name!r}: {self.experts} experts need expert_intermediate > 0")
        if self.experts and self.layout.family not in LLAMA_TYPES:
            raise QLoRADSError(f"model shape {self.name!r}: MoE experts are modelled in the LLaMA layout only")
        if (not self.explicit_head_dim and self.hidden % self.heads) or self.heads % self.kv_heads:
            raise QLoRADSError(f"model shape {self.name!r}: hidden={self.hidden}, heads={self.heads}, "
                               f"kv_heads={self.kv_heads} must divide evenly")

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.hidden // self.heads

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def layer_linears(self) -> tuple[Linear, ...]:
        """The quantized linears of one decoder layer, in the layer's module order. A MoE's MLP is its shared
        expert's gate/up/down (none without one: the routed experts are ``expert_tensors``, not linears)."""
        lay, h, q, kv = self.layout, self.hidden, self.q_dim, self.kv_dim
        qkv = (zip(lay.qkv, (q, kv, kv)) if len(lay.qkv) == 3 else [(lay.qkv[0], q + 2 * kv)])
        out = [Linear(n, h, o, lay.qkv_bias, "attn_in") for n, o in qkv] + [Linear(lay.out, q, h, lay.out_bias,
                                                                                   "attn_out")]
        i, prefix = self.intermediate, ""
        if self.experts:
            i, prefix = self.shared_expert_intermediate, "mlp.shared_expert."
            if not i:
                return tuple(out)
        up_reads = "attn_in" if lay.shared_norm else "mlp_in"
        widths = (i, i) if len(lay.mlp_in) == 2 else (2 * i if lay.gated else i,)
        names = [prefix + n.rsplit(".", 1)[-1] if prefix else n for n in (*lay.mlp_in, lay.mlp_out)]
        out += [Linear(n, h, o, lay.mlp_bias, up_reads) for n, o in zip(names, widths)]
        return tuple(out) + (Linear(names[-1], i, h, lay.mlp_bias, "mlp_mid"),)

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of the quantized linears of one decoder layer, by module path."""
        return {lin.name: (lin.in_features, lin.out_features) for lin in self.layer_linears()}

    @property
    def linear_params_per_layer(self) -> int:
        return sum(a * b for a, b in self.linears().values())

    @property
    def linear_params(self) -> int:
        """Parameters in the decoder linears: the part that is quantized."""
        return self.layers * self.linear_params_per_layer

    def expert_tensors(self) -> tuple[int, ...]:
        """Elements of one layer's fused 3-D experts, gate_up_proj (E, 2I, h) and down_proj (E, h, I): what
        ``quantize_experts`` stores in 4 bit (plan/moe.py); () for a dense model."""
        if not self.experts:
            return ()
        n = self.experts * self.hidden * self.expert_intermediate
        return 2 * n, n

    @property
    def expert_params(self) -> int:
        """MoE parameters outside the quantized linears: routed experts (gate, up, down: ``expert_tensors``, 4-bit
        by default), routers and shared-expert gates (16-bit)."""
        if not self.experts:
            return 0
        h = self.hidden
        shared_gate = h if self.shared_expert_intermediate else 0
        return self.layers * (self.experts * (3 * h * self.expert_intermediate + h) + shared_gate)

    @property
    def bias_params_per_layer(self) -> int:
        """The quantized linears' biases (QLoRALinear keeps them in the compute dtype)."""
        return sum(lin.out_features for lin in self.layer_linears() if lin.bias)

    @property
    def norm_params_per_layer(self) -> int:
        lay = self.layout
        qk = {"": 0, "head": 2 * self.head_dim, "full": self.q_dim + self.kv_dim}[lay.qk_norm]
        return (lay.norms * self.hidden + qk) * lay.norm_params_per_width

    @property
    def embed_width(self) -> int:
        return self.layout.embed_width or self.hidden

    @property
    def embedding_params(self) -> int:
        """Parameters outside the quantized linears: token embedding + lm_head (once if tied) and its bias, a learned
        position table, OPT's project_in/out, the norms, the linears' biases, the MoE experts and routers
        (``expert_params``: the planner's ``moe_experts``, 4-bit by default) and what lies outside the text model
        (``frozen_params``). All 16-bit but the quantized experts."""
        lay = self.layout
        emb = self.vocab * self.embed_width * (1 if self.tie_embeddings else 2) + (self.vocab if lay.head_bias else 0)
        emb += lay.positions * self.hidden + (2 * self.hidden * lay.embed_width if lay.embed_width else 0)
        final = (int(lay.final_norm) + int(lay.embed_norm)) * self.hidden * lay.norm_params_per_width
        per_layer = self.norm_params_per_layer + self.bias_params_per_layer
        return emb + final + self.layers * per_layer + self.expert_params + self.frozen_params

    @property
    def total_params(self) -> int:
        return self.linear_params + self.embedding_params


def _llama(name, hidden, inter, layers, heads, kv, vocab, pos, tie=False):
    return ModelShape(name, hidden, inter, layers, heads, kv, vocab, pos, tie)


# Numbers from each model's published config.json.
PRESETS: dict[str, ModelShape] = {s.name: s for s in (
    _llama("llama-7b", 4096, 11008, 32, 32, 32, 32000, 2048),
    _llama("llama-13b", 5120, 13824, 40, 40, 40, 32000, 2048),
    _llama("llama-33b", 6656, 17920, 60, 52, 52, 32000, 2048),
    _llama("llama-65b", 8192, 22016, 80, 64, 64, 32000, 2048),
    _llama("llama-2-70b", 8192, 28672, 80, 64, 8, 32000, 4096),
    _llama("llama-3-70b", 8192, 28672, 80, 64, 8, 128256, 8192),
    _llama("smollm2-135m", 576, 1536, 30, 9, 3, 49152, 8192, tie=True),
)}
_ALIASES = {"llama-30b": "llama-33b", "llama2-70b": "llama-2-70b", "llama3-70b": "llama-3-70b",
            "smollm2": "smollm2-135m"}


def _moe(cfg: dict, name: str, intermediate: int) -> dict:
    """ModelShape's MoE fields from a Mixtral / Qwen-MoE style config ({} for a dense model)."""
    experts = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0)
    if not experts:
        other = [k for k in ("moe_intermediate_size", "n_routed_experts", "moe_num_experts") if cfg.get(k)]
        if other:
            raise QLoRADSError(f"{name}: MoE keys {other} without num_local_experts / num_experts (e.g. DeepSeek's "
                               "layout) are not supported by the planner")
        return {}
    mixed = {k: cfg[k] for k in ("mlp_only_layers", "first_k_dense_replace") if cfg.get(k)}
    if int(cfg.get("decoder_sparse_step") or 1) != 1:
        mixed["decoder_sparse_step"] = cfg["decoder_sparse_step"]
    if mixed:
        raise QLoRADSError(f"{name}: {mixed} mixes dense and MoE layers, which the planner does not model; it "
                           "supports configs whose every layer is MoE")
    if not cfg.get("num_experts_per_tok"):
        raise QLoRADSError(f"{name}: a MoE config ({experts} experts) needs num_experts_per_tok for the planner")
    expert_i = int(cfg.get("moe_intermediate_size") or intermediate)
    shared_i = int(cfg.get("shared_expert_intermediate_size") or 0)
    return {"experts": experts, "expert_intermediate": expert_i, "shared_expert_intermediate": shared_i,
            "intermediate": int(cfg["num_experts_per_tok"]) * expert_i + shared_i}


# model_type values in the LLaMA layout (separate q/k/v/o, gated gate/up/down; biases and extra norms from the
# config), and every model type the planner models (layouts.py; tests/test_plan_layouts.py builds each and counts)
LLAMA_LAYOUT = LLAMA_TYPES
SUPPORTED = MODEL_TYPES


def _tied_default(model_type: str, name: str) -> bool:
    """tie_word_embeddings of ``model_type``'s transformers config class (Llama: False, Gemma: True), for a
    config.json that leaves the key out."""
    try:
        from transformers import AutoConfig
        return bool(AutoConfig.for_model(model_type).tie_word_embeddings)
    except (ImportError, ValueError, AttributeError) as err:
        raise QLoRADSError(f"{name}: no tie_word_embeddings, and transformers gives no default for model_type "
                           f"{model_type!r} ({err}); add \"tie_word_embeddings\": true or false to it") from None


def shape_from_hf_config(cfg: dict, name: str = "config.json") -> ModelShape:
    """Build a shape from a Hugging Face config dict: its widths and its model type's layout (layouts.py; Mixtral /
    Qwen-MoE experts: plan/moe.py). A ``model_type`` outside ``SUPPORTED`` is
    refused; none at all is read as the LLaMA layout."""
    if isinstance(cfg.get("text_config"), dict):
        return _multimodal_shape(cfg, name)
    model_type = cfg.get("model_type")
    fields = layout_fields(cfg, name)

    def need(key, *alts):
        for k in (key, *alts):
            if k in cfg:
                return int(cfg[k])
        raise QLoRADSError(f"{name}: missing {key!r}; the planner needs hidden_size, intermediate_size, "
                           "num_hidden_layers, num_attention_heads and vocab_size")
    heads = need("num_attention_heads", "n_head")
    intermediate = fields.pop("intermediate", None) or need("intermediate_size")
    return ModelShape(**{
        "name": str(cfg.get("_name_or_path") or name),
        "hidden": need("hidden_size", "n_embd"),
        "intermediate": intermediate,
        "layers": need("num_hidden_layers", "n_layer"),
        "heads": heads,
        "kv_heads": int(cfg.get("num_key_value_heads") or heads),
        "vocab": need("vocab_size"),
        "max_positions": int(cfg.get("max_position_embeddings", 2048)),
        "tie_embeddings": bool(cfg["tie_word_embeddings"] if "tie_word_embeddings" in cfg
                               else model_type is not None and _tied_default(model_type, name)),
        "explicit_head_dim": int(cfg.get("head_dim") or 0),
        "logit_config": logit_config_of(cfg),
        **_moe(cfg, name, intermediate),
        **fields,
    })


def _multimodal_shape(cfg: dict, name: str) -> ModelShape:
    """A composite model (Gemma-3 …): its text model planned from the text config as transformers completes it (the
    published text_configs leave widths to the defaults), everything else — vision tower, projector, which
    qlora-ds neither quantizes nor trains (inject.policies.NON_TEXT) — counted in 16 bit by building the whole
    model on the meta device."""
    import dataclasses

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.for_model(**cfg)
    except (ValueError, KeyError, TypeError) as err:
        raise QLoRADSError(f"{name}: transformers cannot read this config ({err})") from None
    text = config.get_text_config().to_dict()
    tie = getattr(config, "tie_word_embeddings", None)
    shape = shape_from_hf_config({**text, **({} if tie is None else {"tie_word_embeddings": tie})},
                                 f"{name} (text_config)")
    with torch.device("meta"):
        total = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    if total < shape.total_params:
        raise QLoRADSError(f"{name}: the {cfg.get('model_type')} model holds {total} parameters, fewer than its text "
                           f"model's {shape.total_params}; the planner does not model this composite layout")
    # the composite's forward decides which logit transforms apply (Gemma-3's never caps its text config's logits)
    ignored = IGNORED.get(cfg.get("model_type"), frozenset())
    return dataclasses.replace(shape, name=str(cfg.get("_name_or_path") or name),
                               frozen_params=total - shape.total_params,
                               logit_config=tuple(kv for kv in shape.logit_config if kv[0] not in ignored))


# MoE presets, from the published config.json files (the widths the planner reads)
PRESETS.update({name: shape_from_hf_config(cfg, name) for name, cfg in {
    "mixtral-8x7b": {"model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
                     "max_position_embeddings": 32768, "num_local_experts": 8, "num_experts_per_tok": 2,
                     "tie_word_embeddings": False},
    "qwen3-30b-a3b": {"model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144,
                      "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
                      "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
                      "vocab_size": 151936, "max_position_embeddings": 40960, "norm_topk_prob": True,
                      "tie_word_embeddings": False},
    "qwen3-235b-a22b": {"model_type": "qwen3_moe", "hidden_size": 4096, "intermediate_size": 12288,
                        "moe_intermediate_size": 1536, "num_experts": 128, "num_experts_per_tok": 8,
                        "num_hidden_layers": 94, "num_attention_heads": 64, "num_key_value_heads": 4, "head_dim": 128,
                        "vocab_size": 151936, "max_position_embeddings": 40960, "norm_topk_prob": True,
                        "tie_word_embeddings": False},
}.items()})


def load_shape(model: str) -> ModelShape:
    """``model`` is a preset name, a ``config.json`` path, or a checkpoint directory holding one."""
    key = model.lower()
    key = _ALIASES.get(key, key)
    if key in PRESETS:
        return PRESETS[key]
    path = os.path.join(model, "config.json") if os.path.isdir(model) else model
    if not os.path.isfile(path):
        raise QLoRADSError(f"--model {model!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json "
                           "or a directory holding one")
    with open(path) as f:
        return shape_from_hf_config(json.load(f), name=path)
