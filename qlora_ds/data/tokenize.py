"""Tokenize records; labels are -100 everywhere but on the assistant's tokens (train on the response only)."""
from __future__ import annotations

import torch

from ..errors import QLoRADSError

IGNORE = -100


def _chat_ids(tokenizer, messages) -> tuple[list[int], list[int]]:
    """Token ids of a chat and a mask of the assistant tokens (by rendering prefixes of the chat)."""
    ids: list[int] = []
    mask: list[int] = []
    for i, msg in enumerate(messages):
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False,
                                             add_generation_prompt=False)
        full = tokenizer(upto, add_special_tokens=False)["input_ids"]
        new = full[len(ids):]
        if msg["role"] == "assistant":
            # the assistant header belongs to the prompt; train on what follows it
            prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            prompt_len = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
            head = max(0, prompt_len - len(ids))
            mask += [0] * min(head, len(new)) + [1] * max(0, len(new) - head)
        else:
            mask += [0] * len(new)
        ids = full
    return ids, mask


def _plain_ids(tokenizer, messages) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    mask: list[int] = []
    for msg in messages:
        text = (f"### {msg['role'].capitalize()}:\n{msg['content']}\n\n")
        new = tokenizer(text, add_special_tokens=False)["input_ids"]
        if msg["role"] == "assistant":
            head = len(tokenizer(f"### {msg['role'].capitalize()}:\n", add_special_tokens=False)["input_ids"])
            mask += [0] * head + [1] * (len(new) - head)
        else:
            mask += [0] * len(new)
        ids += new
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
        mask.append(1)
    return ids, mask


def tokenize_records(records, tokenizer, max_len: int, model_max_len: int | None = None,
                     train_on_prompt: bool = False) -> list[dict[str, torch.Tensor]]:
    """input_ids/labels per record, truncated to ``max_len``; a max_len beyond the model's context is refused."""
    if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 2:
        raise QLoRADSError(f"--max-len {max_len!r} must be an integer >= 2 (a prompt token and a response token); "
                           f"QLoRA uses 512 to 1024")
    if model_max_len is not None and max_len > model_max_len:
        raise QLoRADSError(f"--max-len {max_len} exceeds the model's context of {model_max_len} tokens; "
                           f"lower --max-len to at most {model_max_len}")
    use_template = getattr(tokenizer, "chat_template", None) is not None
    examples = []
    for i, rec in enumerate(records):
        if "text" in rec:
            ids = tokenizer(rec["text"], add_special_tokens=True)["input_ids"]
            mask = [1] * len(ids)
        else:
            ids, mask = (_chat_ids if use_template else _plain_ids)(tokenizer, rec["messages"])
        if train_on_prompt:
            mask = [1] * len(ids)
        ids, mask = ids[:max_len], mask[:max_len]
        if not any(mask):
            continue  # the response was truncated away entirely: nothing to learn from this record
        labels = [t if m else IGNORE for t, m in zip(ids, mask)]
        examples.append({"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)})
    if not examples:
        raise QLoRADSError(f"no example kept a response token within --max-len {max_len}; raise --max-len")
    return examples


def check_vocab(tokenizer, model_vocab: int) -> None:
    """A tokenizer with more tokens than the model's embedding would index out of range mid-run."""
    if len(tokenizer) > model_vocab:
        raise QLoRADSError(f"the tokenizer has {len(tokenizer)} tokens but the model's embedding has {model_vocab}; "
                           f"use the tokenizer saved with this model (or resize the embeddings first)")
