"""The training loss of a causal LM without its full logits: the model's own forward up to the LM head, then
the head and cross-entropy chunk by chunk (``qlora_ds.nn.chunked_loss``).

The model's forward runs as usual (through a DeepSpeed engine too, so ZeRO-3's root hooks run); a forward
pre-hook on the output embedding module takes the final hidden states and hands the head an empty slice, so
the head computes ``[batch, 0, vocab]`` logits, and a forward hook computes the loss right after, inside the
head's call. Both hooks run first (``prepend``): under ZeRO-3 the head's weight is still gathered in the forward
hook (no extra all-gather, no copy), and the hidden states are taken before ZeRO-3 wraps the head's input in its
backward-release Function — the loss's gradient reaches the final norm directly, so ZeRO-3's head hooks (which
see only the unused empty slice) never fire in backward. The loss's own backward needs no weight (its gradients
are formed in forward, ``qlora_ds.nn.chunked_loss``). Works for every transformers CausalLM whose forward calls
``get_output_embeddings()`` on the final hidden states (Llama, Mistral, Qwen, GPT-NeoX, OPT …); models that
transform the logits after the head (soft-capping, logit scales) use the plain loss.
"""
from __future__ import annotations

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
    if hasattr(head.weight, "ds_id") and any(p.requires_grad for p in head.parameters(recurse=False)):
        # ZeRO-3 releases the head's partitions after its forward; a trained head's gradient would arrive after
        return "ZeRO-3 partitions a trained LM head (the chunked loss needs a frozen head there)"
    return None


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
    losses: list[torch.Tensor] = []

    def take_hidden(_module, args):
        seen.append(args[0])
        return (args[0][..., :0, :],) + tuple(args[1:])

    def head_loss(module, _args, _output):      # before ZeRO-3's release hook: the weight is whole here
        if len(seen) == 1 and seen[0].shape[:-1] == labels.shape:
            losses.append(linear_cross_entropy(seen[0], module.weight, getattr(module, "bias", None), labels,
                                               ignore_index=ignore_index, num_items_in_batch=num_items_in_batch,
                                               chunk_tokens=chunk_tokens))

    handles = [head.register_forward_pre_hook(take_hidden, prepend=True),
               head.register_forward_hook(head_loss, prepend=True)]
    try:
        model(**inputs, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    if len(seen) != 1 or not losses:
        raise QLoRADSError(f"the model's forward called its output embedding {len(seen)} time(s)"
                           f"{' on ' + str(tuple(seen[0].shape)) if seen else ''}, not once on the hidden states of "
                           f"{tuple(labels.shape)} tokens; run with --no-chunked-loss")
    return losses[0]
