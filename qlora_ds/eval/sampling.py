"""The greedy answer to one prompt that a finetune prints before and after training (``--sample-prompt``)."""
from __future__ import annotations

import torch


def greedy_answer(model, tokenizer, prompt: str, device, synced: bool = False) -> str:
    """Greedy 40-token answer to ``prompt``. ``synced``: every rank calls this and decodes in step (ZeRO-3, where
    each forward gathers the partitioned weights)."""
    msgs = [{"role": "user", "content": prompt}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    else:
        text = f"### User:\n{prompt}\n\n### Assistant:\n"
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=40, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             synced_gpus=synced)
    model.train(was_training)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
