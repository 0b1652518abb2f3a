"""Skipped steps under DeepSpeed fp16 loss scaling: report them, name the module, stop when they persist.

A skipped step on overflow is normal under dynamic loss scaling (DeepSpeed halves the scale and goes on), so
:class:`OverflowMonitor` never raises for one. ``step()`` calls ``engine.step()``; at a gradient-accumulation
boundary it reads the fp16 watch (``qlora_ds.nn.guards``, one host sync, none when no fp16 layer ran) and, when
DeepSpeed skipped the step, returns (and logs on rank 0) a report: the skipped-step count, the loss scale before
and after, and the first module where a value went non-finite on any rank (what DeepSpeed's own message lacks).

It raises :class:`~qlora_ds.errors.NonFiniteError` naming that module when the overflow persists at the minimum
loss scale: DeepSpeed's ZeRO optimizers raise a bare ``Exception`` there (converted here); ZeRO-0's fp16 wrapper
would skip every step silently, so two consecutive skipped steps at the minimum scale count as persistent.
"""
from __future__ import annotations

import logging

from .errors import NonFiniteError
from .nn import guards

log = logging.getLogger(__name__)
_DS_AT_MIN = "loss scale already at minimum"


def loss_scale(engine) -> float | None:
    """The fp16 loss scale of DeepSpeed's optimizer wrapper (None without fp16)."""
    if not engine.fp16_enabled():
        return None
    opt = engine.optimizer
    scale = getattr(opt, "cur_scale", None) or getattr(opt, "loss_scale", None)
    return float(scale) if scale is not None else None


def min_loss_scale(engine) -> float | None:
    """The dynamic loss scale's floor (None for a static scale or without fp16)."""
    if not (engine.fp16_enabled() and engine.dynamic_loss_scale()):
        return None
    return float(engine.dynamic_loss_scale_args()["min_scale"])


def _first_on_any_rank(found: guards.Overflow | None) -> tuple[int, guards.Overflow] | None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return (0, found) if found else None
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, found and (found.module, found.what))   # only on a skipped step
    for rank, item in enumerate(every):
        if item:
            return rank, guards.Overflow(*item)
    return None


class OverflowMonitor:
    """``engine.step()`` with skipped-step reports (see the module doc). One per engine."""

    def __init__(self, engine, patience: int = 2):
        self.engine, self.patience = engine, patience
        self.at_min = 0                       # consecutive skipped steps at the minimum scale

    def step(self) -> dict | None:
        """Step; None unless DeepSpeed skipped the optimizer step, then the report (also logged on rank 0)."""
        engine = self.engine
        boundary = engine.is_gradient_accumulation_boundary()
        before, scale = engine.skipped_steps, loss_scale(engine)
        try:
            engine.step()
        except Exception as err:              # noqa: BLE001 - DeepSpeed's is a bare Exception
            if _DS_AT_MIN not in str(err):
                raise
            raise self._persistent(scale, _first_on_any_rank(guards.take_overflow())) from err
        if not boundary:
            return None
        found = guards.take_overflow()
        if engine.skipped_steps == before:
            self.at_min = 0
            return None
        where = _first_on_any_rank(found)
        floor = min_loss_scale(engine)
        self.at_min = self.at_min + 1 if floor is not None and scale is not None and scale <= floor else 0
        if self.at_min >= self.patience:
            raise self._persistent(scale, where)
        report = {"skipped_steps": int(engine.skipped_steps), "loss_scale_before": scale,
                  "loss_scale": loss_scale(engine),
                  "overflow_module": where[1].module if where else None,
                  "overflow_at": where[1].what if where else None, "overflow_rank": where[0] if where else None}
        if _rank() == 0:
            log.warning("step skipped on overflow (loss scale %s -> %s; %d skipped so far): %s", scale,
                        report["loss_scale"], report["skipped_steps"], _describe(where))
        return report

    def _persistent(self, scale, where) -> NonFiniteError:
        text = (f"the gradients overflow even at the minimum fp16 loss scale ({scale}): training cannot go on. "
                f"{_describe(where)}. Use bf16 where the device has it, lower the learning rate, or resume from an "
                f"earlier checkpoint")
        return NonFiniteError(text, module=where[1].module if where else "", what=where[1].what if where else "")


def _describe(where) -> str:
    if where is None:
        return ("no quantized layer saw a non-finite activation or gradient, so a parameter gradient overflowed "
                "(its sum over tokens)")
    rank, found = where
    return f"{found.describe()} (rank {rank})"


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
