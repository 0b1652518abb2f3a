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


# fp32 scratch per moment of the pure-torch 8-bit path: 64 Ki elements (2 x 256 KiB), whole quantization blocks
_CHUNK = 1 << 16


def adamw_8bit(p, g, qm, am, qv, av, maps, blocksize, lr, beta1, beta2, eps, weight_decay, step) -> None:
    """In-place AdamW over blockwise 8-bit state (uint8 codes ``qm``/``qv``, fp32 absmax ``am``/``av``).

    Dequantize -> update -> requantize one block at a time in the compiled op (no full-size fp32 moments; the scratch
    is a block or two per thread); without it, the same in chunks of whole blocks through the quant backend, so the
    scratch stays at ``_CHUNK`` elements per moment. Both give the bytes of dequantizing everything, one fp32 step and
    requantizing (blocks are independent).
    """
    (code_m, bounds_m), (code_v, bounds_v) = maps["signed"], maps["unsigned"]
    op = paged_op(p.device.type)
    if op is not None and hasattr(op, "adamw8bit_step"):
        op.adamw8bit_step(p, g, qm, am, qv, av, code_m, bounds_m, code_v, bounds_v, int(blocksize), float(lr),
                          float(beta1), float(beta2), float(eps), float(weight_decay), int(step))
        return
    from ..ops import load_backend

    kernels = load_backend(p.device.type)
    n = p.numel()
    chunk = max(blocksize, _CHUNK // blocksize * blocksize)
    m_buf = torch.empty(min(chunk, n), dtype=torch.float32, device=p.device)
    v_buf = torch.empty_like(m_buf)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        b0, b1 = start // blocksize, -(-stop // blocksize)
        m, v = m_buf[: stop - start], v_buf[: stop - start]
        kernels.dequantize_8bit_blockwise(qm[start:stop], am[b0:b1], code_m, blocksize, 0.0, m)
        kernels.dequantize_8bit_blockwise(qv[start:stop], av[b0:b1], code_v, blocksize, 0.0, v)
        adamw_fp32(p[start:stop], g[start:stop], m, v, lr, beta1, beta2, eps, weight_decay, step)
        kernels.quantize_8bit_blockwise(m, code_m, bounds_m, blocksize, qm[start:stop], am[b0:b1])
        kernels.quantize_8bit_blockwise(v, code_v, bounds_v, blocksize, qv[start:stop], av[b0:b1])
