"""LM head + cross-entropy over token chunks: the [tokens, vocab] logits never exist at once.

Forward runs the head chunk by chunk; each chunk's logits give its losses (through the log-sum-exp) and, when a
gradient will be wanted, are turned into ``softmax - onehot`` in place and multiplied by the head weight right
away, so no chunk is ever recomputed and backward only scales the stored [tokens, hidden] input gradient.
Peak extra memory is one chunk of logits (``chunk_tokens × vocab``), instead of the 12 bytes per logit of a
plain fp32 log-softmax with its two gradients. The head weight gets a gradient only if it
requires one (frozen for QLoRA; a tied embedding that trains gets its head part through this Function).

Only tokens with a target (label != ignore_index) are computed at all: with a response-only loss most prompt
tokens cost nothing. The logits of a chunk are computed in the hidden states' dtype, then taken to fp32 for the
softmax, as the plain path (``lm_head`` in the compute dtype, ``logits.float()`` in the loss) does.

A logit transform after the head (``scale``, ``softcap``: logits → softcap·tanh(scale·logits/softcap), as
``qlora_ds.loss_support`` reads it from the model's config) is applied to each chunk's fp32 logits, and its derivative
(scale·(1 - tanh²)) multiplies the chunk's ``softmax - onehot`` in the same pass. The plain path transforms the logits
in the compute dtype (bf16 in training) before ``.float()``: the chunked loss is then the more precise of the two.
A soft cap keeps one more chunk-sized fp32 buffer (the tanh) while the chunk's gradient is formed.
"""
from __future__ import annotations

import math

import torch

from ..errors import QLoRADSError

IGNORE_INDEX = -100
LOGIT_BUDGET = 1 << 24      # fp32 logits per chunk (64 MiB); a chunk's backward holds about one more such buffer


def default_chunk_tokens(vocab: int) -> int:
    return max(16, LOGIT_BUDGET // max(1, vocab))


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())
    return out.float()


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Sum over rows of CE(T(h·Wᵀ + b), target); the caller divides. Rows are pre-selected (every target valid).
    Inputs: h [n, H], weight [V, H], bias [V] | None, target [n] (long); T(z) = softcap·tanh(scale·z/softcap), or
    scale·z when ``softcap`` is None.

    With ``eager`` (grad mode on) the gradients are formed in the same pass over the chunks, while each chunk's
    logits exist anyway: backward then only scales them by the incoming gradient. That costs the head's matmuls
    once (as the full-logits path does) instead of a forward plus a recomputation, and keeps the same memory:
    the [n, H] input gradient is saved instead of the [n, H] input. Without ``eager`` (no_grad, evaluation)
    only the loss is computed."""

    @staticmethod
    def forward(ctx, h, weight, bias, target, chunk: int, eager: bool, scale: float = 1.0,
                softcap: float | None = None):
        need_h, need_w = eager and ctx.needs_input_grad[0], eager and ctx.needs_input_grad[1]
        need_b = eager and bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        w = weight.to(h.dtype)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, h.shape[0], chunk):
            hc, tc = h[s:s + chunk], target[s:s + chunk]
            logits = _logits(hc, w, bias)
            slope = None
            if softcap is not None:                                 # logits → softcap·tanh(scale·logits/softcap)
                slope = logits.mul_(scale / softcap).tanh_()
                logits = slope * softcap
            elif scale != 1.0:
                logits.mul_(scale)
            lse = torch.logsumexp(logits, dim=-1)
            rows = torch.arange(logits.shape[0], device=logits.device)
            total += (lse - logits[rows, tc]).sum()
            if need_h or need_w or need_b:
                p = logits.sub_(lse[:, None]).exp_()                # softmax, in place of the logits
                p[rows, tc] -= 1.0                                  # - onehot(target): d loss / d logits
                if slope is not None:                               # chain rule: d T / d z = scale·(1 - tanh²)
                    p.mul_(slope.square_().neg_().add_(1.0).mul_(scale))
                elif scale != 1.0:
                    p.mul_(scale)
                pc = p.to(h.dtype)
                if need_h:
                    torch.mm(pc, w, out=grad_h[s:s + chunk])
                if need_w:
                    grad_w.addmm_(pc.t().float(), hc.float())
                if need_b:
                    grad_b += p.sum(0)
                del p, pc
            del logits, slope
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.eager, ctx.dtypes, ctx.rows = eager, (weight.dtype, None if bias is None else bias.dtype), h.shape[0]
        return total

    @staticmethod
    def backward(ctx, grad_total):
        if not ctx.eager:
            raise RuntimeError("the chunked LM-head loss was computed without grad mode; it has no gradient")
        grad_h, grad_w, grad_b = ctx.saved_tensors
        # no target rows: the sum is constant (0), so its gradients are 0 even when the incoming one is not finite
        # (the caller's mean over no targets is 0/0), as with F.cross_entropy
        g = grad_total.float() if ctx.rows else torch.zeros_like(grad_total, dtype=torch.float32)
        out_h = None if grad_h is None else grad_h * g.to(grad_h.dtype)
        out_w = None if grad_w is None else (grad_w * g).to(ctx.dtypes[0])
        out_b = None if grad_b is None else (grad_b * g).to(ctx.dtypes[1])
        return out_h, out_w, out_b, None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         labels: torch.Tensor, *, shift: bool = True, ignore_index: int = IGNORE_INDEX,
                         num_items_in_batch=None, chunk_tokens: int | None = None, scale: float = 1.0,
                         softcap: float | None = None) -> torch.Tensor:
    """The causal-LM loss of ``hidden`` [B, T, H] under the head (``weight`` [V, H], ``bias``) against ``labels``
    [B, T], equal to transformers' ``ForCausalLMLoss`` on the full logits: targets shifted by one (``shift``),
    ``ignore_index`` skipped, mean over the targets (or the sum divided by ``num_items_in_batch``). ``scale``,
    ``softcap``: the logits are softcap·tanh(scale·logits/softcap) (Gemma-2's soft cap), or scale·logits."""
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden states {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree in "
                         f"(batch, tokens)")
    if shift:
        hidden, labels = hidden[..., :-1, :], labels[..., 1:]
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1).to(h.device)
    keep = (y != ignore_index).nonzero().squeeze(1)
    h, y = h.index_select(0, keep), y.index_select(0, keep)
    bad = (y < 0) | (y >= weight.shape[0])
    if bool(bad.any()):                 # F.cross_entropy raises too; indexing would wrap a negative label silently
        raise QLoRADSError(f"{int(bad.sum())} label(s) out of bounds for a vocabulary of {weight.shape[0]} (e.g. "
                           f"{int(y[bad][0])}): labels must be token ids in [0, {weight.shape[0]}) or ignore_index "
                           f"({ignore_index}); pad labels with ignore_index, or pass the ignore_index the data uses")
    chunk = chunk_tokens or default_chunk_tokens(weight.shape[0])
    eager = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if softcap is not None and (not math.isfinite(softcap) or softcap == 0) or not math.isfinite(scale):
        raise QLoRADSError(f"logit transform scale={scale!r}, softcap={softcap!r}: the scale must be finite and the "
                           "soft cap finite and non-zero (None for no cap)")
    total = ChunkedLinearCrossEntropy.apply(h, weight, bias, y, chunk, eager, float(scale),
                                            None if softcap is None else float(softcap))
    if num_items_in_batch is not None:
        denom = num_items_in_batch
        if isinstance(denom, torch.Tensor):
            denom = denom.to(total.device)
        return total / denom
    return total / keep.numel()    # no target at all: 0/0 = nan, as the plain mean gives
