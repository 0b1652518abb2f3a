"""The plain frozen module a merged layer becomes: ``nn.Linear``, or transformers' ``Conv1D`` for a layer that was
one before injection (GPT-2; ``inject`` marks it ``layer.conv1d``), so a merged checkpoint has the shapes the
architecture loads."""
from __future__ import annotations

import torch
import torch.nn as nn


@torch.no_grad()
def dense_module(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, conv1d: bool = False) -> nn.Module:
    """A frozen module holding the (out, in) ``weight`` in ``dtype`` (one rounding from fp32), on ``weight``'s
    device (a model on a GPU stays there)."""
    out_f, in_f = weight.shape
    if conv1d:
        from transformers.pytorch_utils import Conv1D
        with torch.device("meta"):          # no throw-away (in, out) init on the host
            mod = Conv1D(out_f, in_f)
        mod.weight = nn.Parameter(torch.empty(in_f, out_f, dtype=dtype, device=weight.device))
        mod.bias = nn.Parameter(torch.zeros(out_f, dtype=dtype, device=weight.device))
        mod.weight.copy_(weight.t())
    else:
        mod = nn.Linear(in_f, out_f, bias=bias is not None, dtype=dtype, device=weight.device)
        mod.weight.copy_(weight)
    if bias is not None:
        mod.bias.copy_(bias)
    return mod.requires_grad_(False)
