"""The compiled paged-optimizer op per device, loaded once, with a pure-torch fallback (one warning per device)."""
from __future__ import annotations

import math
import os
import threading
import warnings

import torch

from ..errors import OpBuildError

_ops: dict[str, object | None] = {}
_lock = threading.Lock()


def paged_op(device_type: str):
    """The compiled ``paged_optim`` module for ``device_type`` ('cpu' | 'cuda'), or None (use :func:`torch_adamw`).

    ``QLORA_DS_BACKEND=torch`` forces None. A failed build warns once per device and is not retried.
    """
    if os.environ.get("QLORA_DS_BACKEND") == "torch" or device_type not in ("cpu", "cuda"):
        return None
    with _lock:
        if device_type not in _ops:
            try:
                from ..ops.builder import load_op

                _ops[device_type] = load_op("paged_optim", device_type)
            except (OpBuildError, RuntimeError, ImportError, OSError) as err:  # builder.OpBuildError is a RuntimeError
                warnings.warn(
                    f"qlora_ds: the compiled {device_type} paged_optim op is unavailable; the optimizers use the "
                    f"pure-torch AdamW update instead (same results, slower).\n{err}", RuntimeWarning, stacklevel=3)
                _ops[device_type] = None
        return _ops[device_type]


@torch.no_grad()
def torch_adamw(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, lr: float, beta1: float,
                beta2: float, eps: float, weight_decay: float, step: int) -> None:
    """torch.optim.AdamW's single-tensor update, op for op (the fallback and the oracle of the kernels)."""
    if weight_decay != 0:
        p.mul_(1 - lr * weight_decay)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias_correction1 = 1 - beta1 ** float(step)
    bias_correction2_sqrt = math.sqrt(1 - beta2 ** float(step))
    denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
    p.addcdiv_(m, denom, value=-(lr / bias_correction1))


def adamw_fp32(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step) -> None:
    """In-place AdamW on contiguous fp32 tensors of one device, by the compiled op when there is one."""
    op = paged_op(p.device.type)
    if op is None:
        torch_adamw(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step)
    else:
        op.adamw_step(p, g, m, v, float(lr), float(beta1), float(beta2), float(eps), float(weight_decay), int(step))
