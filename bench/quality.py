"""The papers' quality tables at small scale: held-out loss of SmolLM2-135M finetuned on chatterbot pairs.

    python -m bench quality                       # 6 trainings x --steps, seed 0 (~20 min on 2 CPU cores)
    python -m bench quality --seeds 1 --variants bf16-lora,qlora-nf4dq   # run-to-run spread
    python -m bench quality --quick               # tiny Llama, 3 steps (smoke test)

Same budget for every variant (steps, batch, seq len, r, α, lr, constant schedule, max grad norm 0.3,
group-by-length, response-only labels, same optimizer), same fixed held-out set (the split does not
depend on the seed). Variants:

- ``bf16-lora``: PEFT LoRA on the bf16 model;
- ``qlora-nf4dq``: ours, NF4 + double quant; also evaluated merged (bf16), and merged then group-wise
  round-to-nearest INT4 / INT3 / INT2 (qlora_ds.quant.intn, group 32) — "QLoRA then quantize";
- ``qlora-fp4``: ours, FP4 (no double quant);
- ``qalora-int4`` / ``-int3`` / ``-int2``: ours, QA-LoRA (INT-N group 32), evaluated after the exact
  merge into the zero points (QALoRALinear.merge), i.e. as the deployable INT-N model.
Each variant's loss before training (its quantized base, LoRA B = 0) is reported too.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch
import torch.nn as nn

from bench import _train_loop as tl
from bench.common import RowWriter, default_device, describe_machine, format_table

VARIANTS = {"bf16-lora": "bf16-peft", "qlora-nf4dq": "ours-nf4dq", "qlora-fp4": "ours-fp4",
            "qalora-int4": "ours-qalora4", "qalora-int3": "ours-qalora3", "qalora-int2": "ours-qalora2"}
RTN_BITS = (4, 3, 2)
CLAIMS = {
    "bf16-lora": "reference (16-bit LoRA)",
    "qlora-nf4dq": "QLoRA: NF4+DQ matches 16-bit LoRA",
    "qlora-nf4dq merged bf16": "merge is exact up to bf16 rounding",
    "qlora-fp4": "QLoRA: FP4 below NF4 (NF4 is the better 4-bit type)",
    "qlora-nf4dq merged RTN-INT4": "QA-LoRA: QLoRA then INT4 loses a little",
    "qlora-nf4dq merged RTN-INT3": "QA-LoRA: QLoRA then INT3 loses clearly",
    "qlora-nf4dq merged RTN-INT2": "QA-LoRA: QLoRA then INT2 collapses",
    "qalora-int4 merged": "QA-LoRA: beats QLoRA-then-INT4 (small gap)",
    "qalora-int3 merged": "QA-LoRA: beats QLoRA-then-INT3 (larger gap)",
    "qalora-int2 merged": "QA-LoRA: beats QLoRA-then-INT2 most",
}


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


@torch.no_grad()
def merge_qlora(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor | None, torch.dtype]]:
    """Replace every QLoRALinear by its merged bf16 nn.Linear; {path: (fp32 merged weight, bias, dtype)}."""
    from qlora_ds.nn import QLoRALinear
    merged = {}
    for path, m in list(model.named_modules()):
        if isinstance(m, QLoRALinear):
            merged[path] = (m.merged_weight_fp32(), None if m.bias is None else m.bias.detach().clone(),
                            m.compute_dtype)
            _replace(model, path, m.merge())
    return merged


@torch.no_grad()
def requantize_rtn(model: nn.Module, merged: dict, bits: int, group_size: int = 32) -> None:
    """Put group-wise RTN INT-``bits`` (dequantized) versions of the merged weights into the model."""
    from qlora_ds.quant import intn
    for path, (w, bias, dtype) in merged.items():
        wq = intn.dequantize(intn.quantize(w, bits, group_size), torch.float32)
        lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=dtype)
        lin.weight.copy_(wq)
        if bias is not None:
            lin.bias.copy_(bias)
        _replace(model, path, lin.requires_grad_(False))


@torch.no_grad()
def merge_qalora(model: nn.Module) -> int:
    from qlora_ds.nn import QALoRALinear
    n = 0
    for path, m in list(model.named_modules()):
        if isinstance(m, QALoRALinear) and m.has_adapter:
            _replace(model, path, m.merge())
            n += 1
    return n


def run_variant(name: str, seed: int, args, data, writer, device) -> list[dict]:
    train_ex, held, pad_id = data
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    model, params = tl.build(VARIANTS[name], args.model, r=args.r, alpha=args.alpha, device=device)
    load_s = time.perf_counter() - t0
    ev = lambda: tl.heldout_loss(model, held, args.eval_batch, pad_id, device)  # noqa: E731
    before = ev()
    opt, opt_name = tl.make_optimizer(params, args.lr, args.optim)
    res = tl.train(model, params, opt, tl.batches(train_ex, args.batch, seed, pad_id), args.steps, device)
    train_s = sum(res["step_s"])
    common = {"variant": name, "seed": seed, "steps": args.steps, "loss_before": before,
              "train_loss_first": res["losses"][0], "train_loss_last5": sum(res["losses"][-5:]) / len(res["losses"][-5:]),
              "train_s": train_s, "load_s": load_s, "optimizer": opt_name, "tokens": res["tokens"],
              "shape": {"model": args.model_name, "batch": args.batch, "seq": args.seq, "r": args.r,
                        "alpha": args.alpha, "lr": args.lr, "heldout": len(held), "dtype": "bfloat16"}}
    evals = [(name, ev())]
    if name == "qlora-nf4dq":
        merged = merge_qlora(model)
        evals.append((f"{name} merged bf16", ev()))
        for bits in RTN_BITS:
            requantize_rtn(model, merged, bits)
            evals.append((f"{name} merged RTN-INT{bits}", ev()))
    elif name.startswith("qalora"):
        merge_qalora(model)
        evals.append((f"{name} merged", ev()))
    rows = [writer.write(**common, eval=label, heldout_loss=loss, claim=CLAIMS.get(label)) for label, loss in evals]
    print(f"  {name} seed {seed}: before {before:.4f} -> " + ", ".join(f"{l}: {v:.4f}" for l, v in evals)
          + f"  ({train_s:.0f} s train, {load_s:.0f} s load)", flush=True)
    del model, params, opt
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bench quality", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default=None)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--seeds", default="0", help="comma-separated training seeds (data order + LoRA init)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per variant (default 40; 3 --quick)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--heldout", type=int, default=None, help="held-out examples (default 128; 16 --quick)")
    ap.add_argument("--eval-batch", type=int, default=16)
    ap.add_argument("--optim", choices=("torch", "paged"), default="torch")
    args = ap.parse_args(argv)
    args.steps = args.steps or (3 if args.quick else 40)
    args.heldout = args.heldout or (8 if args.quick else 128)
    if args.quick:
        args.batch, args.seq = min(args.batch, 2), min(args.seq, 64)
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    device = default_device()
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        args.model = tl.model_path(args.quick, tmp, args.model)
        args.model_name = args.model.rstrip("/").rsplit("/", 1)[-1]
        tok = tl.load_tokenizer(args.model)
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        train_ex, held = tl.chat_examples(tok, args.seq, args.heldout, limit=40 if args.quick else None)
        print(describe_machine(device), flush=True)
        print(f"{len(train_ex)} train / {len(held)} held-out examples; {args.steps} steps x batch {args.batch}, "
              f"seq <= {args.seq}, r {args.r}, alpha {args.alpha}, lr {args.lr}, seeds {args.seeds}", flush=True)
        writer = RowWriter("quality", device)
        rows = []
        for seed in (int(s) for s in args.seeds.split(",")):
            for name in names:
                rows += run_variant(name, seed, args, (train_ex, held, pad_id), writer, device)
    table = [[r["eval"], r["seed"], f"{r['loss_before']:.4f}", f"{r['heldout_loss']:.4f}", r.get("claim", "")]
             for r in rows]
    print(format_table(["variant", "seed", "held-out loss before", "held-out loss after", "paper's claim"], table))
    print(f"rows appended to {writer.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
