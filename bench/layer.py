"""fwd+bwd time of QLoRALinear vs bf16 nn.Linear + LoRA vs bitsandbytes Linear4bit + PEFT LoRA.

    python bench/layer.py            # 4096x4096, batch*seq 512, r=64, bf16 (< 2 min on 2 CPU cores)
    python bench/layer.py --big      # also 11008x4096
    python bench/layer.py --quick    # small shapes, a smoke run

Ratios are measured in the same run; each shape appends a JSONL row to bench/results/layer.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time

import torch
import torch.nn as nn

from qlora_ds.nn import QLoRAConfig, QLoRALinear
from qlora_ds.nn.functional import lora_delta

HERE = os.path.dirname(os.path.abspath(__file__))


class BF16LoRA(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.base = base.to(torch.bfloat16).requires_grad_(False)
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, base.out_features, bias=False)
        nn.init.normal_(self.lora_B.weight, std=0.01)
        self.scaling = alpha / r

    def forward(self, x):
        x = x.to(torch.bfloat16)
        return self.base(x) + lora_delta(x, self.lora_A, self.lora_B, self.scaling, torch.bfloat16)


def bnb_peft(base: nn.Linear, r: int, alpha: float):
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    q = bnb.nn.Linear4bit(base.in_features, base.out_features, bias=False, compute_dtype=torch.bfloat16,
                          quant_type="nf4", compress_statistics=True)
    q.weight = bnb.nn.Params4bit(base.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                 compress_statistics=True)
    q.weight = q.weight._quantize("cpu") if hasattr(q.weight, "_quantize") else q.weight
    holder = nn.Sequential(q)
    model = get_peft_model(holder, LoraConfig(r=r, lora_alpha=alpha, target_modules=["0"], lora_dropout=0.0))
    model.train()
    return model


def timeit(module, x, iters, warmup=1):
    def step():
        xi = x.detach().requires_grad_(True)
        y = module(xi)
        y.float().sum().backward()
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=HERE, stderr=subprocess.DEVNULL).decode().strip()
    except Exception:
        return "unknown"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--big", action="store_true", help="also 11008x4096")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--r", type=int, default=64)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--no-bnb", action="store_true")
    args = ap.parse_args()
    shapes = [(256, 512)] if args.quick else [(4096, 4096)] + ([(11008, 4096)] if args.big else [])
    tokens = 64 if args.quick else args.tokens
    try:
        import bitsandbytes
        bnb_version = bitsandbytes.__version__
    except Exception:
        bnb_version = None
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    for out_f, in_f in shapes:
        torch.manual_seed(0)
        base = nn.Linear(in_f, out_f, bias=False)
        x = torch.randn(tokens, in_f, dtype=torch.bfloat16)
        ours = QLoRALinear.from_linear(base, QLoRAConfig(r=args.r, alpha=16, dropout=0.0))
        nn.init.normal_(ours.lora_B.weight, std=0.01)
        ref = BF16LoRA(base, args.r, 16)
        row = {"bench": "layer_fwd_bwd", "shape": [out_f, in_f], "tokens": tokens, "r": args.r, "dtype": "bfloat16",
               "device": "cpu", "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "bitsandbytes": bnb_version, "commit": commit()}
        row["bf16_lora_s"] = timeit(ref, x, args.iters)
        row["qlora_ds_s"] = timeit(ours, x, args.iters)
        if bnb_version and not args.no_bnb:
            try:
                row["bnb_peft_s"] = timeit(bnb_peft(base, args.r, 16), x, args.iters)
            except Exception as err:  # bnb CPU paths vary between versions: record, don't die
                row["bnb_peft_error"] = f"{type(err).__name__}: {err}"[:200]
        row["ratio_vs_bf16"] = row["qlora_ds_s"] / row["bf16_lora_s"]
        if "bnb_peft_s" in row:
            row["ratio_vs_bnb"] = row["qlora_ds_s"] / row["bnb_peft_s"]
        print(f"{out_f}x{in_f} tokens={tokens}: bf16+LoRA {row['bf16_lora_s']*1e3:.1f} ms | qlora_ds "
              f"{row['qlora_ds_s']*1e3:.1f} ms ({row['ratio_vs_bf16']:.2f}x) | bnb+PEFT "
              f"{row.get('bnb_peft_s', float('nan'))*1e3:.1f} ms")
        with open(os.path.join(HERE, "results", "layer.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
