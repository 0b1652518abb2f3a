"""Model shapes for the planner: shipped presets and HF ``config.json`` files read with json alone.

Only the numbers the memory and traffic model needs; no download, no transformers import.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from ..errors import QLoRADSError


@dataclass(frozen=True)
class ModelShape:
    """Decoder-only transformer in the LLaMA layout (q, k, v, o, gate, up, down per layer)."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    max_positions: int
    tie_embeddings: bool = False

    def __post_init__(self):
        for field in ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab", "max_positions"):
            if getattr(self, field) <= 0:
                raise QLoRADSError(f"model shape {self.name!r}: {field}={getattr(self, field)} must be > 0")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise QLoRADSError(f"model shape {self.name!r}: hidden={self.hidden}, heads={self.heads}, "
                               f"kv_heads={self.kv_heads} must divide evenly")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of the linear layers of one decoder layer."""
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def linear_params_per_layer(self) -> int:
        return sum(a * b for a, b in self.linears().values())

    @property
    def linear_params(self) -> int:
        """Parameters in the decoder linears: the part that is quantized."""
        return self.layers * self.linear_params_per_layer

    @property
    def embedding_params(self) -> int:
        """Token embedding + lm_head (once if tied) + RMSNorm weights: kept in 16 bit."""
        emb = self.vocab * self.hidden * (1 if self.tie_embeddings else 2)
        return emb + (2 * self.layers + 1) * self.hidden

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


def shape_from_hf_config(cfg: dict, name: str = "config.json") -> ModelShape:
    """Build a shape from a Hugging Face config dict (LLaMA/Mistral/Qwen-style keys)."""
    def need(key, *alts):
        for k in (key, *alts):
            if k in cfg:
                return int(cfg[k])
        raise QLoRADSError(f"{name}: missing {key!r}; the planner needs hidden_size, intermediate_size, "
                           "num_hidden_layers, num_attention_heads and vocab_size")
    heads = need("num_attention_heads", "n_head")
    return ModelShape(
        name=str(cfg.get("_name_or_path") or name),
        hidden=need("hidden_size", "n_embd"),
        intermediate=need("intermediate_size", "ffn_dim"),
        layers=need("num_hidden_layers", "n_layer"),
        heads=heads,
        kv_heads=int(cfg.get("num_key_value_heads") or heads),
        vocab=need("vocab_size"),
        max_positions=int(cfg.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


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
