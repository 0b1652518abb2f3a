"""The greedy answer to one prompt that a finetune prints before and after training (``--sample-prompt``), and the
tokens that end a reply (``stop_token_ids``), shared with ``launch/generate.py``."""
from __future__ import annotations

import torch

from ..data.tokenize import _turn_end, prompt_ids


def trained_turn_end_id(tokenizer) -> int | None:
    """The token training makes an answer end with (``qlora_ds.data.tokenize``): the first special token of what
    the chat template writes after an assistant message (``<|im_end|>``, ``<|eot_id|>``, ``</s>``), or the EOS the
    plain ``### Role:`` format appends. None where the template ends a turn with plain text only."""
    if getattr(tokenizer, "chat_template", None) is None:
        return tokenizer.eos_token_id
    special = set(tokenizer.all_special_ids)
    special.update(i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special)
    ids = tokenizer(_turn_end(tokenizer), add_special_tokens=False)["input_ids"]
    return next((i for i in ids if i in special), None)


def stop_token_ids(model, tokenizer) -> list[int] | None:
    """``generate``'s ``eos_token_id``: the checkpoint's EOS ids and the turn end training taught (a base checkpoint
    whose template ends turns with another token than its EOS, e.g. Qwen2.5's ``<|im_end|>`` vs ``<|endoftext|>``,
    otherwise runs on to ``max_new_tokens``, inventing further turns). None: the generation config's as it is."""
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    ids = [] if eos is None else [int(eos)] if isinstance(eos, int) else [int(i) for i in eos]
    end = trained_turn_end_id(tokenizer)
    if end is not None and end not in ids:
        ids.append(end)
    return ids or None


def greedy_answer(model, tokenizer, prompt: str, device, synced: bool = False, plain_bos: bool = True) -> str:
    """Greedy 40-token answer to ``prompt``. ``synced``: every rank calls this and decodes in step (ZeRO-3, where
    each forward gathers the partitioned weights); ``plain_bos``: as the run tokenized its examples."""
    ids = torch.tensor([prompt_ids(tokenizer, [{"role": "user", "content": prompt}], plain_bos)], device=device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_token_ids(model, tokenizer),
                             synced_gpus=synced)
    model.train(was_training)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
