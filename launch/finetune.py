"""QLoRA / QA-LoRA finetuning under DeepSpeed: the deepspeed launcher, torchrun or mpirun; CPU or GPU.

    deepspeed --num_accelerators 2 launch/finetune.py --recipe configs/recipes/cpu_demo.json \
        --deepspeed_config configs/ds_cpu_demo.json --model DIR --dataset chatterbot --output-dir runs/demo

Reads top to bottom: parse arguments once, then ``train(args)``: set up the process group, check the
DeepSpeed config against the command line, stream-load the model into quantized LoRA layers, build the
data, train with periodic held-out loss and checkpoints, then write the adapter, metrics and loss curve.

Preemption: SIGTERM or SIGUSR1 to any rank (delivered to the ranks, not to the deepspeed launcher: README.md)
stops every rank after the current optimizer step and its checkpoint, with exit code 143 / 138 and
<output-dir>/preempted.json to requeue on; rerun with --resume to continue exactly (qlora_ds/preemption.py).
Ctrl-C (SIGINT) stops at once.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time

import torch

from qlora_ds import monitor
from qlora_ds.cli import read_recipe, run_main
from qlora_ds.data.run_data import Data, add_data_arguments, build_data
from qlora_ds.distributed import all_mean as _all_mean, load_device
from qlora_ds.ds_config import resolve_ds_config
from qlora_ds.hardware import DTYPE_CHOICES, ds_compute_dtype, dtype_name
from qlora_ds.lr_schedule import SCHEDULES, fill_scheduler_section, lr_factor, schedule_name
from qlora_ds.memstats import this_peak
from qlora_ds.run_memory import planner_check
from qlora_ds.overflow import OverflowMonitor, loss_scale
from qlora_ds.preemption import Preempted, StopSignals, stop_signals
from qlora_ds.run_dir import (CKPT_DIR, check_output_dir, keep_before, kept_before, resolved_settings, restore,
                              start_output_dir, warmup_steps)

log = logging.getLogger("finetune")


def parse_args(argv=None) -> argparse.Namespace:
    # no abbreviations: the command line's --epochs / --max-steps must be found as spelled to win over a recipe's
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--recipe", help="JSON file of defaults for the arguments below (see configs/recipes/)")
    p.add_argument("--model", help="Hugging Face checkpoint dir (safetensors); 'smollm2' = the packaged SmolLM2-135M")
    p.add_argument("--dataset", help="JSON/JSONL/TXT file, or 'chatterbot' for the packaged chat corpus")
    p.add_argument("--output-dir", required=False)
    p.add_argument("--deepspeed_config", "--deepspeed-config", "--ds-config", dest="ds_config")
    p.add_argument("--deepspeed", action="store_true", help="accepted for DeepSpeed-style command lines")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="compute dtype; auto: bf16 where the device computes it natively, fp16 on older GPUs, "
                        "fp32 on CPUs without native bf16 (the base stays 4-bit, LoRA masters fp32)")
    g = p.add_argument_group("adapter")
    g.add_argument("--method", choices=["qlora", "qalora"], default="qlora")
    g.add_argument("--quant-type", choices=["nf4", "fp4"], default="nf4")
    g.add_argument("--no-double-quant", dest="double_quant", action="store_false")
    g.add_argument("--quantize-experts", action=argparse.BooleanOptionalAction, default=True,
                   help="MoE models: store the fused experts in the same 4-bit format (frozen; LoRA: --lora-experts); "
                        "--no-quantize-experts keeps them 16-bit as transformers + bitsandbytes does")
    g.add_argument("--lora-experts", action=argparse.BooleanOptionalAction, default=False,
                   help="MoE models: LoRA on the 4-bit fused experts too (PEFT's target_parameters layout; needs "
                        "--lora-dropout 0: the update is folded into the experts' weights)")
    g.add_argument("--bits", type=int, default=4, help="QA-LoRA integer bits (2, 3, 4)")
    g.add_argument("--group-size", type=int, default=32, help="QA-LoRA group size")
    g.add_argument("--pool", choices=["sum", "mean"], default=None,
                   help="QA-LoRA: what LoRA-A reads per group: the sum (the paper's Algorithm 1; the default) or the "
                        "mean (the official repository; ~group-size times lower effective lr under Adam)")
    g.add_argument("--lora-r", type=int, default=64)
    g.add_argument("--lora-alpha", type=float, default=16)
    g.add_argument("--lora-dropout", type=float, default=0.1)
    g.add_argument("--target-modules", nargs="*", default=None,
                   help="module names or dotted suffixes of their paths (q_proj, self_attn.q_proj), as PEFT matches "
                        "them; default: all linear but lm_head")
    g.add_argument("--init-adapter", default=None, metavar="DIR",
                   help="start from this PEFT-format adapter (ours or PEFT's, safetensors) instead of fresh LoRA "
                        "weights: its rank, target modules and base model must match; its alpha is kept")
    t = p.add_argument_group("training (Guanaco defaults, design notes §4)")
    t.add_argument("--lr", type=float, default=None, help="default: the ds_config optimizer's lr, else 2e-4")
    t.add_argument("--warmup-ratio", type=float, default=0.03)
    t.add_argument("--lr-scheduler", choices=SCHEDULES, default=None,
                   help="after the warmup: constant (the QLoRA recipe; default), or linear / cosine decay to 0 at "
                        "--max-steps; a ds_config scheduler section is used instead when present (its \"auto\" "
                        "values filled from these flags)")
    t.add_argument("--max-grad-norm", type=float, default=None, help="default: ds_config gradient_clipping or 0.3")
    t.add_argument("--adam-beta2", type=float, default=None, help="default: the ds_config optimizer's, else 0.999")
    t.add_argument("--weight-decay", type=float, default=None, help="default: the ds_config optimizer's, else 0")
    t.add_argument("--optimizer", default=None,
                   help="PagedAdamW | PagedAdamW8bit | AdamW8bit (default: the ds_config's optimizer, else PagedAdamW)")
    t.add_argument("--micro-batch", type=int, default=None, help="per-rank micro batch (default: ds_config or 1)")
    t.add_argument("--grad-accum", type=int, default=None, help="gradient accumulation (default: ds_config or 16)")
    t.add_argument("--max-steps", type=int, default=None, help="optimizer steps to train (default 100)")
    t.add_argument("--epochs", type=float, default=None,
                   help="train this many passes over the training examples instead of --max-steps (the steps, and "
                        "with them the warmup and a decaying schedule, follow from the data once it is loaded)")
    t.add_argument("--max-len", type=int, default=512)
    t.add_argument("--pad-to-multiple-of", type=int, default=16,
                   help="round batch widths up to this (fewer distinct shapes: less per-shape kernel memory)")
    t.add_argument("--eval-size", type=int, default=64, help="held-out examples")
    t.add_argument("--eval-every", type=int, default=20)
    t.add_argument("--save-every", type=int, default=50)
    t.add_argument("--keep-checkpoints", type=int, default=2)
    t.add_argument("--log-every", type=int, default=1)
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--no-group-by-length", dest="group_by_length", action="store_false")
    t.add_argument("--chunked-loss", action=argparse.BooleanOptionalAction, default=True,
                   help="LM head + cross-entropy over token chunks, never the full [tokens, vocab] logits (default on)")
    t.add_argument("--packing", action="store_true",
                   help="pack whole training examples into --max-len rows (per-example positions, no cross-example "
                        "attention, no padding); --micro-batch rows per micro-batch (2+ spreads the per-step weight "
                        "dequantization over more tokens); held-out evaluation stays unpacked")
    t.add_argument("--loss-weighting", choices=["tokens", "micro-batch"], default="tokens",
                   help="tokens: every target token of an optimizer step weighs the same, however the step's batch "
                        "is split into micro-batches and ranks (transformers' Trainer does this); micro-batch: each "
                        "micro-batch's mean loss weighs the same (runs from before this option)")
    t.add_argument("--no-grad-ckpt", dest="grad_ckpt", action="store_false")
    add_data_arguments(t)                      # --train-on-prompt, --dedup, --plain-bos, --text-windows
    t.add_argument("--nan-policy", choices=["skip", "stop"], default="stop",
                   help="a non-finite loss: skip that step on every rank, or stop with an error")
    t.add_argument("--sample-prompt", default="What is AI?", help="generated before and after training ('' = none)")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    t.add_argument("--overwrite", action="store_true", help="replace a different run in --output-dir")
    first, _ = p.parse_known_args(argv)
    if first.recipe:
        p.set_defaults(**read_recipe(first.recipe, p))
    args = p.parse_args(argv)
    for name in ("model", "dataset", "output_dir"):
        if not getattr(args, name):
            p.error(f"--{name.replace('_', '-')} is required (directly or in --recipe)")
    given = {a.split("=")[0] for a in (sys.argv[1:] if argv is None else argv)}
    if first.recipe and args.epochs is not None and args.max_steps is not None:   # the command line's one wins
        if "--epochs" in given and "--max-steps" not in given:
            args.max_steps = None
        elif "--max-steps" in given and "--epochs" not in given:
            args.epochs = None
    if args.epochs is not None and args.max_steps is not None:
        p.error(f"--epochs {args.epochs} and --max-steps {args.max_steps}: give one (the steps of --epochs follow "
                f"from the data)")
    if args.epochs is not None and not args.epochs > 0:
        p.error(f"--epochs must be more than 0, got {args.epochs}")
    if args.epochs is None and args.max_steps is None:
        args.max_steps = 100
    if args.pad_to_multiple_of < 1:
        p.error(f"--pad-to-multiple-of must be 1 or more (1 = no rounding), got {args.pad_to_multiple_of}")
    # checked before the model loads: an interval of 0 would otherwise fail after the first step (modulo by zero)
    at_least = {"max_steps": 1, "max_len": 2, "eval_every": 1, "save_every": 1, "log_every": 1, "keep_checkpoints": 1,
                "eval_size": 0, "lora_r": 1, "micro_batch": 1, "grad_accum": 1}
    for name, low in at_least.items():
        value = getattr(args, name)
        if value is not None and value < low:
            p.error(f"--{name.replace('_', '-')} must be {low} or more, got {value}"
                    + (" (--eval-size 0 turns held-out evaluation off)" if name == "eval_every" else ""))
    if args.init_adapter and not os.path.isfile(os.path.join(args.init_adapter, "adapter_config.json")):
        p.error(f"--init-adapter {args.init_adapter}: no adapter_config.json there; give the directory an adapter "
                f"was saved to (a run's <output-dir>/adapter, or PEFT's save_pretrained directory)")
    if not 0.0 <= args.lora_dropout < 1.0:
        p.error(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")
    if args.lora_experts and (args.lora_dropout or not args.quantize_experts or args.method != "qlora"):
        p.error("--lora-experts adapts the 4-bit MoE experts of --method qlora (with --quantize-experts) and needs "
                f"--lora-dropout 0 (got {args.lora_dropout}): their LoRA update is folded into the weights, where "
                "dropout cannot act (PEFT's target_parameters refuses it too)")
    if not 0.0 <= args.warmup_ratio <= 1.0:
        p.error(f"--warmup-ratio must be in [0, 1], got {args.warmup_ratio}")
    return args


# ----------------------------------------------------------------------------------------------- config

def adapter_config(args, dtype: torch.dtype):
    from qlora_ds.nn import QALoRAConfig, QLoRAConfig

    common = dict(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                  target_modules=tuple(args.target_modules) if args.target_modules else None,
                  compute_dtype=dtype)
    if args.method == "qalora":
        pool = {} if args.pool is None else {"pool": args.pool}
        return QALoRAConfig(bits=args.bits, group_size=args.group_size, **pool, **common)
    return QLoRAConfig(quant_type=args.quant_type, double_quant=args.double_quant,
                       quantize_experts=args.quantize_experts, lora_experts=args.lora_experts, **common)


compute_dtype = ds_compute_dtype     # of a ds_config that went through resolve_ds_config


# ------------------------------------------------------------------------------------------------ train

class Run:
    """What the steps of one run share: the process group, the resolved ds_config, where things go.
    (A plain class: tests load this script by path, where a dataclass cannot find its module.)"""

    def __init__(self, args: argparse.Namespace, rank: int, world: int, ds_config: dict, resume_tag: str | None,
                 warmup: int):
        self.args, self.rank, self.world, self.ds_config, self.resume_tag = args, rank, world, ds_config, resume_tag
        self.warmup = warmup          # LR warmup steps (a resumed run keeps its first run's)

    @property
    def out(self) -> str:
        return self.args.output_dir

    @property
    def micro(self) -> int:
        return self.ds_config["train_micro_batch_size_per_gpu"]

    @property
    def accum(self) -> int:
        return self.ds_config["gradient_accumulation_steps"]

    @property
    def zero_stage(self) -> int:
        return self.ds_config.get("zero_optimization", {}).get("stage", 0)


def setup_run(args) -> Run:
    """Process group, model path, the ds_config with the command line folded in, the output directory."""
    from qlora_ds.distributed import init_distributed
    from qlora_ds.packaged import default_model_dir, export_smollm2

    rank, world, _ = init_distributed()
    if args.model == "smollm2":
        if rank == 0:
            export_smollm2(default_model_dir())
        torch.distributed.barrier()
        args.model = default_model_dir()
    ds_config = resolve_ds_config(args, world)
    args.dtype = dtype_name(compute_dtype(ds_config))       # run_config records (and --resume compares) what runs
    schedule_name(ds_config, args)                          # likewise
    resolved = resolved_settings(ds_config, world)
    resume_tag = check_output_dir(args, rank, resolved)
    torch.distributed.barrier()
    torch.manual_seed(args.seed)
    run = Run(args, rank, world, ds_config, resume_tag, None)
    run.resolved = resolved          # written with the run config once the model and data are loaded
    if args.epochs is None:
        settle_schedule(run)
    return run


def settle_schedule(run: Run, batches_per_epoch: int | None = None) -> None:
    """--max-steps (from --epochs once the data is known: this rank's micro batches per epoch, the same on every
    rank), the warmup and the ds_config scheduler's "auto" values."""
    args = run.args
    if batches_per_epoch is not None:
        args.max_steps = max(1, math.ceil(args.epochs * batches_per_epoch / run.accum))
        if run.rank == 0:
            log.info("--epochs %g: %d optimizer steps (%d micro batches per epoch and rank, %d accumulated per step)",
                     args.epochs, args.max_steps, batches_per_epoch, run.accum)
    run.warmup = warmup_steps(args, resumed=run.resume_tag is not None)
    fill_scheduler_section(run.ds_config, args, run.warmup)


def build_model(run: Run):
    """(quantized LoRA model in the compute dtype, the RSS before it: the planner's runtime term, the data included)."""
    from qlora_ds.inject import from_pretrained
    from qlora_ds.nn import guards
    from qlora_ds.memstats import rss

    args = run.args
    runtime = 0 if torch.cuda.is_available() else rss()     # the planner's runtime term, measured
    dtype = compute_dtype(run.ds_config)
    model = from_pretrained(args.model, adapter_config(args, dtype), ds_config=run.ds_config, torch_dtype=dtype,
                            device=load_device(run.zero_stage))
    if args.init_adapter and not run.resume_tag:     # a resumed run's checkpoint holds its own LoRA weights
        from qlora_ds.inject import load_adapter
        loaded = load_adapter(model, args.init_adapter)
        if run.rank == 0:
            log.info("LoRA weights of %d layers from %s", len(loaded), args.init_adapter)
    guards.watch(model)      # module names; an fp16 overflow in a no-grad forward (held-out, samples) raises, naming it
    if args.grad_ckpt:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model, runtime


def build_engine(run: Run, model):
    """(engine, lr scheduler): our optimizer from the ds_config's (resolved) optimizer section, handed to DeepSpeed
    as the client optimizer; DeepSpeed's own optimizer names stay in the config for DeepSpeed to build."""
    import deepspeed

    from qlora_ds.optim.deepspeed_registration import (optimizer_from_ds_config, register_with_deepspeed,
                                                          split_ds_config, undo_fp16_warmup_step)

    trainable = [p for p in model.parameters() if p.requires_grad]
    ds_plain, section = split_ds_config(run.ds_config)
    optimizer = optimizer_from_ds_config(run.ds_config, trainable) if section else None
    register_with_deepspeed()  # lets ZeRO wrap our optimizers like its own
    factor = lr_factor(run.args.lr_scheduler, run.warmup, run.args.max_steps) if "scheduler" not in ds_plain else None
    schedule = (lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor)) if factor else None  # None: DeepSpeed's
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                                   model_parameters=trainable, config=ds_plain)
    undo_fp16_warmup_step(engine)                       # fp16 without ZeRO: DeepSpeed's setup step on zero grads
    if run.rank == 0:
        log.info("ranks %d, micro batch %d × accum %d, %s %s, %.2f M trainable params", run.world, run.micro,
                 run.accum, run.args.optimizer, run.args.dtype,
                 sum(getattr(p, "ds_numel", p.numel()) for p in trainable) / 1e6)   # ZeRO-3: numel 0 once partitioned
    return engine, scheduler


def maybe_sample(run: Run, engine, tokenizer) -> str | None:
    """The sample answer on the training device, every rank in step (ZeRO-3 gathers weights per forward);
    None without a prompt."""
    if not run.args.sample_prompt:
        return None
    from qlora_ds.eval.sampling import greedy_answer

    return greedy_answer(engine.module, tokenizer, run.args.sample_prompt, engine.device,
                         synced=run.zero_stage == 3 and run.world > 1, plain_bos=run.args.plain_bos)


def sample_before(run: Run, engine, tokenizer) -> str | None:
    """The "before" sample: generated on a fresh run and kept in the output dir, read back on a resume."""
    if run.resume_tag is not None:
        return kept_before(run.out, run.args.sample_prompt)
    before = maybe_sample(run, engine, tokenizer)
    if before is not None and run.rank == 0:
        keep_before(run.out, run.args.sample_prompt, before)
    return before


class Loop:
    """The training loop's state and its periodic work (log, held-out loss, checkpoint)."""

    def __init__(self, run: Run, engine, scheduler, tokenizer, data, metrics, step: int, micro_step: int):
        self.run, self.engine, self.scheduler, self.metrics = run, engine, scheduler, metrics
        self.pad_id = tokenizer.pad_token_id
        self.train_ex, self.eval_ex, self.batches = data.train, data.eval_shard, data.batches
        # a rank whose shard is empty still evaluates (masked filler batches): the others wait in its collectives
        self.has_eval = data.eval_total > 0
        self.step, self.micro_step = step, micro_step
        self.widths = set()                    # the batch widths met, for the planner check at the end
        self.losses, self.tokens, self.t_last, self.lr = [], 0, time.perf_counter(), None
        self.items = None                      # this optimizer step's loss divisor (step_items)
        self.bar = None
        self.overflow, self.skip = OverflowMonitor(engine), None   # the last skipped step's report (module named)
        self.seconds = {"held_out": 0.0, "checkpoints": 0.0}   # inside the loop: what is not training
        # (held-out loss, step) of the best evaluation so far: its checkpoint is kept beyond --keep-checkpoints
        # (rank 0 prunes; a resumed run reads the earlier evaluations back from metrics.jsonl)
        rows = [r for r in getattr(metrics, "rows", []) if "eval_loss" in r and r["step"] > 0]
        self.best = min(((r["eval_loss"], r["step"]) for r in rows), default=None)

    def _examples(self, micro_step: int) -> list:
        epoch, index = divmod(micro_step, len(self.batches))
        return [self.train_ex[i] for i in self.batches.epoch(epoch)[index]]

    def next_batch(self) -> dict:
        from qlora_ds.data import collate
        from qlora_ds.data.packing import collate_packed

        args = self.run.args
        batch = (collate_packed if args.packing else collate)(self._examples(self.micro_step), self.pad_id,
                                                               args.pad_to_multiple_of, args.max_len)
        self.widths.add(batch["input_ids"].shape[1])
        return {k: v.to(self.engine.device) for k, v in batch.items()}

    def step_items(self) -> float | None:
        """--loss-weighting tokens: the loss's divisor for this optimizer step's micro-batches — the target tokens
        of all of them on all ranks, over accum × world (DeepSpeed's backward divides by accum, its gradient
        all-reduce averages over ranks). A micro-batch skipped for a non-finite loss is replaced by the next one,
        which keeps the first count: that step's weights are then approximate."""
        from qlora_ds.nn.chunked_loss import IGNORE_INDEX

        run = self.run
        if run.args.loss_weighting != "tokens":
            return None
        if self.items is None:
            # the collated batch's targets (labels[..., 1:]): each example's (rows) own, padding is unlabelled
            mine = sum(int((e["labels"][1:] != IGNORE_INDEX).sum())
                       for k in range(run.accum) for e in self._examples(self.micro_step + k))
            total = _all_mean([mine])[0] * run.world
            self.items = max(total, 1.0) / (run.accum * run.world)
        return self.items

    def forward(self, batch: dict, items: float | None = None):
        """The micro batch's loss (``items``: its divisor, else its mean), or None when it is non-finite on any rank
        (skipped everywhere, or an error)."""
        from qlora_ds import faults
        from qlora_ds.loss import causal_lm_loss

        run = self.run
        torch.manual_seed(run.args.seed * 1_000_003 + self.micro_step * run.world + run.rank)  # dropout: resumable
        faults.inject("raise_at_step", self.step + 1)
        loss = causal_lm_loss(self.engine, batch, chunked=run.args.chunked_loss, num_items_in_batch=items)
        if faults.triggered("nan_loss_at_micro_step", self.micro_step):
            loss = loss * float("nan")
        bad = _all_mean([0.0 if torch.isfinite(loss).item() else 1.0])[0] > 0
        self.micro_step += 1
        if not bad:
            return loss
        from qlora_ds.nn import guards
        where = guards.take_overflow()                 # fp16: the first module whose values overflowed, if any
        text = f"non-finite loss at step {self.step} (micro step {self.micro_step - 1}) on at least one rank"
        if run.args.nan_policy == "stop":
            fix = ("check the data, then --resume --nan-policy skip to step past it; if the loss diverged, a new "
                   "--output-dir with a lower --lr and --init-adapter <a kept checkpoints/step*/adapter>")
            raise where.error(f"{text} ({fix})") if where else FloatingPointError(f"{text}; {fix}")
        if run.rank == 0:
            log.warning("%s: skipped on every rank%s", text, f"; {where.describe()}" if where else "")
        return None

    def log_step(self, mean_loss: float) -> None:
        now = time.perf_counter()
        tok_s, self.t_last, self.tokens = self.tokens * self.run.world / (now - self.t_last), now, 0
        lr, mem = self.lr, this_peak() / 2 ** 20
        # DeepSpeed skips the optimizer step on a gradient overflow (fp16 loss scaling; bf16 overflow check)
        row = dict(step=self.step, loss=mean_loss, lr=lr, grad_norm=monitor.grad_norm(self.engine), tokens_per_s=tok_s,
                   mem_mb=mem, skipped_steps=int(self.engine.skipped_steps))
        if self.skip:                                  # a step skipped on overflow since the last row
            row.update(overflow_module=self.skip["overflow_module"], overflow_at=self.skip["overflow_at"])
            self.skip = None
        scale = loss_scale(self.engine)
        if scale is not None:
            row["loss_scale"] = scale
        monitor.write_events(self.engine, self.run.rank, train_loss=mean_loss, tokens_per_s=tok_s,
                             grad_norm=row["grad_norm"])
        if self.run.rank == 0:
            self.metrics.log(**row)
            self.bar.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{lr:.1e}", tok_s=f"{tok_s:.0f}", mem=f"{mem:.0f}MB")

    def held_out(self) -> None:
        from qlora_ds.eval.sharded import sharded_heldout_loss

        args, t0 = self.run.args, time.perf_counter()
        eval_loss, widths = sharded_heldout_loss(self.engine, self.eval_ex, self.pad_id, self.run.micro,
                                                 args.pad_to_multiple_of, args.max_len, chunked=args.chunked_loss)
        self.widths |= widths
        if self.step > 0 and (self.best is None or eval_loss < self.best[0]):
            self.best = (eval_loss, self.step)
        monitor.write_events(self.engine, self.run.rank, eval_loss=eval_loss)
        if self.run.rank == 0:
            self.metrics.log(step=self.step, eval_loss=eval_loss)
            (self.bar.write if self.bar else log.info)(f"step {self.step}: held-out loss {eval_loss:.4f}")
        self._not_training("held_out", t0)

    def checkpoint(self) -> None:
        from qlora_ds import checkpointing
        from qlora_ds.inject.zero import save_adapter

        t0 = time.perf_counter()
        # each checkpoint also holds the adapter at its step (PEFT format): usable without resuming
        checkpointing.save(self.engine, os.path.join(self.run.out, CKPT_DIR), self.step,
                           {"step": self.step, "micro_step": self.micro_step}, self.run.args.keep_checkpoints,
                           also=lambda tag_dir: save_adapter(self.engine, os.path.join(tag_dir, "adapter"),
                                                             barrier=False),
                           protect={checkpointing.tag_of(self.best[1])} if self.best else ())
        self._not_training("checkpoints", t0)

    def _not_training(self, what: str, t0: float) -> None:
        """Count the seconds since ``t0`` as ``what``, and out of the next tokens_per_s interval."""
        spent = time.perf_counter() - t0
        self.seconds[what] += spent
        self.t_last += spent

    def run_steps(self, stop: StopSignals | None = None) -> None:
        from tqdm import tqdm

        from qlora_ds import faults
        from qlora_ds.data.batching import batch_tokens

        args, run, stop = self.run.args, self.run, stop or StopSignals(())
        if self.step == 0 and self.has_eval:         # the baseline the curve is judged against
            self.held_out()
        self.bar = tqdm(total=args.max_steps, initial=self.step, disable=run.rank != 0, dynamic_ncols=True,
                        file=sys.stdout)
        self.engine.train()
        while self.step < args.max_steps:
            items = self.step_items()
            batch = self.next_batch()
            loss = self.forward(batch, items)
            if loss is None:
                continue
            self.engine.backward(loss)
            self.lr = self.scheduler.get_last_lr()[0]         # the lr this step uses: engine.step() moves it on
            self.skip = self.overflow.step() or self.skip     # engine.step(); a skipped step is reported, not raised
            self.losses.append(loss.item())
            self.tokens += batch_tokens(batch, self.pad_id)
            if len(self.losses) < run.accum:     # counts only micro-batches that stepped, as DeepSpeed's boundary
                continue
            self.step += 1
            # with token weighting each loss is its share of the step's token mean times accum × world: the same mean
            mean_loss, *votes = _all_mean([sum(self.losses) / len(self.losses), *stop.vote(self.step)])
            signum = stop.agreed(votes)         # a signal to any rank stops every rank after this step
            self.losses, self.items = [], None
            last = self.step == args.max_steps
            if self.step % args.log_every == 0 or last:
                self.log_step(mean_loss)
            self.bar.update(1)
            evaluated = self.has_eval and (self.step % args.eval_every == 0 or last)
            if evaluated:
                self.held_out()
            saved = bool(self.step % args.save_every == 0 or last or signum)
            if saved:
                self.checkpoint()
            if (evaluated or saved) and not (signum or last):   # a signal noted during them: stop now, not a step on
                signum = stop.agreed(_all_mean(stop.vote(self.step)))
                if signum and not saved:
                    self.checkpoint()
            faults.inject("kill_after_step", self.step)
            if signum and not last:
                raise Preempted(signum, self.step)
        self.bar.close()


def finish(run: Run, engine, model, tokenizer, metrics, loop: Loop, runtime: int, before: str | None,
           seconds: dict) -> dict:
    """Adapter, planner check, CSV, curve, the "after" sample and summary.json (with where the time went)."""
    from qlora_ds import checkpointing
    from qlora_ds.atomic import atomic_write_text
    from qlora_ds.inject.zero import save_adapter

    args, out = run.args, run.out
    save_adapter(engine, os.path.join(out, "adapter"))
    summary = {"steps": loop.step, "dtype": args.dtype, "skipped_steps": int(engine.skipped_steps)}
    memory = planner_check(args, model.config, run.ds_config, run.world, runtime, loop.widths)
    t0 = time.perf_counter()
    after = maybe_sample(run, engine, tokenizer)
    seconds["samples"] = seconds.get("samples", 0.0) + time.perf_counter() - t0
    if run.rank != 0:
        return summary
    if memory:
        summary["memory"] = memory
        log.info("peak memory per rank (%s): measured %.0f MiB, planner %.0f MiB (planned/measured %.2f; %s above "
                 "the %.0f MiB the process held before the model)",
                 "CUDA allocated" if memory["device"] == "cuda" else "RSS", memory["measured_peak_mib"],
                 memory["planned_peak_mib"], memory["planned_over_measured"],
                 memory["planned_over_measured_above_runtime"], memory["runtime_mib"])
    metrics.write_csv(os.path.join(out, "metrics.csv"))
    metrics.plot(os.path.join(out, "loss_curve.png"), title=f"{args.method} on {os.path.basename(args.model)}")
    evals = [r["eval_loss"] for r in metrics.rows if "eval_loss" in r]
    summary.update(first_eval_loss=evals[0] if evals else None, last_eval_loss=evals[-1] if evals else None)
    if loop.best:
        kept = os.path.join(CKPT_DIR, checkpointing.tag_of(loop.best[1]), "adapter")
        summary["best_eval"] = {"step": loop.best[1], "eval_loss": loop.best[0],
                                "adapter": kept if os.path.isdir(os.path.join(out, kept)) else None}
    if after is not None:
        summary.update(prompt=args.sample_prompt, before=before, after=after)
    seconds["total"] = time.perf_counter() - seconds.pop("_start")
    summary["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    atomic_write_text(os.path.join(out, "summary.json"), json.dumps(summary, indent=2))
    log.info("done: %s", json.dumps(summary, indent=2))
    log.info("adapter: %s   loss curve: %s", os.path.join(out, "adapter"), os.path.join(out, "loss_curve.png"))
    return summary


def train(args) -> dict:
    """Build (process group, config, data, model, engine), the loop, then finish (adapter, summary)."""
    from qlora_ds.data.run_data import tokenizer_and_config
    from qlora_ds.distributed import shutdown
    from qlora_ds.metrics import MetricsLog

    seconds, t0 = {"_start": time.perf_counter()}, time.perf_counter()

    def phase(name: str) -> None:           # seconds since the previous phase ended, on this rank
        nonlocal t0
        seconds[name], t0 = time.perf_counter() - t0, time.perf_counter()

    run = setup_run(args)
    phase("setup")
    # the data before the model, from the checkpoint's tokenizer and config.json: a bad dataset fails in seconds
    tokenizer, config = tokenizer_and_config(args.model)
    data = build_data(args, tokenizer, config, run.rank, run.world, run.micro)
    if args.epochs is not None:
        settle_schedule(run, len(data.batches))
    phase("data")
    model, runtime = build_model(run)
    phase("load")
    if run.rank == 0:   # --overwrite deletes the old run only now: a bad dataset or model fails first and leaves it
        start_output_dir(args, run.resolved, run.warmup, resumed=run.resume_tag is not None)
    torch.distributed.barrier()
    engine, scheduler = build_engine(run, model)
    phase("engine")
    before = sample_before(run, engine, tokenizer)
    phase("samples")
    step, micro_step = restore(args, engine, run.resume_tag, run.rank)   # checkpoint's, or (0, 0)
    monitor.cut_back(engine, run.out, step if args.resume else None)
    metrics = MetricsLog(os.path.join(run.out, "metrics.jsonl"), resume_step=step if run.resume_tag else None) \
        if run.rank == 0 else None
    if run.rank == 0:
        log.info("%d train %s / %d held-out examples", len(data.train), "rows" if args.packing else "examples",
                 data.eval_total)
    loop = Loop(run, engine, scheduler, tokenizer, data, metrics, step, micro_step)
    with stop_signals(run.rank, shutdown, run.out) as stop:   # stopped: leave together, once rank 0 has pruned
        loop.run_steps(stop)
    monitor.comms_summary(run.ds_config)                # collective: every rank
    phase("loop")
    seconds.update(loop.seconds)
    seconds["train"] = seconds["loop"] - sum(loop.seconds.values())
    summary = finish(run, engine, model, tokenizer, metrics, loop, runtime, before, seconds)
    del engine, model, loop
    shutdown()
    return summary


def main(argv=None) -> int:
    return run_main(train, parse_args, argv)

if __name__ == "__main__":
    sys.exit(main())
