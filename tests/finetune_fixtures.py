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


CHAT_PAIRS = [("What is AI?", "A branch of computer science."), ("Hi there", "Hello, how are you?"),
              ("Name a color", "Blue is a color."), ("Count to three", "One two three.")]
WORD_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|> {% endif %}")


def save_word_level_tokenizer(pairs, model_dir: str, template: str = WORD_TEMPLATE) -> int:
    """A word-level tokenizer of ``pairs``' words (+ the special and chat-role tokens) with a chat template, saved
    to ``model_dir``: pad 1, bos 2, eos 3. Returns its vocabulary size."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for q, a in pairs for w in f"{q} {a}".split()})
    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>",
                                         "<|system|>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")
    fast.chat_template = template
    fast.save_pretrained(model_dir)
    return len(vocab)


def write_word_level_run(root: str, repeat: int = 10, seed: int = 0, tie: bool = False) -> dict:
    """A fast stand-in for the SmolLM2 tokenizer (whose GGUF parse takes seconds): a word-level tokenizer of
    CHAT_PAIRS' words with a chat template, the tiny random Llama of tests/tiny_models.py over its vocabulary
    (safetensors), and CHAT_PAIRS x ``repeat`` (made distinct) as a JSONL dataset. Returns {"model", "data"}."""
    from transformers import LlamaForCausalLM

    from .tiny_models import tiny_config

    model_dir = os.path.join(root, "model")
    vocab_size = save_word_level_tokenizer(CHAT_PAIRS, model_dir)
    config = tiny_config("llama", vocab=vocab_size)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 2, 3, 1
    config.tie_word_embeddings = tie
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(model_dir, safe_serialization=True)
    data = os.path.join(root, "chat.jsonl")
    with open(data, "w", encoding="utf-8") as fh:
        # distinct records (finetune leaves out repeats before its held-out split): the r-th copy asks with r "Hi"s
        rows = [(f"{q} {' '.join(['Hi'] * r)}".strip(), a) for r in range(repeat) for q, a in CHAT_PAIRS]
        fh.writelines(json.dumps({"instruction": q, "response": a}) + "\n" for q, a in rows)
    return {"model": model_dir, "data": data}
