"""fwd+bwd time of QLoRALinear vs 16-bit nn.Linear + LoRA vs bitsandbytes Linear4bit + PEFT LoRA.

    python -m bench layer                  # CPU: 4096x4096, 512 tokens; CUDA: 4096x4096 and 28672x8192, 4096 tokens
    python -m bench layer --device cuda --shape 28672x8192 --tokens 4096
    python -m bench layer --quick          # 256x512, 64 tokens: a smoke run

Same r (64), α (16), dropout 0, compute dtype (``--dtype``, auto: bf16 where native, fp32 on CPUs without native
bf16) and input for the three; ratios are measured in the same run. One JSONL row per shape
(``bench/results/layer.jsonl`` or ``--results-dir``) with the machine, versions, commit and ``compute_dtype``
(``bench.common``; ``dtype``, the same value, stays for older readers such as scripts/gpu/summarize.py). A variant
that cannot compute in that dtype gets a ``<variant>_error`` saying so, and no ratio.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn as nn

from bench.common import RowWriter, default_device, describe_machine, format_table, paired_ratio, time_interleaved
from qlora_ds import ops
from qlora_ds.nn import QLoRAConfig, QLoRALinear
from qlora_ds.nn.functional import lora_delta

CPU_SHAPES, CUDA_SHAPES = [(4096, 4096)], [(4096, 4096), (28672, 8192)]


class DenseLoRA(nn.Module):
    """A frozen 16-bit (or fp32) nn.Linear + LoRA: what QLoRA replaces."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype
        self.base = base.to(dtype).requires_grad_(False)
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=base.weight.device)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=base.weight.device)
        nn.init.normal_(self.lora_B.weight, std=0.01)
        self.scaling = alpha / r

    def forward(self, x):
        x = x.to(self.dtype)
        return self.base(x) + lora_delta(x, self.lora_A, self.lora_B, self.scaling, self.dtype)


def bnb_peft(base: nn.Linear, r: int, alpha: float, dtype: torch.dtype, device: torch.device):
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    q = bnb.nn.Linear4bit(base.in_features, base.out_features, bias=False, compute_dtype=dtype,
                          quant_type="nf4", compress_statistics=True)
    q.weight = bnb.nn.Params4bit(base.weight.data.to("cpu").clone(), requires_grad=False, quant_type="nf4",
                                 compress_statistics=True)
    q = q.to(device)          # Params4bit quantizes on its way to the device (bnb 0.50 on CPU too)
    if q.weight.dtype != torch.uint8 and hasattr(q.weight, "_quantize"):
        q.weight = q.weight._quantize(device.type)
    if q.compute_dtype is not None and q.compute_dtype != dtype:
        raise RuntimeError(f"bitsandbytes Linear4bit computes in {q.compute_dtype}, not {dtype}")
    model = get_peft_model(nn.Sequential(q), LoraConfig(r=r, lora_alpha=alpha, target_modules=["0"], lora_dropout=0.0))
    return model.train()


def fwd_bwd(module, x):
    def step():
        xi = x.detach().requires_grad_(True)
        module(xi).float().sum().backward()
    return step


def parse_shape(text: str) -> tuple[int, int]:
    try:
        out_f, in_f = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not OUTxIN, e.g. 28672x8192") from None
    return out_f, in_f


def main(argv=None) -> int:
    from qlora_ds.hardware import DTYPE_CHOICES, dtype_name, resolve_device, resolve_dtype

    ap = argparse.ArgumentParser(prog="python -m bench layer", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the GPU if there is one)")
    ap.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto")
    ap.add_argument("--shape", type=parse_shape, action="append", help="OUTxIN, repeatable (overrides defaults)")
    ap.add_argument("--big", action="store_true", help="also 11008x4096 (a LLaMA-7B MLP)")
    ap.add_argument("--tokens", type=int, default=None, help="batch x sequence (default 512 on CPU, 4096 on CUDA)")
    ap.add_argument("--r", type=int, default=64)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--max-s", type=float, default=20.0, help="time budget per variant and shape (s)")
    ap.add_argument("--no-bnb", action="store_true")
    ap.add_argument("--results-dir", default=None)
    args = ap.parse_args(argv)
    device = resolve_device(args.device) if args.device else default_device()
    dtype = resolve_dtype(args.dtype, device)
    gpu = device.type == "cuda"
    shapes = args.shape or ([(256, 512)] if args.quick else (CUDA_SHAPES if gpu else CPU_SHAPES))
    if args.big and not args.shape:
        shapes = shapes + [(11008, 4096)]
    tokens = args.tokens or (64 if args.quick else (4096 if gpu else 512))
    iters = 2 if args.quick else args.iters
    try:
        import bitsandbytes  # noqa: F401
        have_bnb = not args.no_bnb
    except Exception:
        have_bnb = False
    print(f"# layer benchmark — {describe_machine(device)}; compute {dtype_name(dtype)}", flush=True)
    writer = RowWriter("layer", device, args.results_dir, compute_dtype=dtype)
    table = []
    for out_f, in_f in shapes:
        torch.manual_seed(0)
        base = nn.Linear(in_f, out_f, bias=False, device=device)
        x = torch.randn(tokens, in_f, device=device).to(dtype)
        ours = QLoRALinear.from_linear(base, QLoRAConfig(r=args.r, alpha=16, dropout=0.0, compute_dtype=dtype))
        nn.init.normal_(ours.lora_B.weight, std=0.01)
        variants = {"qlora_ds": lambda: ours, "dense_lora": lambda: DenseLoRA(base, args.r, 16, dtype)}
        if have_bnb:
            variants["bnb_peft"] = lambda: bnb_peft(base, args.r, 16, dtype, device)
        row = {"shape": [out_f, in_f], "tokens": tokens, "r": args.r, "dtype": dtype_name(dtype),
               "quant_backend": ops.backend(device)}
        steps = {}
        for name, make in variants.items():
            try:
                steps[name] = fwd_bwd(make(), x)
                steps[name]()                       # the warm-up; a variant that fails here is recorded, not timed
            except Exception as err:  # noqa: BLE001 - bnb's CPU paths vary between versions: record, go on
                steps.pop(name, None)
                row[f"{name}_error"] = f"{type(err).__name__}: {err}"[:200]
        # interleaved rounds: the ratios are medians of per-round ratios, robust to a shared machine's slow spells
        timings, samples = time_interleaved(steps, device, warmup=0, repeats=iters, max_s=args.max_s) if steps \
            else ({}, {})
        for name, timing in timings.items():
            row[f"{name}_ms"] = round(timing["ms"], 3)
            row[f"{name}_reps"] = timing["reps"]
        if "qlora_ds" in samples and "dense_lora" in samples:
            row["ratio_vs_dense"] = round(paired_ratio(samples, "qlora_ds", "dense_lora"), 3)
        if "qlora_ds" in samples and "bnb_peft" in samples:
            row["ratio_vs_bnb"] = round(paired_ratio(samples, "qlora_ds", "bnb_peft"), 3)
        row["timing"] = "interleaved rounds; ratios = median of per-round ratios"
        del steps
        writer.write(**row)
        table.append([f"{out_f}x{in_f}", tokens, row.get("dense_lora_ms", "err"), row.get("qlora_ds_ms", "err"),
                      row.get("bnb_peft_ms", "-" if not have_bnb else "err"), row.get("ratio_vs_dense", ""),
                      row.get("ratio_vs_bnb", "")])
        del ours, base, x
    print(format_table(["shape", "tokens", f"{dtype_name(dtype)} LoRA ms", "qlora_ds ms", "bnb+PEFT ms",
                        "ours/dense", "ours/bnb"], table))
    print(f"rows appended to {writer.path}")
    return 0 if all("qlora_ds_ms" in writer_row for writer_row in writer.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
