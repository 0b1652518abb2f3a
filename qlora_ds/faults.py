"""Fault injection for reliability tests: ``QLORA_DS_FAULT=point:step[:rank]`` makes that rank fail at
that point. Points: ``kill_after_step`` / ``kill_in_save`` (SIGKILL itself), ``raise_at_step`` (an
exception), ``enospc_in_save`` (a disk-full OSError), ``nan_loss_at_micro_step`` (the loss becomes NaN),
``sigterm_at_step`` (read by ``qlora_ds.preemption``: the rank sends itself SIGTERM).
Unset (the normal case) it costs one dict lookup per call."""
from __future__ import annotations

import errno
import os
import signal


def _spec() -> tuple[str, int, int | None] | None:
    raw = os.environ.get("QLORA_DS_FAULT")
    if not raw:
        return None
    parts = raw.split(":")
    return parts[0], int(parts[1]), int(parts[2]) if len(parts) > 2 else None


def triggered(point: str, step: int) -> bool:
    spec = _spec()
    if spec is None or spec[0] != point or spec[1] != step:
        return False
    rank = int(os.environ.get("RANK", "0"))
    return spec[2] is None or spec[2] == rank


def inject(point: str, step: int) -> None:
    """Act on a kill/raise/enospc fault planted for ``point`` at ``step`` (no-op otherwise)."""
    if not triggered(point, step):
        return
    if point.startswith("kill"):
        os.kill(os.getpid(), signal.SIGKILL)
    if point.startswith("enospc"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    raise RuntimeError(f"injected fault {point} at step {step}")
