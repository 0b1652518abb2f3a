"""The greedy answer to one prompt that a finetune prints before and after training (``--sample-prompt``)."""
from __future__ import annotations

import torch

from ..data.tokenize import prompt_ids


def greedy_answer(model, tokenizer, prompt: str, device, synced: bool = False, plain_bos: bool = True) -> str:
    """Greedy 40-token answer to ``prompt``. ``synced``: every rank calls this and decodes in step (ZeRO-3, where
    each forward gathers the partitioned weights); ``plain_bos``: as the run tokenized its examples."""
    ids = torch.tensor([prompt_ids(tokenizer, [{"role": "user", "content": prompt}], plain_bos)], device=device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, synced_gpus=synced)
    model.train(was_training)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
