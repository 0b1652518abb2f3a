"""The training loss of a causal LM without its full logits: the model's own forward up to the LM head, then
the head and cross-entropy chunk by chunk (``qlora_ds.nn.chunked_loss``).

The model's forward runs as usual (through a DeepSpeed engine too, so ZeRO-3's root hooks run); a forward
pre-hook on the output embedding module takes the final hidden states and hands the head an empty slice, so
the head computes ``[batch, 0, vocab]`` logits. Works for every transformers CausalLM whose forward calls
``get_output_embeddings()`` on the final hidden states (Llama, Mistral, Qwen, GPT-NeoX, OPT …); models that
transform the logits after the head (soft-capping, logit scales) use the plain loss.
"""
from __future__ import annotations

import contextlib
import logging

import torch

from .errors import QLoRADSError
from .nn.chunked_loss import IGNORE_INDEX, linear_cross_entropy

log = logging.getLogger(__name__)
# config attributes that change the logits after the head: the chunked path would compute another loss
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def chunked_supported(model) -> str | None:
    """None if the chunked loss applies to ``model`` (or a DeepSpeed engine around it), else why not."""
    module = getattr(model, "module", model)
    cfg = getattr(module, "config", None)
    for name in LOGIT_TRANSFORMS:
        if getattr(cfg, name, None) not in (None, 1, 1.0):
            return f"config.{name}={getattr(cfg, name)!r} transforms the logits after the head"
    get = getattr(module, "get_output_embeddings", None)
    head = get() if get else None
    if not isinstance(getattr(head, "weight", None), torch.Tensor):
        return "the model has no output embedding module with a weight"
    if hasattr(head.weight, "ds_id"):
        # ZeRO-3 re-gathers parameters in backward through hooks on module outputs; the head's output here is
        # an empty slice the loss never uses, and a 2-rank run failed in backward (tests/test_finetune.py)
        return "ZeRO-3 partitions the model (the chunked loss does not yet run under its backward hooks)"
    return None


@contextlib.contextmanager
def _head_weight(head):
    """(weight, bias) usable for a whole forward and backward. Under ZeRO-3 the parameters are partitioned
    between module calls, so a frozen head is gathered once and copied (its size is counted by the planner)."""
    w, b = head.weight, getattr(head, "bias", None)
    if not hasattr(w, "ds_id"):
        yield w, b
        return
    import deepspeed

    params = [p for p in (w, b) if p is not None]
    if any(p.requires_grad for p in params):
        raise QLoRADSError("chunked loss under ZeRO-3 needs a frozen LM head (a trained head is partitioned); "
                           "run with --no-chunked-loss or freeze the head")
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        copies = (w.detach().clone(), None if b is None else b.detach().clone())
    yield copies


def causal_lm_loss(model, batch: dict, chunked: bool = True, chunk_tokens: int | None = None,
                   num_items_in_batch=None, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The mean next-token loss of ``batch`` (``input_ids``, ``labels`` and optionally ``attention_mask`` /
    ``position_ids``) — transformers' ``ForCausalLMLoss`` — computed without the [tokens, vocab] logits when
    ``chunked``. ``model``: a transformers CausalLM or a DeepSpeed engine around one. No KV cache is built: besides
    saving memory, a cache would turn off transformers' packed-sequence mask (``qlora_ds.data.packing``)."""
    if "labels" not in batch:
        raise QLoRADSError("causal_lm_loss needs 'labels' in the batch (IGNORE_INDEX where no loss is taken)")
    extra = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
    why = chunked_supported(model) if chunked else "off"
    if why is not None:
        if chunked:
            log.warning("chunked LM-head loss not used: %s; computing the full logits", why)
        return model(**batch, **extra, use_cache=False).loss
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    head = getattr(model, "module", model).get_output_embeddings()
    seen: list[torch.Tensor] = []

    def take_hidden(_module, args):
        seen.append(args[0])
        return (args[0][..., :0, :],) + tuple(args[1:])

    handle = head.register_forward_pre_hook(take_hidden)
    try:
        model(**inputs, use_cache=False)
    finally:
        handle.remove()
    if len(seen) != 1 or seen[0].shape[:-1] != labels.shape:
        raise QLoRADSError(f"the model's forward called its output embedding {len(seen)} time(s)"
                           f"{' on ' + str(tuple(seen[0].shape)) if seen else ''}, not once on the hidden states of "
                           f"{tuple(labels.shape)} tokens; run with --no-chunked-loss")
    with _head_weight(head) as (weight, bias):
        return linear_cross_entropy(seen[0], weight, bias, labels, ignore_index=ignore_index,
                                    num_items_in_batch=num_items_in_batch, chunk_tokens=chunk_tokens)
