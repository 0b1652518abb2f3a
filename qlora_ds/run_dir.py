"""What a finetune's --output-dir records about its run, and whether ``--resume`` may continue it.

``run_config.json`` holds the arguments, the settings resolved from the ds_config (recorded by path only, and that
file may change) and the LR warmup; ``sample_before.json`` the answer to --sample-prompt before training.
``launch/finetune.py`` writes and checks them, and ``restore`` loads the checkpoint a resumed run continues from;
``qlora_ds.eval.runs`` reads ``run_config.json``.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil

from .atomic import atomic_write_text
from .errors import QLoRADSError

log = logging.getLogger(__name__)
RUN_CONFIG = "run_config.json"
CKPT_DIR = "checkpoints"
BEFORE_SAMPLE = "sample_before.json"
# options added later, and the behaviour of runs started before them (resume those with that value)
BEFORE_OPTION_EXISTED = {"pad_to_multiple_of": 1, "dtype": "bf16", "packing": False, "init_adapter": None,
                         "lr_scheduler": "constant", "loss_weighting": "micro-batch",
                         "dedup": False, "plain_bos": False, "text_windows": False, "heldout_groups": False,
                         "weight0_untrained": False, "quantize_experts": False,
                         "lora_experts": False}
# arguments that may differ between a run and its resumption
# (chunked: the same loss, computed leaner; a recipe's values are compared one by one as the arguments they set;
# nan_policy acts only once a loss is non-finite: a run stopped by one resumes with skip; output_dir: the run itself,
# however it is spelled or wherever it was moved)
RESUMABLE_CHANGES = {"resume", "max_steps", "epochs", "save_every", "eval_every", "sample_prompt", "overwrite",
                     "local_rank", "log_every", "keep_checkpoints", "chunked_loss", "deepspeed", "recipe", "nan_policy",
                     "output_dir"}
# arguments that name files: recorded absolute (evaluate/generate --run from any directory), compared on --resume by
# the file they name (runs/x/, ./runs/x and its absolute path are one); a packaged corpus's name stays a name
PATH_ARGUMENTS = ("model", "dataset", "init_adapter", "ds_config", "output_dir")
PACKAGED_NAMES = {"dataset": "chatterbot", "model": "smollm2"}
NOT_ARGUMENTS = {"resolved", "warmup_steps", "dataset_sha256"}      # recorded beside the arguments
# where each resolved setting comes from, for the error that names it
RESOLVED_FROM = {"micro_batch_per_rank": "--micro-batch / ds_config train_micro_batch_size_per_gpu",
                 "grad_accum": "--grad-accum / ds_config gradient_accumulation_steps",
                 "gradient_clipping": "--max-grad-norm / ds_config gradient_clipping",
                 "zero_stage": "ds_config zero_optimization.stage", "world_size": "the number of ranks launched",
                 "optimizer": "ds_config optimizer section"}


def resolved_settings(ds_config: dict, world: int) -> dict:
    """What runs, whether the ds_config or the command line set it. A resumed run must share these: its data
    continues at the saved micro step, which another micro batch or world size maps to other examples."""
    return {"micro_batch_per_rank": ds_config["train_micro_batch_size_per_gpu"],
            "grad_accum": ds_config["gradient_accumulation_steps"], "gradient_clipping": ds_config["gradient_clipping"],
            "zero_stage": ds_config.get("zero_optimization", {}).get("stage", 0), "world_size": world,
            "optimizer": ds_config.get("optimizer")}


def check_output_dir(args, rank: int, resolved: dict | None = None) -> str | None:
    """None for a fresh run, or the checkpoint tag to resume from. Never overwrites another run silently.
    ``resolved``: this launch's resolved_settings, which a resumed run must share with its first run."""
    out = args.output_dir
    meta_path = os.path.join(out, RUN_CONFIG)
    mine = {k: v for k, v in vars(args).items() if k not in RESUMABLE_CHANGES}
    if os.path.exists(meta_path) and args.overwrite and not args.resume:
        pass            # replaced by start_output_dir, once the new run's model and data have loaded
    elif os.path.exists(meta_path):
        with open(meta_path, encoding="utf-8") as fh:
            recorded = json.load(fh)
        theirs = {k: v for k, v in recorded.items() if k not in RESUMABLE_CHANGES | NOT_ARGUMENTS}
        for k, v in BEFORE_OPTION_EXISTED.items():   # a run from an older qlora-ds ran with the old behaviour
            theirs.setdefault(k, v)
        if args.resume:
            diff = sorted(k for k in set(mine) | set(theirs)
                          if _named(k, mine.get(k), os.path.realpath) != _named(k, theirs.get(k), os.path.realpath))
            if diff:
                older = [f"{k}={v}" for k, v in BEFORE_OPTION_EXISTED.items() if k in diff and k not in recorded]
                hint = f" (it is from before an option: it ran with {', '.join(older)})" if older else ""
                raise QLoRADSError(f"--resume: {out} was started with different settings ({diff}){hint}; resume with "
                                   f"the same arguments or start a new --output-dir")
            digest = recorded.get("dataset_sha256")
            if digest is not None and digest != dataset_digest(args.dataset):
                raise QLoRADSError(f"--resume: the dataset {args.dataset} changed since {out} started (sha256 "
                                   f"{digest[:12]}… then); its held-out split and example order would change, so "
                                   f"held-out examples could be trained on: resume with the original file or start a "
                                   f"new --output-dir")
            was = recorded.get("resolved") or {}
            if not was and rank == 0:
                log.info("--resume: %s is from before the resolved batch setup was recorded: not compared", out)
            diff = [f"{k} {was[k]} -> {v} ({RESOLVED_FROM[k]})" for k, v in (resolved or {}).items()
                    if k in was and was[k] != v]
            if diff:
                raise QLoRADSError(f"--resume: {out} was started with a different batch/optimizer setup "
                                   f"({'; '.join(diff)}); a resumed run continues at its saved micro step and "
                                   f"optimizer state: resume with the original ds_config, flags and number of ranks, "
                                   f"or start a new --output-dir")
        else:
            raise QLoRADSError(f"{out} holds another run ({RUN_CONFIG} present); continue it with --resume, "
                               f"choose a new --output-dir, or pass --overwrite to replace it")
    elif not args.overwrite and os.path.isdir(out) and os.listdir(out):
        raise QLoRADSError(f"{out} is not empty and holds no qlora-ds run; choose an empty --output-dir")
    from qlora_ds.checkpointing import resume_tag  # rank 0 verifies the signed manifests, all ranks get its verdict

    tag = resume_tag(os.path.join(out, CKPT_DIR)) if args.resume else None
    if args.resume and tag is None and rank == 0:
        log.info("--resume: no complete checkpoint in %s yet; starting from step 0", out)
    if tag is not None and tag[len("step"):].isdigit():   # tag_of(step); --epochs: checked again once loaded
        check_steps_left(args, int(tag[len("step"):]))
    return tag


def _named(key: str, value, resolve):
    """A path argument's value passed through ``resolve`` (abspath, realpath); None, a packaged name or any other
    argument as it is."""
    if key not in PATH_ARGUMENTS or not isinstance(value, str) or value == PACKAGED_NAMES.get(key):
        return value
    return resolve(value)


def check_steps_left(args, step: int) -> None:
    """A resumed run cannot end before its checkpoint's ``step``: the loop would not run and the run would export
    that later step's adapter as its own."""
    if args.max_steps is not None and step > args.max_steps:
        asked = (f"--epochs {args.epochs} ({args.max_steps} steps)" if args.epochs is not None
                 else f"--max-steps {args.max_steps}")
        raise QLoRADSError(f"--resume {asked}: the checkpoint of {args.output_dir} to resume is at step {step}, past "
                           f"the end; continue with --max-steps {step} or more, or start a new --output-dir (each "
                           f"kept checkpoints/step*/adapter holds the adapter at its step)")


def restore(args, engine, tag: str | None, rank: int) -> tuple[int, int]:
    """(step, micro step) to continue from: (0, 0), or checkpoint ``tag``'s (model, optimizer, loss-scaler and lr
    scheduler state), each file checked against the signed manifest as DeepSpeed unpickles it."""
    if not tag:
        return 0, 0
    from .checkpointing import load
    from .lr_schedule import resync_after_resume

    client = load(engine, os.path.join(args.output_dir, CKPT_DIR), tag)
    check_steps_left(args, client["step"])        # --epochs: the steps are known only now
    resync_after_resume(engine.lr_scheduler)      # --max-steps may have grown: this run's schedule decides
    if rank == 0:
        log.info("resumed from checkpoint %s at step %d", tag, client["step"])
    return client["step"], client["micro_step"]


def warmup_steps(args, resumed: bool) -> int:
    """LR warmup steps: from this --max-steps, or on a resume the first run's (--max-steps may grow then, the
    schedule may not; a run from before warmup_steps was recorded had its first run's --max-steps)."""
    if not resumed:
        return max(1, math.ceil(args.warmup_ratio * args.max_steps))
    with open(os.path.join(args.output_dir, RUN_CONFIG), encoding="utf-8") as fh:
        first = json.load(fh)
    return first.get("warmup_steps", max(1, math.ceil(args.warmup_ratio * first["max_steps"])))


def dataset_digest(dataset: str | None) -> str | None:
    """sha256 of a dataset file (None for a packaged corpus, whose version pins it): a resume checks it."""
    from .checkpointing import file_sha256

    return file_sha256(dataset) if dataset and os.path.isfile(dataset) else None


def start_output_dir(args, resolved: dict, warmup: int, resumed: bool) -> None:
    """Rank 0, once the run's model and data have loaded: ``--overwrite`` deletes the old run only now (a mistyped
    --dataset or a bad model fails before and leaves it), then a new run's config is written."""
    out = args.output_dir
    if not resumed and args.overwrite and os.path.exists(os.path.join(out, RUN_CONFIG)):
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    if not resumed:
        write_run_config(args, resolved, warmup)


def write_run_config(args, resolved: dict, warmup: int) -> None:
    record = {**{k: _named(k, v, os.path.abspath) for k, v in vars(args).items()}, "resolved": resolved,
              "warmup_steps": warmup,
              "dataset_sha256": dataset_digest(getattr(args, "dataset", None))}
    atomic_write_text(os.path.join(args.output_dir, RUN_CONFIG), json.dumps(record, indent=2, default=str))


def keep_before(out: str, prompt: str, before: str) -> None:
    """Kept as soon as it is generated: a run resumed after a crash reports it too."""
    atomic_write_text(os.path.join(out, BEFORE_SAMPLE), json.dumps({"prompt": prompt, "before": before}))


def kept_before(out: str, prompt: str) -> str | None:
    """The first run's "before" answer to ``prompt``; None when it had none or another prompt."""
    path = os.path.join(out, BEFORE_SAMPLE)
    if not (prompt and os.path.exists(path)):
        return None
    with open(path, encoding="utf-8") as fh:
        kept = json.load(fh)
    return kept["before"] if kept["prompt"] == prompt else None
