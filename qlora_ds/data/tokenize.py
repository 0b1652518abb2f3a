"""Tokenize records; labels are -100 everywhere but on the assistant's tokens (train on the response only)."""
from __future__ import annotations

import logging

import torch

from ..errors import QLoRADSError

IGNORE = -100
log = logging.getLogger(__name__)


def _chat_ids(tokenizer, messages) -> tuple[list[int], list[int]]:
    """Token ids of a chat and a mask of the assistant tokens. By rendering prefixes of the chat where the template
    renders each prefix as the start of the next (ChatML, Llama 3, …); else by locating the assistant turns in the
    rendering of the whole chat (``_span_ids``: Qwen3 drops earlier turns' reasoning, Mistral v0.3 moves the system
    prompt into the last user turn)."""
    ids: list[int] = []
    mask: list[int] = []
    for i, msg in enumerate(messages):
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False,
                                             add_generation_prompt=False)
        full = tokenizer(upto, add_special_tokens=False)["input_ids"]
        if full[:len(ids)] != ids:
            return _span_ids(tokenizer, messages)
        new = full[len(ids):]
        if msg["role"] == "assistant":
            # the assistant header belongs to the prompt; train on what follows it
            prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            if full[:len(prompt_ids)] != prompt_ids:
                return _span_ids(tokenizer, messages)
            head = max(0, len(prompt_ids) - len(ids))
            mask += [0] * min(head, len(new)) + [1] * max(0, len(new) - head)
        else:
            mask += [0] * len(new)
        ids = full
    return ids, mask


PROBE = "qlora-ds probe answer"


def _turn_end(tokenizer) -> str:
    """What the template writes after an assistant message's content (e.g. ``<|im_end|>\n``, ``</s>``)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": PROBE}],
                                         tokenize=False)
    at = text.rfind(PROBE)
    return text[at + len(PROBE):] if at >= 0 else ""


def _span_ids(tokenizer, messages) -> tuple[list[int], list[int]]:
    """The whole chat rendered once; trained: the tokens overlapping an assistant message's content (found in order
    in the text) and the turn end the template writes after it."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    if not getattr(tokenizer, "is_fast", False):
        raise QLoRADSError("this chat template renders earlier turns differently once the chat goes on, so the "
                           "assistant tokens are found by character offsets, which needs a fast tokenizer; load it "
                           "with use_fast=True or pass --train-on-prompt")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    end_text, spans, pos = _turn_end(tokenizer), [], 0
    for msg in messages:
        if msg["role"] != "assistant":
            continue
        content = msg["content"].strip()
        start = text.find(content, pos) if content else -1
        if start < 0:
            raise QLoRADSError(f"the chat template does not render assistant message {msg['content'][:40]!r} "
                               f"verbatim, so its tokens cannot be found; pass --train-on-prompt or use another "
                               f"template")
        end = start + len(content)
        if end_text and text.startswith(end_text, end):
            end += len(end_text)
        spans.append((start, end))
        pos = end
    mask = [int(any(a < e and b > s for s, e in spans)) for a, b in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


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
    from jinja2 import TemplateError

    use_template = getattr(tokenizer, "chat_template", None) is not None
    examples = []
    for i, rec in enumerate(records):
        if "text" in rec:
            ids = tokenizer(rec["text"], add_special_tokens=True)["input_ids"]
            mask = [1] * len(ids)
        else:
            try:
                ids, mask = (_chat_ids if use_template else _plain_ids)(tokenizer, rec["messages"])
            except TemplateError as err:
                raise QLoRADSError(f"record #{i}: the tokenizer's chat template refused it ({err})") from None
        if train_on_prompt:
            mask = [1] * len(ids)
        ids, mask = ids[:max_len], mask[:max_len]
        if not any(mask):
            continue  # the response was truncated away entirely: nothing to learn from this record
        labels = [t if m else IGNORE for t, m in zip(ids, mask)]
        examples.append({"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)})
    if not examples:
        raise QLoRADSError(f"no example kept a response token within --max-len {max_len}; raise --max-len")
    if len(examples) < len(records):
        log.warning("%d of %d records lost their whole response to --max-len %d and are left out; raise --max-len "
                    "to keep them", len(records) - len(examples), len(records), max_len)
    return examples


def check_vocab(tokenizer, model_vocab: int) -> None:
    """A tokenizer with more tokens than the model's embedding would index out of range mid-run."""
    if len(tokenizer) > model_vocab:
        raise QLoRADSError(f"the tokenizer has {len(tokenizer)} tokens but the model's embedding has {model_vocab}; "
                           f"use the tokenizer saved with this model (or resize the embeddings first)")
