"""Held-out loss and perplexity over a records file, tokenized exactly as training does.

Same records loader, chat template, response-only labels and truncation as ``launch/finetune.py``
(``qlora_ds.data``), so the number is comparable with the run's held-out loss. The loss is the
token-weighted mean next-token cross entropy over every label that is not -100 (all batches pooled,
not a mean of per-batch means); perplexity = exp(loss).
"""
from __future__ import annotations

import logging
import math

import torch

from ..data import collate, load_records, tokenize_records
from ..data.tokenize import IGNORE, check_vocab
from ..errors import QLoRADSError
from ..loss import causal_lm_loss, chunked_supported

log = logging.getLogger(__name__)


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def token_nll(model, batch: dict[str, torch.Tensor], chunked: bool = True) -> tuple[float, int]:
    """(summed next-token NLL, number of scored tokens) for one collated batch. The loss is the finetune's
    (``qlora_ds.loss.causal_lm_loss``, fp32): without a KV cache and, where ``chunked``, without the [B, T, vocab]
    logits (the LM head runs chunk by chunk), so what fit in training fits here."""
    dev = _device(model)
    batch = {k: v.to(dev) for k, v in batch.items()}
    n = int((batch["labels"][:, 1:] != IGNORE).sum())
    if n == 0:
        return 0.0, 0
    return float(causal_lm_loss(model, batch, chunked=chunked).double()) * n, n


def heldout_loss(model, tokenizer, records, max_len: int | None = None, batch_size: int = 4,
                 train_on_prompt: bool = False, **tokenization) -> dict:
    """{'loss', 'perplexity', 'tokens', 'examples'} over ``records`` (a path or a list of records).
    ``max_len``: truncation as in training (default: 512, as finetune's, or the model's context if shorter);
    ``tokenization``: the run's ``plain_bos`` / ``text_windows`` (``qlora_ds.eval.runs.tokenization``)."""
    if isinstance(records, str):
        records = load_records(records)
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "vocab_size", None):
        check_vocab(tokenizer, cfg.vocab_size)
    ctx = getattr(cfg, "max_position_embeddings", None)
    if max_len is None:
        max_len = min(512, ctx) if ctx else 512
    examples = tokenize_records(records, tokenizer, max_len, ctx, train_on_prompt, **tokenization)
    if batch_size < 1:
        raise QLoRADSError(f"batch_size={batch_size} must be >= 1")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    why = chunked_supported(model)
    if why is not None:
        log.warning("chunked LM-head loss not used: %s; computing the full logits", why)
    total, count = 0.0, 0
    try:
        for i in range(0, len(examples), batch_size):
            # widths padded to 16: a bounded set of shapes (CPU backends keep buffers per shape)
            batch = collate(examples[i:i + batch_size], pad, pad_to_multiple_of=16, max_width=max_len)
            nll, n = token_nll(model, batch, chunked=why is None)
            total, count = total + nll, count + n
    finally:
        model.train(was_training)
    if count == 0:
        raise QLoRADSError("no scored tokens in the held-out records (all labels masked); check the file")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else float("inf"), "tokens": count,
            "examples": len(examples)}
