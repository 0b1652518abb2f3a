"""Tiny random HF causal LMs, one per supported architecture (hidden 64, 2 layers, vocab 128)."""
from __future__ import annotations

import torch

VOCAB = 128

EXPECTED = {  # leaf names wrapped per layer, per architecture
    "llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "mistral": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "qwen2": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "gpt_neox": {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"},
    "opt": {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"},
    "bloom": {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"},
    "gpt2": {"c_attn", "c_proj", "c_fc"},
    "falcon": {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"},
}


def tiny_config(arch: str, hidden: int = 64, layers: int = 2, vocab: int = VOCAB, inter: int | None = None):
    import transformers as tf
    inter = inter or 2 * hidden
    common = dict(vocab_size=vocab)
    if arch in ("llama", "mistral", "qwen2"):
        cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}[arch]
        return cls(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=(arch == "qwen2"), **common)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                                num_attention_heads=4, max_position_embeddings=64, **common)
    if arch == "opt":
        return tf.OPTConfig(hidden_size=hidden, ffn_dim=inter, num_hidden_layers=layers, num_attention_heads=4,
                            max_position_embeddings=64, word_embed_proj_dim=hidden, **common)
    if arch == "bloom":
        return tf.BloomConfig(hidden_size=hidden, n_layer=layers, n_head=4, **common)
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0, **common)
    if arch == "falcon":
        return tf.FalconConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                               new_decoder_architecture=False, multi_query=True, **common)
    if arch in ("mamba", "falcon_mamba"):
        cls = {"mamba": tf.MambaConfig, "falcon_mamba": tf.FalconMambaConfig}[arch]
        return cls(hidden_size=hidden, num_hidden_layers=layers, state_size=8, expand=2, **common)
    if arch == "jamba":     # layer 0 Mamba + dense MLP, layer 1 attention + MoE
        return tf.JambaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                              num_attention_heads=4, num_key_value_heads=2, attn_layer_period=2, attn_layer_offset=1,
                              expert_layer_period=2, expert_layer_offset=1, num_experts=4, num_experts_per_tok=2,
                              mamba_d_state=8, mamba_expand=2, pad_token_id=0, **common)
    raise ValueError(arch)


def tiny_model(arch: str, seed: int = 0, dtype=torch.float32, **kw):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **kw), dtype=dtype)
    return model.eval()
