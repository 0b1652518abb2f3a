"""The learning-rate schedule of a finetune: linear warmup, then constant (the QLoRA recipe), linear or cosine decay
to zero at ``--max-steps``; or the ds_config's own ``scheduler`` section, which DeepSpeed builds, with its "auto"
values filled from the command line. Given both ways, a schedule is an error naming both."""
from __future__ import annotations

import math

from .errors import QLoRADSError

SCHEDULES = ("constant", "linear", "cosine")
DEFAULT = "constant"


def lr_factor(kind: str, warmup: int, total: int):
    """The multiplier of the peak lr at each optimizer step (0-based), for ``torch.optim.lr_scheduler.LambdaLR``.
    Warmup: (step + 1) / warmup over the first ``warmup`` steps (step 0 already trains); then 1 (constant), or
    falling to 0 at step ``total`` linearly or along a half cosine."""
    if kind not in SCHEDULES:
        raise QLoRADSError(f"unknown lr schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")
    warmup, total = max(1, warmup), max(1, total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


# what each "auto" of a DeepSpeed scheduler's params becomes (the warmup counts optimizer steps, as ours)
def _auto_values(args, warmup: int) -> dict:
    return {"warmup_num_steps": warmup, "total_num_steps": args.max_steps, "warmup_max_lr": args.lr,
            "warmup_min_lr": 0.0, "warmup_min_ratio": 0.0, "cos_min_ratio": 0.0}


def schedule_name(cfg: dict, args) -> str:
    """Settle which schedule runs: ``--lr-scheduler`` (default constant) or the ds_config's ``scheduler`` section
    ("ds_config:<type>"), never both. Sets ``args.lr_scheduler`` to it, so run_config.json records it and --resume
    compares it."""
    section = cfg.get("scheduler")
    if section is None:
        args.lr_scheduler = args.lr_scheduler or DEFAULT
        return args.lr_scheduler
    if not (isinstance(section, dict) and isinstance(section.get("type"), str)):
        raise QLoRADSError(f"ds_config scheduler={section!r} must be an object with a \"type\" and \"params\"")
    if args.lr_scheduler and args.lr_scheduler != f"ds_config:{section['type']}":
        raise QLoRADSError(f"--lr-scheduler {args.lr_scheduler} and the ds_config's scheduler section "
                           f"({section['type']}) both set the schedule; keep one of them")
    args.lr_scheduler = f"ds_config:{section['type']}"
    return args.lr_scheduler


def fill_scheduler_section(cfg: dict, args, warmup: int) -> None:
    """The ds_config's scheduler section (if any) with each "auto" filled from the run: warmup steps, --max-steps,
    the optimizer's lr; an explicit ``warmup_max_lr`` must equal that lr."""
    section = cfg.get("scheduler")
    if section is None:
        return
    params = dict(section.get("params") or {})
    auto = _auto_values(args, warmup)
    for key, value in params.items():
        if value == "auto":
            if key not in auto:
                raise QLoRADSError(f"ds_config scheduler {section['type']}: \"auto\" is not supported for {key}; "
                                   f"give a value")
            params[key] = auto[key]
    peak = params.get("warmup_max_lr")
    if peak is not None and float(peak) != float(args.lr):
        raise QLoRADSError(f"ds_config scheduler warmup_max_lr={peak} but the optimizer's lr is {args.lr}; set the "
                           f"peak lr in one place (\"auto\" takes the optimizer's)")
    cfg["scheduler"] = {**section, "params": params}


def resync_after_resume(scheduler) -> None:
    """After a checkpoint load: give the optimizer the lr this run's schedule sets for the next step, and
    ``get_last_lr()`` (the lr the loop logs) that lr. The loaded optimizer state carries the lr of the first run's
    schedule, which differs once ``--max-steps`` grew (linear and cosine decay to 0 at it): the first resumed step
    would train at the old schedule's lr (0 at its old end). DeepSpeed's schedulers (a ds_config ``scheduler``
    section) restore only their iteration, and their last lr stayed the one set when they were built (0)."""
    import torch

    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        groups = scheduler.optimizer.param_groups
        for group, base, factor in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * factor(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in groups]
    elif hasattr(scheduler, "last_batch_iteration"):
        # DeepSpeed's step(i) sets the param groups' lr and the last lr to iteration i's under this run's params
        scheduler.step(scheduler.last_batch_iteration)
