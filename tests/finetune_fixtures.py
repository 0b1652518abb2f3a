"""A tiny real-tokenizer Llama checkpoint and a small chat dataset, written once per test session."""
from __future__ import annotations

import json
import os

import torch

from .helpers import smollm2_gguf


def write_tiny_checkpoint(folder: str, hidden: int = 64, layers: int = 2, seed: int = 0) -> str:
    """A random LlamaForCausalLM with SmolLM2's real tokenizer (chat template included), as safetensors."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def write_chat_dataset(path: str, n: int = 96) -> str:
    from qlora_ds.packaged import chatterbot_pairs

    with open(path, "w", encoding="utf-8") as fh:
        for pair in chatterbot_pairs()[:n]:
            fh.write(json.dumps(pair) + "\n")
    return path
