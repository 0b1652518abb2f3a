"""AdamW with paged and/or blockwise 8-bit state: ``PagedAdamW``, ``PagedAdamW8bit``, ``AdamW8bit``.

Hyper-parameters and update are torch.optim.AdamW's (decoupled weight decay, bias correction); 32-bit state
gives torch's results to fp32 rounding. 8-bit state follows bitsandbytes 0.50's rules: exp_avg in the signed
dynamic map, exp_avg_sq in the unsigned dynamic map, blockwise absmax (block 256, bnb 0.50's optimizer block;
older bnb used 2048 — ``blocksize`` sets it), and tensors under ``min_8bit_size`` (4096) elements keep fp32 state.
Each step dequantizes a tensor's state, runs the fp32 AdamW update and requantizes (exact nearest code), fused
per quantization block (``_op.adamw_8bit``): no fp32 copy of the moments is ever materialised.

State buffers come from the instance's :class:`PageManager` (paged = CUDA unified memory). ``state_dict()`` holds
plain CPU tensors plus a ``qlora_ds`` tag; ``load_state_dict`` checks type, layout and shapes before touching
anything, so a rejected load leaves the optimizer as it was.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from .. import codebooks
from ..codebooks import udynamic_code
from ._op import adamw_8bit, adamw_fp32
from .page_manager import PageManager

__all__ = ["PagedAdamW", "PagedAdamW8bit", "AdamW8bit", "udynamic_code"]

_FORMAT_VERSION = 1


def _maps(device: torch.device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(code, midpoints) of the signed and unsigned dynamic maps on ``device`` (cached per device in codebooks)."""
    return {"signed": (codebooks.dynamic_code(device), codebooks.dynamic_bounds(device)),
            "unsigned": (codebooks.udynamic_code(device), codebooks.udynamic_bounds(device))}


def _check_hparams(lr, betas, eps, weight_decay) -> None:
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
    try:
        b1, b2 = betas
    except (TypeError, ValueError):
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}") from None
    for name, b in (("beta1", b1), ("beta2", b2)):
        if not isinstance(b, (int, float)) or not 0.0 <= b < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {b!r} (betas={betas!r})")
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if not isinstance(weight_decay, (int, float)) or not math.isfinite(weight_decay) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")


class _AdamWBase(torch.optim.Optimizer):
    """Shared machinery; subclasses fix ``PAGED`` and ``OPTIM_BITS``."""

    PAGED = True
    OPTIM_BITS = 32

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, blocksize: int = 256, min_8bit_size: int = 4096):
        _check_hparams(lr, betas, eps, weight_decay)
        if self.OPTIM_BITS == 8:
            if not isinstance(blocksize, int) or not 64 <= blocksize <= 4096 or blocksize & (blocksize - 1):
                raise ValueError(f"blocksize must be a power of two from 64 to 4096 (bnb's range), got {blocksize!r}")
            if not isinstance(min_8bit_size, int) or min_8bit_size < 0:
                raise ValueError(f"min_8bit_size must be an int >= 0, got {min_8bit_size!r}")
        self.blocksize = blocksize
        self.min_8bit_size = min_8bit_size
        self._pages = PageManager(paged=self.PAGED)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)

    # -- torch.optim.Optimizer protocol -------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        merged = {**self.defaults, **param_group}
        _check_hparams(merged["lr"], merged["betas"], merged["eps"], merged["weight_decay"])
        super().add_param_group(param_group)

    @property
    def page_manager(self) -> PageManager:
        return self._pages

    def _uses_8bit(self, numel: int) -> bool:
        return self.OPTIM_BITS == 8 and numel >= self.min_8bit_size

    def _layout(self, p: torch.Tensor) -> dict[str, tuple[int, torch.dtype]]:
        """The state tensors of ``p``: name -> (numel, dtype)."""
        n = p.numel()
        if self._uses_8bit(n):
            blocks = -(-n // self.blocksize)
            return {"exp_avg": (n, torch.uint8), "exp_avg_absmax": (blocks, torch.float32),
                    "exp_avg_sq": (n, torch.uint8), "exp_avg_sq_absmax": (blocks, torch.float32)}
        return {"exp_avg": (n, torch.float32), "exp_avg_sq": (n, torch.float32)}

    def _new_state(self, p: torch.Tensor) -> dict[str, Any]:
        state: dict[str, Any] = {"step": 0}
        for key, (numel, dtype) in self._layout(p).items():
            state[key] = self._pages.zeros(numel, dtype, p.device)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._pages.prefetch_to_device()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state.update(self._new_state(p))
                state["step"] += 1
                self._update(p, p.grad, state, group["lr"], beta1, beta2, group["eps"], group["weight_decay"],
                             state["step"])
        return loss

    def _update(self, p, grad, state, lr, beta1, beta2, eps, wd, step) -> None:
        exact = p.dtype == torch.float32 and p.is_contiguous()
        p32 = p if exact else p.detach().float().contiguous()
        g32 = grad.detach().reshape(-1) if grad.dtype == torch.float32 else grad.detach().float().reshape(-1)
        g32 = g32.contiguous()
        flat = p32.view(-1)
        if "exp_avg_absmax" in state:
            adamw_8bit(flat, g32, state["exp_avg"], state["exp_avg_absmax"], state["exp_avg_sq"],
                       state["exp_avg_sq_absmax"], _maps(p.device), self.blocksize, lr, beta1, beta2, eps, wd, step)
        else:
            adamw_fp32(flat, g32, state["exp_avg"], state["exp_avg_sq"], lr, beta1, beta2, eps, wd, step)
        if not exact:
            p.copy_(p32.view_as(p))

    # -- state dicts --------------------------------------------------------------------------------------------
    def _tag(self) -> dict[str, Any]:
        return {"optimizer": type(self).__name__, "version": _FORMAT_VERSION, "optim_bits": self.OPTIM_BITS,
                "blocksize": self.blocksize, "min_8bit_size": self.min_8bit_size}

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["state"] = {k: {n: (t.detach().to("cpu", copy=True) if torch.is_tensor(t) else t) for n, t in s.items()}
                       for k, s in sd["state"].items()}
        sd["qlora_ds"] = self._tag()
        return sd

    def _validate_state_dict(self, sd: Any) -> list[torch.Tensor]:
        name = type(self).__name__
        if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
            raise ValueError(f"{name}.load_state_dict expects an optimizer state dict with 'state' and "
                             f"'param_groups', got {type(sd).__name__}")
        tag = sd.get("qlora_ds")
        if not isinstance(tag, dict):
            raise ValueError(f"this state dict was not written by a qlora_ds optimizer (no 'qlora_ds' tag; a "
                             f"torch.optim or bitsandbytes state dict?); load it into the optimizer that saved it")
        if tag.get("optimizer") != name:
            raise ValueError(f"state dict is from {tag.get('optimizer')!r}, cannot load it into {name}; "
                             f"create a {tag.get('optimizer')} instead")
        if tag.get("version") != _FORMAT_VERSION:
            raise ValueError(f"state dict format version {tag.get('version')!r} is not {_FORMAT_VERSION}")
        for key in ("blocksize", "min_8bit_size"):
            if self.OPTIM_BITS == 8 and tag.get(key) != getattr(self, key):
                raise ValueError(f"state dict has {key}={tag.get(key)!r} but this optimizer has "
                                 f"{key}={getattr(self, key)!r}; construct it with the saved value")
        groups = sd["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"state dict has {len(groups)} parameter groups, this optimizer has "
                             f"{len(self.param_groups)}")
        params: list[torch.Tensor] = []
        for i, (g, mine) in enumerate(zip(groups, self.param_groups)):
            if len(g["params"]) != len(mine["params"]):
                raise ValueError(f"parameter group {i}: state dict has {len(g['params'])} parameters, this "
                                 f"optimizer has {len(mine['params'])}")
            _check_hparams(g.get("lr"), g.get("betas"), g.get("eps"), g.get("weight_decay"))
            params += list(zip(g["params"], mine["params"]))
        return params

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pairs = self._validate_state_dict(state_dict)
        saved_state = state_dict["state"]
        new_state: dict[torch.Tensor, dict[str, Any]] = {}
        for index, p in pairs:
            if index not in saved_state:
                continue
            s = saved_state[index]
            layout = self._layout(p)
            keys = set(s) - {"step"}
            if keys != set(layout):
                raise ValueError(f"state of parameter {index} (shape {tuple(p.shape)}) has entries {sorted(keys)}, "
                                 f"expected {sorted(layout)}: saved for another parameter or optimizer config")
            step = s.get("step")
            step = int(step.item()) if torch.is_tensor(step) else step
            if not isinstance(step, int) or step < 0:
                raise ValueError(f"state of parameter {index}: bad step {s.get('step')!r}")
            for key, (numel, dtype) in layout.items():
                t = s[key]
                if not torch.is_tensor(t) or t.numel() != numel or t.dtype != dtype:
                    got = f"{t.dtype} with {t.numel()} elements" if torch.is_tensor(t) else type(t).__name__
                    raise ValueError(f"state {key!r} of parameter {index} (shape {tuple(p.shape)}) is {got}, "
                                     f"expected {dtype} with {numel} elements: the parameter shapes differ")
        # everything checked: build the new state, then swap it in
        old = [t for s in self.state.values() for t in s.values() if torch.is_tensor(t)]
        try:
            for index, p in pairs:
                if index in saved_state:
                    s = saved_state[index]
                    fresh = self._new_state(p)
                    new_state[p] = fresh
                    for key in self._layout(p):
                        fresh[key].copy_(s[key].reshape(-1))
                    step = s["step"]
                    fresh["step"] = int(step.item()) if torch.is_tensor(step) else int(step)
            groups = [dict(g) for g in state_dict["param_groups"]]
            super().load_state_dict({"state": {}, "param_groups": groups})
        except Exception:
            self._pages.release(*[t for s in new_state.values() for t in s.values() if torch.is_tensor(t)])
            raise
        self._pages.release(*old)
        self.state.clear()
        for p, s in new_state.items():
            self.state[p] = s

    def free(self) -> None:
        """Drop all state (and its paged memory); the next step starts fresh."""
        self.state.clear()
        self._pages.free()


class PagedAdamW(_AdamWBase):
    """AdamW, 32-bit state in paged (CUDA unified) memory."""

    PAGED, OPTIM_BITS = True, 32


class PagedAdamW8bit(_AdamWBase):
    """AdamW, blockwise 8-bit state (bnb rules) in paged memory."""

    PAGED, OPTIM_BITS = True, 8


class AdamW8bit(_AdamWBase):
    """AdamW, blockwise 8-bit state (bnb rules) in ordinary memory."""

    PAGED, OPTIM_BITS = False, 8
