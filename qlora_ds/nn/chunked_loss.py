"""LM head + cross-entropy over token chunks: the [tokens, vocab] logits never exist at once.

Forward runs the head chunk by chunk, keeps only each token's log-sum-exp (4 bytes a token) and sums the
losses; backward recomputes each chunk's logits, turns them into ``softmax - onehot`` in place and multiplies
by the head weight. Peak extra memory is one chunk of logits (``chunk_tokens × vocab``), instead of the 12 bytes
per logit of a plain fp32 log-softmax with its two gradients. The head weight gets a gradient only if it
requires one (frozen for QLoRA; a tied embedding that trains gets its head part through this Function).

Only tokens with a target (label != ignore_index) are computed at all: with a response-only loss most prompt
tokens cost nothing. The logits of a chunk are computed in the hidden states' dtype, then taken to fp32 for the
softmax, as the plain path (``lm_head`` in the compute dtype, ``logits.float()`` in the loss) does.
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100
LOGIT_BUDGET = 1 << 24      # fp32 logits per chunk (64 MiB); a chunk's backward holds about one more such buffer


def default_chunk_tokens(vocab: int) -> int:
    return max(16, LOGIT_BUDGET // max(1, vocab))


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())
    return out.float()


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum over rows of CE(h·Wᵀ + b, target), each row scaled by 1; the caller divides. Rows are pre-selected
    (every target valid). Inputs: h [n, H], weight [V, H], bias [V] | None, target [n] (long)."""

    @staticmethod
    def forward(ctx, h, weight, bias, target, chunk: int):
        lse = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, h.shape[0], chunk):
            logits = _logits(h[s:s + chunk], weight, bias)
            lse[s:s + chunk] = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, target[s:s + chunk, None]).squeeze(1)
            total += (lse[s:s + chunk] - picked).sum()
            del logits
        ctx.save_for_backward(h, weight, bias, target, lse)
        ctx.chunk = chunk
        return total

    @staticmethod
    def backward(ctx, grad_total):
        h, weight, bias, target, lse = ctx.saved_tensors
        chunk = ctx.chunk
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        g = grad_total.float()
        for s in range(0, h.shape[0], chunk):
            hc, tc = h[s:s + chunk], target[s:s + chunk]
            p = _logits(hc, weight, bias)
            p.sub_(lse[s:s + chunk, None]).exp_()                   # softmax
            p[torch.arange(p.shape[0], device=p.device), tc] -= 1.0      # - onehot(target)
            p.mul_(g)
            pc = p.to(h.dtype)
            del p
            if need_h:
                torch.mm(pc, weight.to(h.dtype), out=grad_h[s:s + chunk])
            if need_w:
                grad_w.addmm_(pc.t().float(), hc.float())
            if need_b:
                grad_b += pc.float().sum(0)
            del pc
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         labels: torch.Tensor, *, shift: bool = True, ignore_index: int = IGNORE_INDEX,
                         num_items_in_batch=None, chunk_tokens: int | None = None) -> torch.Tensor:
    """The causal-LM loss of ``hidden`` [B, T, H] under the head (``weight`` [V, H], ``bias``) against ``labels``
    [B, T], equal to transformers' ``ForCausalLMLoss`` on the full logits: targets shifted by one (``shift``),
    ``ignore_index`` skipped, mean over the targets (or the sum divided by ``num_items_in_batch``)."""
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden states {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree in "
                         f"(batch, tokens)")
    if shift:
        hidden, labels = hidden[..., :-1, :], labels[..., 1:]
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1).to(h.device)
    keep = (y != ignore_index).nonzero().squeeze(1)
    h, y = h.index_select(0, keep), y.index_select(0, keep)
    chunk = chunk_tokens or default_chunk_tokens(weight.shape[0])
    total = ChunkedLinearCrossEntropy.apply(h, weight, bias, y, chunk)
    if num_items_in_batch is not None:
        denom = num_items_in_batch
        if isinstance(denom, torch.Tensor):
            denom = denom.to(total.device)
        return total / denom
    return total / keep.numel()    # no target at all: 0/0 = nan, as the plain mean gives
