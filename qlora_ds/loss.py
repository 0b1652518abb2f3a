"""The training loss of a causal LM without its full logits: the model's own forward up to the LM head, then
the head and cross-entropy chunk by chunk (``qlora_ds.nn.chunked_loss``).

The model's forward runs as usual (through a DeepSpeed engine too, so ZeRO-3's root hooks run); a forward
pre-hook on the output embedding module takes the final hidden states and hands the head an empty slice, so
the head computes ``[batch, 0, vocab]`` logits, and a forward hook computes the loss right after, inside the
head's call. Both hooks run first (``prepend``): under ZeRO-3 the head's weight is still gathered in the forward
hook (no extra all-gather, no copy), and the hidden states are taken before ZeRO-3 wraps the head's input in its
backward-release Function — the loss's gradient reaches the final norm directly; ZeRO-3's head hooks see only the
empty slice, which the returned loss adds times 0 (so the engine's backward prologue, hooked on the forward's
outputs, runs: one more gather of the head per backward under ZeRO-3). The loss's own backward needs no weight (its
gradients are formed in forward, ``qlora_ds.nn.chunked_loss``). Works for every transformers CausalLM whose forward
calls ``get_output_embeddings()`` on the final hidden states and at most a known transform on the logits: the model
types in ``VERIFIED_MODEL_TYPES`` (Llama, Mistral, Qwen, DeepSeek, Gemma, Phi, Mamba, GPT-NeoX, OPT …), each checked
by a test. Gemma-2's (and Gemma3ForCausalLM's) final soft cap, Cohere's logit scale, Granite's logits scaling and
Falcon-H1's LM-head multiplier are applied inside the chunked loss (``qlora_ds.loss_support.APPLIED``); any other
transform (in the config or its text config) or an unverified model type uses the plain loss, with a warning.
"""
from __future__ import annotations

import logging

import torch

from .errors import QLoRADSError
from .loss_support import (LOGIT_TRANSFORMS, ROUTER_LOSS, ROUTER_WHY, VERIFIED_MODEL_TYPES, LogitTransform,
                           logit_transform)
from .nn.chunked_loss import IGNORE_INDEX, linear_cross_entropy

__all__ = ["LOGIT_TRANSFORMS", "VERIFIED_MODEL_TYPES", "causal_lm_loss", "chunked_supported", "chunked_transform"]

log = logging.getLogger(__name__)
_WARNED: set[str] = set()


def _configs(cfg) -> list:
    """The model's config and, for composite models, its text config (where their logit settings live)."""
    out = [cfg] if cfg is not None else []
    get = getattr(cfg, "get_text_config", None)
    text = get() if callable(get) else None
    return out + ([text] if text is not None and text is not cfg else [])


def chunked_transform(model) -> tuple[LogitTransform | None, str | None]:
    """(the logit transform the model applies after its head, None) if the chunked loss applies to ``model`` (or a
    DeepSpeed engine around it), else (None, why not)."""
    module = getattr(model, "module", model)
    cfg = getattr(module, "config", None)
    configs = _configs(cfg)
    transform, why = logit_transform(getattr(cfg, "model_type", None),
                                     [{n: getattr(c, n) for n in LOGIT_TRANSFORMS if hasattr(c, n)} for c in configs])
    if why is not None:
        return None, why
    if any(getattr(c, ROUTER_LOSS, False) for c in configs):
        return None, ROUTER_WHY
    get = getattr(module, "get_output_embeddings", None)
    head = get() if get else None
    if not isinstance(getattr(head, "weight", None), torch.Tensor):
        return None, "the model has no output embedding module with a weight"
    if hasattr(head.weight, "ds_id") and any(p.requires_grad for p in head.parameters(recurse=False)):
        # ZeRO-3 releases the head's partitions after its forward; a trained head's gradient would arrive after
        return None, "ZeRO-3 partitions a trained LM head (the chunked loss needs a frozen head there)"
    return transform, None


def chunked_supported(model) -> str | None:
    """None if the chunked loss applies to ``model`` (or a DeepSpeed engine around it), else why not."""
    return chunked_transform(model)[1]


def causal_lm_loss(model, batch: dict, chunked: bool = True, chunk_tokens: int | None = None,
                   num_items_in_batch=None, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The mean next-token loss of ``batch`` (``input_ids``, ``labels`` and optionally ``attention_mask`` /
    ``position_ids``) — transformers' ``ForCausalLMLoss`` — computed without the [tokens, vocab] logits when
    ``chunked``. ``model``: a transformers CausalLM or a DeepSpeed engine around one. No KV cache is built: besides
    saving memory, a cache would turn off transformers' packed-sequence mask (``qlora_ds.data.packing``)."""
    if "labels" not in batch:
        raise QLoRADSError("causal_lm_loss needs 'labels' in the batch (IGNORE_INDEX where no loss is taken)")
    extra = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
    transform, why = chunked_transform(model) if chunked else (None, "off")
    if why is not None:
        if chunked and why not in _WARNED:          # once per reason, not every micro step
            _WARNED.add(why)
            log.warning("chunked LM-head loss not used: %s; computing the full logits", why)
        return model(**batch, **extra, use_cache=False).loss
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    head = getattr(model, "module", model).get_output_embeddings()
    seen: list[torch.Tensor] = []
    losses: list[torch.Tensor] = []

    def take_hidden(_module, args):
        seen.append(args[0])
        return (args[0][..., :0, :],) + tuple(args[1:])

    def head_loss(module, _args, _output):      # before ZeRO-3's release hook: the weight is whole here
        if len(seen) == 1 and seen[0].shape[:-1] == labels.shape:
            losses.append(linear_cross_entropy(seen[0], module.weight, getattr(module, "bias", None), labels,
                                               ignore_index=ignore_index, num_items_in_batch=num_items_in_batch,
                                               chunk_tokens=chunk_tokens, scale=transform.scale,
                                               softcap=transform.softcap))

    handles = [head.register_forward_pre_hook(take_hidden, prepend=True),
               head.register_forward_hook(head_loss, prepend=True)]
    try:
        output = model(**inputs, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    if len(seen) != 1 or not losses:
        raise QLoRADSError(f"the model's forward called its output embedding {len(seen)} time(s)"
                           f"{' on ' + str(tuple(seen[0].shape)) if seen else ''}, not once on the hidden states of "
                           f"{tuple(labels.shape)} tokens; run with --no-chunked-loss")
    # the loss depends on the forward's (empty) logits too: a DeepSpeed engine runs its backward prologue from hooks
    # on its forward's outputs — without it ZeRO's gradient hooks see the previous micro step's accumulation
    # boundary (wrong gradients with offload_optimizer + accumulation) and wall_clock_breakdown's timers fail
    logits = getattr(output, "logits", None)
    return losses[0] if logits is None or not logits.requires_grad else losses[0] + logits.sum() * 0
