"""Tokens/s and peak memory of a full LoRA training step (fwd + bwd + clip + AdamW) of SmolLM2-135M.

    python -m bench train            # batch 4 x seq 128, r 16 on all linears, grad checkpointing
    python -m bench train --quick    # tiny Llama from a config, 2 timed steps (smoke test)
    python -m bench train --device cuda --shape llama-1b   # random weights of a shape, no packaged model needed
    python -m bench train --dtype fp32   # compute dtype (default auto: qlora_ds.hardware.resolve_dtype's choice)

Variants (each in its own subprocess, so peak RSS / CUDA peak is its own): ``ours-nf4dq``
(qlora_ds.from_pretrained, QLoRA NF4 + DQ), ``bnb-peft`` (transformers BitsAndBytesConfig NF4 + DQ,
+ PEFT LoRA) and ``bf16-peft`` (PEFT LoRA on the 16-bit model; historical name: its base is in the compute
dtype). Same batch, sequence length, r, α, checkpointing (non-reentrant), optimizer and compute dtype
(``--dtype``; auto is bf16 where native, fp32 on CPUs without native bf16) for all; ratios are taken within one
run. Each row's ``compute_dtype`` is what that variant really computed in; a variant that did not honour
``--dtype`` says so in ``dtype_mismatch`` and gets no ratios.
Memory: ``peak_step`` is the RSS high-water mark during the steps (reset after loading) — CUDA max
allocated on a GPU; ``peak_process`` the whole process's ru_maxrss, imports and loading included. On the CPU each
RSS figure has ``<name>_rss_file`` (file-backed resident bytes at its end) and ``<name>_anon`` (minus them) beside it:
transformers + bnb keep the bf16 checkpoint mapped, ours reads it into owned memory, so the peaks are compared on the
anonymous figure (``ours_peak_step_anon_ratio``; ``bench.common.peak_fields``). Not against ``bf16-peft``: its mapped
pages are its weights, so its plain peak is the fair one.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile

import torch

from bench import _train_loop as tl
from bench.common import REPO, RowWriter, anon_or_plain, default_device, describe_machine, format_table, peak_fields
from qlora_ds.hardware import DTYPE_CHOICES, dtype_name, resolve_dtype

VARIANTS = ("ours-nf4dq", "bnb-peft", "bf16-peft")
MiB = 1 << 20


def worker(args) -> dict:
    """One variant in this process: load, warm up, time ``--steps`` steps; a dict of measurements."""
    device = default_device()
    dtype = resolve_dtype(args.dtype, device)
    torch.manual_seed(args.seed)
    base_rss = peak_fields("rss_before_load", tl.rss())
    model, params = tl.build(args.worker, args.model, r=args.r, alpha=args.alpha, grad_ckpt=not args.no_ckpt,
                             device=device, dtype=dtype, dropout=args.dropout)
    observed = tl.observed_compute_dtype(model) or dtype
    loaded_rss = tl.rss()
    loaded_cuda = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    load_peak = peak_fields("peak_load")
    opt, opt_name = tl.make_optimizer(params, lr=2e-4, which=args.optim)
    vocab = model.get_input_embeddings().weight.shape[0]
    batch = tl.random_batch(vocab, args.batch, args.seq, seed=args.seed)

    def it():
        while True:
            yield batch

    tl.train(model, params, opt, it(), args.warmup, device)     # warm-up (kernels, optimizer state)
    reset_ok = tl.reset_peak()
    res = tl.train(model, params, opt, it(), args.steps, device)
    med = statistics.median(res["step_s"])
    # CPU: the RSS high-water mark and, beside it, the file-backed pages resident at the end of the steps
    peak = {"peak_step": tl.cuda_peak()} if device.type == "cuda" else peak_fields("peak_step")
    return {"variant": args.worker, "step_s": med, "step_s_min": min(res["step_s"]), "steps": args.steps,
            "tokens_per_s": args.batch * args.seq / med, "loss_last": res["losses"][-1],
            **base_rss, "rss_after_load": loaded_rss, **load_peak, "cuda_after_load": loaded_cuda, **peak,
            "peak_step_kind": "cuda_max_allocated" if device.type == "cuda" else
            ("rss_hwm_since_reset" if reset_ok else "ru_maxrss"),
            "peak_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "trainable_params": sum(p.numel() for p in params), "optimizer": opt_name,
            "threads": torch.get_num_threads(), "compute_dtype": _name(observed)}


def _name(dtype: torch.dtype) -> str:
    try:
        return dtype_name(dtype)
    except KeyError:
        return str(dtype).replace("torch.", "")


def _run_variant(variant: str, args, out: str) -> dict:
    cmd = [sys.executable, "-m", "bench.train", "--worker", variant, "--model", args.model, "--out", out,
           "--batch", str(args.batch), "--seq", str(args.seq), "--r", str(args.r), "--alpha", str(args.alpha),
           "--dropout", str(args.dropout),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--seed", str(args.seed), "--optim", args.optim,
           "--dtype", args.dtype]
    if args.no_ckpt:
        cmd.append("--no-ckpt")
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:     # a row saying so, and the next variant runs
        return {"variant": variant, "error": f"timed out after {args.timeout:g} s (--timeout)", "stderr_tail": ""}
    if proc.returncode != 0 or not os.path.exists(out):
        tail = (proc.stderr or proc.stdout)[-1500:]
        return {"variant": variant, "error": f"exit {proc.returncode}: {tail.strip().splitlines()[-1] if tail.strip() else ''}",
                "stderr_tail": tail}
    with open(out) as f:
        return json.load(f)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bench train", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default=None, help="checkpoint dir (default: exported SmolLM2-135M; tiny with --quick)")
    ap.add_argument("--shape", default=None, choices=sorted(tl.RANDOM_SHAPES),
                    help="instead of --model: random bf16 weights of this shape (tiny, smollm2-135m, llama-1b)")
    ap.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                    help="compute dtype of every variant (auto: bf16 where native, fp16 on pre-Ampere GPUs, fp32 on "
                         "CPUs without native bf16)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--dropout", type=float, default=0.0,
                    help="LoRA dropout, every variant (QLoRA's recipes: 0.05-0.1)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 4; 2 with --quick)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-ckpt", action="store_true", help="gradient checkpointing off")
    ap.add_argument("--optim", choices=("torch", "paged"), default="torch",
                    help="torch.optim.AdamW (default, same for every variant) or qlora_ds PagedAdamW")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.steps is None:
        args.steps = 2 if args.quick else 4
    if args.worker:
        result = worker(args)
        with open(args.out, "w") as f:
            json.dump(result, f)
        return 0

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        if args.quick:
            args.batch, args.seq = min(args.batch, 2), min(args.seq, 32)
        if args.shape:
            args.model = tl.random_checkpoint(os.path.join(tmp, f"random-{args.shape}"), args.shape, args.seed)
        args.model = tl.model_path(args.quick, tmp, args.model)
        device = default_device()
        dtype = resolve_dtype(args.dtype, device)
        args.dtype = dtype_name(dtype)          # the workers get the resolved name: one decision per run
        print(describe_machine(device) + f"; compute {args.dtype}", flush=True)
        writer = RowWriter("train", device, compute_dtype=dtype)
        results, rows = [], []
        shape = {"model": os.path.basename(os.path.normpath(args.model)), "batch": args.batch, "seq": args.seq,
                 "r": args.r, "alpha": args.alpha, "dropout": args.dropout, "grad_ckpt": not args.no_ckpt}
        ours = None
        # each variant's row is written as soon as it ends (ratios against ours, which runs first by default): the
        # GPU check kills a step that overruns its budget, and the variants that finished must still leave rows
        for v in args.variants.split(","):
            r = _run_variant(v, args, os.path.join(tmp, f"{v}.json"))
            results.append(r)
            print(f"  {v}: " + (f"{r['tokens_per_s']:.0f} tok/s, peak step {r['peak_step'] / MiB:.0f} MiB"
                                if "error" not in r else r["error"]), flush=True)
            if "error" not in r and r.get("compute_dtype", args.dtype) != args.dtype:
                r["dtype_mismatch"] = f"asked {args.dtype}, {r['variant']} computed in {r['compute_dtype']}"
            usable = "error" not in r and "dtype_mismatch" not in r
            if usable and r["variant"] == "ours-nf4dq":
                ours = r
            extra = {}
            if ours and usable:
                extra = {"ours_speedup": ours["tokens_per_s"] / r["tokens_per_s"],
                         "ours_peak_step_ratio": ours["peak_step"] / r["peak_step"]}
                if ours.get("peak_step_anon") and r.get("peak_step_anon"):
                    extra["ours_peak_step_anon_ratio"] = ours["peak_step_anon"] / r["peak_step_anon"]
            writer.write(shape=shape, **{k: val for k, val in r.items() if k != "stderr_tail"}, **extra)
            if "error" in r:
                rows.append([r["variant"], "error", "", "", "", "", r["error"][:60], "", ""])
                continue
            anon, has_anon = anon_or_plain(r, "peak_step")
            rows.append([r["variant"] + (f" ({r['compute_dtype']}!)" if "dtype_mismatch" in r else ""),
                         f"{r['step_s']:.2f}", f"{r['tokens_per_s']:.0f}",
                         f"{extra.get('ours_speedup', float('nan')):.2f}x",
                         f"{(r['peak_step'] - (0 if device.type == 'cuda' else r['rss_before_load'])) / MiB:.0f}",
                         f"{r['peak_step'] / MiB:.0f}", f"{extra.get('ours_peak_step_ratio', float('nan')):.2f}",
                         f"{anon / MiB:.0f}" if has_anon else "-",
                         f"{extra.get('ours_peak_step_anon_ratio', float('nan')):.2f}"])
        print(f"\nbatch {args.batch} x seq {args.seq}, r {args.r}, dropout {args.dropout:g}, "
              f"grad ckpt {not args.no_ckpt}, "
              f"compute {args.dtype}, {args.steps} timed steps (median), "
              f"optimizer {results[0].get('optimizer', '?')}")
        mem = "CUDA max allocated MiB" if device.type == "cuda" else "peak RSS MiB"
        print(format_table(["variant", "step s", "tok/s", "ours speedup", f"{mem} minus pre-load",
                            mem, "ours/this peak", "anon peak MiB (minus RssFile)", "ours/this anon peak"], rows))
        print(f"rows appended to {writer.path}")
        return 0 if ours is not None else 1


if __name__ == "__main__":
    sys.exit(main())
