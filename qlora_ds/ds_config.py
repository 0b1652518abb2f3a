"""The DeepSpeed config of a finetune: the ds_config file with the command line (or recipe) folded in. Every
setting lives in one place; a value given in both that disagrees is an error naming both, before the first step."""
from __future__ import annotations

import copy
import json
import os

import torch

from . import hardware
from .errors import QLoRADSError
from .hardware import fold_ds_precision, resolve_device, resolve_dtype
from .monitor import fold_monitors


def read_ds_config(ds_config) -> dict:
    """A ds_config given as a dict or a JSON path, as a fresh dict (a copy: the caller may change it)."""
    if isinstance(ds_config, (str, os.PathLike)):
        try:
            with open(ds_config, encoding="utf-8") as fh:
                ds_config = json.load(fh)
        except (OSError, ValueError) as err:
            raise QLoRADSError(f"cannot read the DeepSpeed config {str(ds_config)!r} ({err}); pass a dict or a path "
                               f"to a valid JSON file") from None
    if not isinstance(ds_config, dict):
        raise QLoRADSError(f"ds_config must be a dict or a JSON path, got {type(ds_config).__name__}")
    return copy.deepcopy(ds_config)


AUTO = "auto"   # HF's ds_config placeholder: the value comes from the command line (or the default)


def check_number(key: str, value) -> None:
    """A batch key must be a positive integer; gradient_clipping a number >= 0 (0: DeepSpeed clips nothing)."""
    if key == "gradient_clipping":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
        want = "a number >= 0"
    else:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
        want = "a positive integer"
    if not ok:
        raise QLoRADSError(f"ds_config {key}={value!r} must be {want} or \"auto\" (filled from the command line or "
                           f"the default); fix it in the ds_config")


def check_fp16_supported(dtype: torch.dtype, device: torch.device) -> None:
    """DeepSpeed's CPU accelerator refuses fp16 unless oneDNN has native fp16 (AVX512-FP16 / AMX-FP16)."""
    if dtype != torch.float16 or device.type != "cpu":
        return
    from deepspeed.accelerator import get_accelerator

    if not get_accelerator().is_fp16_supported():
        native_bf16 = hardware.auto_dtype(hardware.device_facts(device))[0] == torch.bfloat16  # else emulated
        raise QLoRADSError("--dtype fp16 on this CPU: DeepSpeed trains fp16 on a CPU only where oneDNN computes "
                           "fp16 natively (AVX512-FP16 / AMX-FP16); use "
                           + ("--dtype auto (bf16 here), bf16 or fp32" if native_bf16 else
                              "--dtype auto (fp32 here) or fp32") + " on this CPU")


def fold_batch(total: int | None, micro: int | None, accum: int | None, world: int) -> tuple[int, int]:
    """(micro batch, accumulation) from what was set, as DeepSpeed derives them: train_batch_size with one of the
    two gives the other; with neither, the micro batch is 1 (our default; DeepSpeed would take train_batch_size /
    world with accumulation 1: the same batch in more memory). Without train_batch_size: micro 1, accum 16.
    Errors name only the values that were set."""
    if total is None:
        return micro or 1, accum or 16
    if micro is not None and accum is not None:
        if micro * accum * world != total:
            raise QLoRADSError(f"ds_config train_batch_size={total} but micro batch {micro} × gradient accumulation "
                               f"{accum} × {world} ranks = {micro * accum * world}; fix one of them")
        return micro, accum
    if micro is None and accum is None:
        if total % world:
            raise QLoRADSError(f"ds_config train_batch_size={total} is not a multiple of the {world} ranks; make it "
                               f"one, or set the micro batch and gradient accumulation instead")
        return 1, total // world
    known, name, other = ((micro, "micro batch", "gradient accumulation") if micro is not None else
                          (accum, "gradient accumulation", "micro batch"))
    if total % (known * world):
        raise QLoRADSError(f"ds_config train_batch_size={total} is not a multiple of {name} {known} × {world} ranks "
                           f"= {known * world}, so no whole {other} fits; change one of them, or set the {other} too")
    derived = total // (known * world)
    return (micro, derived) if micro is not None else (derived, accum)


def check_offload_param(cfg: dict) -> None:
    """DeepSpeed reads offload_param below stage 3 without a word and keeps the parameters on the device: a run
    that counted on it would find out by running out of memory after the model load, so refuse it now."""
    zero = cfg.get("zero_optimization") or {}
    device = (zero.get("offload_param") or {}).get("device", "none")
    stage = zero.get("stage", 0)
    if device not in (None, "none") and isinstance(stage, int) and stage < 3:
        raise QLoRADSError(f"ds_config zero_optimization.offload_param (device {device!r}) needs ZeRO stage 3; "
                           f"stage {stage} keeps the parameters on the device and DeepSpeed ignores it. Use "
                           f"offload_optimizer, stage 3, or remove offload_param")


def check_checkpoint_engine(cfg: dict, device: torch.device) -> None:
    """Each checkpoint file is signed as it is written (qlora_ds.checkpointing), so the save must have written it
    when DeepSpeed's ``save`` returns. Refused before the first step, as DeepSpeed picks its engine: the
    ``checkpoint.writer`` section first (decoupled: written by a background process later; type "mock": counts
    bytes, writes empty files), else ``datastates_ckpt`` (asynchronous). So are writers DeepSpeed would fail to
    build inside ``deepspeed.initialize``, after the model load."""
    section = cfg.get("checkpoint")
    writer = section.get("writer") if isinstance(section, dict) else None
    if writer is not None:
        if not isinstance(writer, dict):
            raise QLoRADSError(f"ds_config checkpoint.writer={writer!r} must be an object such as "
                               f"{{\"type\": \"python\"}}; fix it or remove it (DeepSpeed's torch.save writer)")
        if writer.get("decoupled"):
            raise QLoRADSError(f"ds_config checkpoint.writer.decoupled={writer['decoupled']!r}: DeepSpeed then writes "
                               f"each checkpoint file in a background process after the save returns, so qlora-ds "
                               f"cannot sign its bytes and --resume would refuse (or never find) the checkpoint. "
                               f"Remove \"decoupled\" from checkpoint.writer (or set it to false)")
        if str(writer.get("type", "fast")).upper() == "MOCK":
            raise QLoRADSError("ds_config checkpoint.writer.type=\"mock\" writes empty files (DeepSpeed's I/O "
                               "benchmark writer): no checkpoint could be resumed. Use \"type\": \"python\" or "
                               "\"fast\", or remove checkpoint.writer (DeepSpeed's torch.save writer)")
        if str(writer.get("type", "fast")).upper() == "FAST" and device.type == "cpu":
            raise QLoRADSError("ds_config checkpoint.writer.type \"fast\" (DeepSpeed's default writer type) needs an "
                               "accelerator (pinned buffers, DeepNVMe/libaio); on a CPU it fails inside "
                               "deepspeed.initialize. Use \"type\": \"python\" on a CPU")
        stage = (cfg.get("zero_optimization") or {}).get("stage", 0)
        if writer.get("data_parallel") is None and isinstance(stage, int) and stage < 3:
            raise QLoRADSError(f"ds_config checkpoint.writer without \"data_parallel\" at ZeRO stage {stage}: "
                               f"DeepSpeed fails to build the writer (AttributeError: 'UniversalParallelInfo' object "
                               f"has no attribute 'dp_rank'). Add \"data_parallel\": \"replica\" to checkpoint.writer")
        unset = [name for name in ("CROSS_SIZE", "CROSS_RANK") if name not in os.environ]
        if unset:
            raise QLoRADSError(f"ds_config checkpoint.writer: DeepSpeed reads the number of nodes and this node's "
                               f"index from {' and '.join(unset)}, which only its `deepspeed` launcher sets. Launch "
                               f"with `deepspeed`, or export CROSS_SIZE=<nodes> CROSS_RANK=<node index> (1 and 0 on "
                               f"one machine)")
    elif "datastates_ckpt" in cfg and cfg["datastates_ckpt"] is not False:   # DeepSpeed's test: anything but false
        raise QLoRADSError("ds_config datastates_ckpt: DeepSpeed's DataStates engine writes checkpoints "
                           "asynchronously, after the save returns, so qlora-ds cannot sign their bytes and "
                           "--resume would refuse them. Remove datastates_ckpt (or set it to false); for faster "
                           "synchronous saves use checkpoint.writer {\"type\": \"fast\", \"data_parallel\": "
                           "\"replica\"}")


def resolve_ds_config(args, world: int, device: torch.device | None = None) -> dict:
    """The ds_config with the command line folded in; any disagreement is an error, not a silent override.
    Its bf16/fp16 sections follow ``--dtype`` resolved for ``device`` (default: this rank's training device)."""
    cfg = read_ds_config(args.ds_config) if args.ds_config else {}
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}

    def given(key: str):
        """The ds_config's value of ``key``; None when absent or "auto" (HF's placeholder, read here as the HF Trainer
        integration reads it: the command line or the default decides)."""
        if cfg.get(key, AUTO) == AUTO:
            cfg.pop(key, None)
            return None
        check_number(key, cfg[key])
        return cfg[key]

    def merge(key: str, cli, default):
        ours = given(key)
        if cli is not None and ours is not None and ours != cli:
            raise QLoRADSError(f"ds_config {key}={ours} conflicts with the command line ({cli}); "
                               f"set it in one place only")
        cfg[key] = cli if cli is not None else default if ours is None else ours
        return cfg[key]

    micro = merge("train_micro_batch_size_per_gpu", args.micro_batch, None)
    accum = merge("gradient_accumulation_steps", args.grad_accum, None)
    micro, accum = fold_batch(given("train_batch_size"), micro, accum, world)
    cfg.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum,
               train_batch_size=micro * accum * world)
    merge("gradient_clipping", args.max_grad_norm, 0.3)
    fold_optimizer(cfg, args)
    device = resolve_device("auto") if device is None else torch.device(device)
    dtype = resolve_dtype(args.dtype, device)
    fold_ds_precision(cfg, dtype, args.dtype)
    check_fp16_supported(dtype, device)
    check_offload_param(cfg)
    check_checkpoint_engine(cfg, device)
    fold_monitors(cfg, getattr(args, "output_dir", None))
    cfg.setdefault("steps_per_print", 10 ** 9)  # progress is ours (tqdm)
    cfg.setdefault("wall_clock_breakdown", False)
    return cfg


OPTIMIZER_DEFAULTS = {"optimizer": "PagedAdamW", "lr": 2e-4, "adam_beta2": 0.999, "weight_decay": 0.0}


def fold_optimizer(cfg: dict, args) -> None:
    """``--optimizer/--lr/--adam-beta2/--weight-decay`` and the ds_config's ``optimizer`` section made one: a flag
    given (on the command line or in the recipe) must agree with the section, else an error naming both; what is
    missing on one side comes from the other (then the defaults). ``args`` is set to what will run, so
    run_config.json records it."""
    section = cfg.get("optimizer")
    if section is not None and not (isinstance(section, dict) and isinstance(section.get("type"), str)):
        raise QLoRADSError(f"ds_config optimizer={section!r} must be an object with a \"type\" and \"params\"")
    # HF's "auto" (the Trainer fills it) reads as absent: the command line or the default gives the value
    params = {k: v for k, v in ((section or {}).get("params") or {}).items() if v != AUTO}
    betas = params.get("betas")
    theirs = {"optimizer": (section or {}).get("type"), "lr": params.get("lr"),
              "adam_beta2": betas[1] if isinstance(betas, (list, tuple)) and len(betas) == 2 else None,
              "weight_decay": params.get("weight_decay")}
    same = lambda key, a, b: a.lower() == b.lower() if key == "optimizer" else float(a) == float(b)  # noqa: E731
    bad = [f"--{k.replace('_', '-')} {getattr(args, k)} vs ds_config {v}" for k, v in theirs.items()
           if getattr(args, k) is not None and v is not None and not same(k, getattr(args, k), v)]
    if bad:
        raise QLoRADSError(f"the command line (or recipe) and the ds_config's optimizer section disagree "
                           f"({'; '.join(bad)}); set each in one place only")
    for key, default in OPTIMIZER_DEFAULTS.items():
        value = theirs[key] if theirs[key] is not None else getattr(args, key)
        setattr(args, key, default if value is None else value)
    params.update(lr=args.lr, betas=[betas[0] if theirs["adam_beta2"] is not None else 0.9, args.adam_beta2],
                  weight_decay=args.weight_decay)
    params.setdefault("eps", 1e-8)
    cfg["optimizer"] = {**(section or {}), "type": args.optimizer, "params": params}
