"""SDPA over packed rows, one example at a time: ``T²`` attention per row becomes ``Σ len²``.

For a packed batch (``qlora_ds.data.packing``: per-example ``position_ids``, no ``attention_mask``) transformers
hands SDPA a block-diagonal causal mask of the whole row; SDPA then computes every [T, T] score (masked ones
included) and repeats K/V for grouped-query heads. ``install()`` puts a wrapper in front of transformers' ``sdpa``
attention that recognises exactly that mask — equal, element for element, to the block-diagonal causal mask of the
``position_ids`` resets (the rule transformers builds it from) — and then runs causal SDPA per example (no mask,
GQA without the repeat). Any other mask (padding, sliding window, a cache, position bias) goes to transformers'
own function unchanged, so the wrapper never changes a result, only the cost of packed rows. Eager, flash and
flex attention are not touched (flash already runs varlen over the same boundaries).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_seen: list = [None, None, None]      # (mask, position_ids, segments or None): once per forward, not per layer


def _segments(mask: torch.Tensor, position_ids: torch.Tensor) -> list[list[tuple[int, int]]] | None:
    """Per row, the [start, end) of its examples if ``mask`` is their block-diagonal causal mask, else None."""
    if _seen[0] is mask and _seen[1] is position_ids:
        return _seen[2]
    out = None
    b, t = position_ids.shape
    if mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[-2:] == (t, t) \
            and mask.shape[0] in (1, b) and b == mask.shape[0]:
        new = torch.ones_like(position_ids, dtype=torch.bool)
        new[:, 1:] = position_ids[:, 1:] - position_ids[:, :-1] != 1     # transformers' packed-boundary rule
        seg = new.cumsum(1)
        want = (seg[:, :, None] == seg[:, None, :]) & torch.ones(t, t, dtype=torch.bool,
                                                                   device=mask.device).tril()
        if torch.equal(want[:, None].to(mask.device), mask):
            out = []
            for row in new.cpu():
                starts = row.nonzero().squeeze(1).tolist() + [t]
                out.append(list(zip(starts[:-1], starts[1:])))
    _seen[:] = [mask, position_ids, out]
    return out


def _per_example(query, key, value, segments, dropout: float, scaling):
    gqa = query.shape[1] != key.shape[1]
    rows = []
    for b, segs in enumerate(segments):
        parts = [F.scaled_dot_product_attention(query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e],
                                                dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa)
                 for s, e in segs]
        rows.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
    out = torch.cat(rows) if len(rows) > 1 else rows[0]
    return out.transpose(1, 2).contiguous(), None          # [B, T, heads, head_dim], as transformers' sdpa


def packed_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                        is_causal=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    if (attention_mask is not None and isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2
            and query.shape[2] == key.shape[2] == position_ids.shape[1] and is_causal is not False
            and kwargs.get("position_bias") is None and kwargs.get("cache") is None
            and kwargs.get("softcap") is None and not kwargs.get("output_attentions", False)):
        segments = _segments(attention_mask, position_ids)
        if segments is not None:
            return _per_example(query, key, value, segments, dropout, scaling)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def install() -> None:
    """Route transformers' ``sdpa`` attention through ``packed_sdpa_forward`` (idempotent, process-wide)."""
    from transformers.modeling_utils import AttentionInterface

    if AttentionInterface._global_mapping.get("sdpa") is not packed_sdpa_forward:
        AttentionInterface.register("sdpa", packed_sdpa_forward)
