"""Attention over packed rows, example by example: ``T²`` attention per row becomes ``Σ len²``.

For a packed batch (``qlora_ds.data.packing``: per-example ``position_ids``, no ``attention_mask``) transformers
hands SDPA a block-diagonal causal mask of the whole row; SDPA then computes every [T, T] score (masked ones
included) and repeats K/V for grouped-query heads. ``install()`` puts a wrapper in front of transformers' ``sdpa``
attention that recognises exactly that mask — equal, element for element, to the block-diagonal causal mask of the
``position_ids`` resets (the rule transformers builds it from) — and then attends within each example only. Any
other mask (padding, sliding window, a cache, position bias) goes to transformers' own function unchanged, so the
wrapper never changes a result, only the cost of packed rows. Eager, flash and flex attention are not touched
(flash already runs varlen over the same boundaries).

The examples of all rows are sorted by length and gathered into right-padded ``[n, heads, L, head_dim]`` groups,
attended causally in one call per group: right padding needs no mask, since causal queries never reach the keys
after them, and the padded queries' outputs are dropped. Short examples (≤ ``SHORT_LEN`` tokens, most of a chat
corpus's) form groups of at most ``MAX_SCORES`` scores, computed on the CPU in bf16/fp16 as transformers' eager
attention does (scores in the compute dtype, softmax in fp32, probabilities cast back), which beats CPU flash
attention at these lengths (in fp32 flash wins, and runs); longer ones form groups of at most ``MAX_GROUP_TOKENS``
tokens for one SDPA call (flash: memory linear in length), as do all groups on CUDA. Calling SDPA once per example
instead cost more than the attention itself (CPU flash-attention backward has a fixed cost per call: 9 chatterbot
examples in a 512-token row took 11.7 ms fwd+bwd per layer, the eager group 4.4 ms, Xeon bf16).
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

# examples up to this many tokens are batched together. On CPU the eager group beats flash attention below ~190
# tokens and loses above (one example fwd+bwd, 9 heads, bf16, Xeon: 1.5 vs 2.3 ms at 128, 4.4 vs 3.2 ms at 256)
SHORT_LEN = 192
MAX_SCORES = 1 << 22       # heads × L² × examples per batched group (fp32 scores: 16 MiB, ~3× that with autograd's)
MAX_GROUP_TOKENS = 8192   # padded tokens per group of long examples (one SDPA call; memory linear in tokens)
# short groups computed as eager attention on these devices in these dtypes, one causal SDPA call otherwise (in
# fp32, CPU flash attention is the faster: 3.9 vs 5.1 ms fwd+bwd for the 9-example row above)
EAGER_DEVICES = {"cpu"}
EAGER_DTYPES = {torch.bfloat16, torch.float16}
# (weak refs to the mask and position_ids, plan or None): planned once per forward, not per layer; dropped when
# the mask or position_ids are freed, so nothing of a forward ([B, 1, T, T] mask included) outlives it here
_seen: list = [None, None, None]


def _length_groups(spans: list[tuple[int, int]], fits) -> list[list[tuple[int, int]]]:
    """``spans`` (start, length) sorted by length and cut into consecutive groups, each grown while
    ``fits(examples, width)`` holds (a single example always forms a group)."""
    spans = sorted(spans, key=lambda sp: sp[1])
    groups = []
    while spans:
        n = 1
        while n < len(spans) and fits(n + 1, spans[n][1]):      # ascending: the new one sets the width
            n += 1
        groups.append(spans[:n])
        spans = spans[n:]
    return groups


class _Plan:
    """Where each example's tokens go: length-sorted groups (short ones computed eagerly on the CPU, long ones by
    SDPA) and the inverse permutation that puts the outputs back in row order. Token indices are into the
    flattened [B·T] rows."""

    def __init__(self, segments: list[list[tuple[int, int]]], t: int, heads: int, device):
        self.spans = [(b * t + s, e - s) for b, segs in enumerate(segments) for s, e in segs]
        short = [sp for sp in self.spans if sp[1] <= SHORT_LEN]
        long = [sp for sp in self.spans if sp[1] > SHORT_LEN]
        self.groups = []                      # (gather index [n·L], n, L, short)
        position = torch.empty(len(segments) * t, dtype=torch.long)   # token -> its row in the concatenated output
        done = 0
        for group, is_short in ([(g, True) for g in _length_groups(short, lambda n, w: n * heads * w * w <= MAX_SCORES)]
                                + [(g, False) for g in _length_groups(long, lambda n, w: n * w <= MAX_GROUP_TOKENS)]):
            width = group[-1][1]
            # padded slots repeat the example's last token: causal queries never see them, their outputs are dropped
            idx = [start + min(j, ln - 1) for start, ln in group for j in range(width)]
            self.groups.append((torch.tensor(idx, device=device), len(group), width, is_short))
            for i, (start, ln) in enumerate(group):
                position[start:start + ln] = torch.arange(done + i * width, done + i * width + ln)
            done += len(group) * width
        self.position = position.to(device)


def _segments(mask: torch.Tensor, position_ids: torch.Tensor) -> list[list[tuple[int, int]]] | None:
    """Per row, the [start, end) of its examples if ``mask`` is their block-diagonal causal mask, else None."""
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
    return out


def _forget(ref: weakref.ref) -> None:
    if ref is _seen[0] or ref is _seen[1]:
        _seen[:] = [None, None, None]


def _plan_for(mask: torch.Tensor, position_ids: torch.Tensor, heads: int) -> _Plan | None:
    if _seen[0] is None or not (_seen[0]() is mask and _seen[1]() is position_ids):
        segments = _segments(mask, position_ids)
        plan = None if segments is None else _Plan(segments, position_ids.shape[1], heads, position_ids.device)
        _seen[:] = [weakref.ref(mask, _forget), weakref.ref(position_ids, _forget), plan]
    return _seen[2]


def _eager_causal(q, k, v, dropout: float, scale: float):
    """[n, h, L, d] causal attention as transformers' eager path computes it; grouped K/V heads without repeat."""
    n, h, length, d = q.shape
    kv = k.shape[1]
    causal = torch.full((length, length), float("-inf"), device=q.device).triu(1)
    # fp32 + scale · (scores in the compute dtype): one kernel scales, masks and widens the scores to fp32
    scores = torch.add(causal, torch.matmul(q.reshape(n, kv, h // kv, length, d), k[:, :, None].transpose(-1, -2)),
                       alpha=scale)
    probs = F.dropout(torch.softmax(scores, -1), p=dropout) if dropout else torch.softmax(scores, -1)
    return torch.matmul(probs.to(v.dtype), v[:, :, None]).reshape(n, h, length, d)


def _attend(query, key, value, plan: _Plan, dropout: float, scaling):
    b, h, t, d = query.shape
    scale = d ** -0.5 if scaling is None else scaling
    gqa = h != key.shape[1]
    flat = [x.transpose(1, 2).reshape(b * t, x.shape[1], d) for x in (query, key, value)]   # [B·T, heads, d]
    pieces = []
    for idx, n, width, short in plan.groups:
        q, k, v = (x.index_select(0, idx).view(n, width, x.shape[1], d).transpose(1, 2) for x in flat)
        if short and q.device.type in EAGER_DEVICES and q.dtype in EAGER_DTYPES:
            out = _eager_causal(q, k, v, dropout, scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scale,
                                                 enable_gqa=gqa)
        pieces.append(out.transpose(1, 2).reshape(n * width, h, d))
    out = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    return out.index_select(0, plan.position).view(b, t, h, d), None     # [B, T, heads, head_dim], as transformers


def packed_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                        is_causal=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    if (attention_mask is not None and isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2
            and query.shape[2] == key.shape[2] == position_ids.shape[1] and is_causal is not False
            and kwargs.get("position_bias") is None and kwargs.get("cache") is None
            and kwargs.get("softcap") is None and not kwargs.get("output_attentions", False)):
        plan = _plan_for(attention_mask, position_ids, query.shape[1])
        if plan is not None:
            return _attend(query, key, value, plan, dropout, scaling)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def install() -> None:
    """Route transformers' ``sdpa`` attention through ``packed_sdpa_forward`` (idempotent, process-wide)."""
    from transformers.modeling_utils import AttentionInterface

    if AttentionInterface._global_mapping.get("sdpa") is not packed_sdpa_forward:
        AttentionInterface.register("sdpa", packed_sdpa_forward)
