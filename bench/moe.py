"""MoE models: loaded bytes, training-step peak and time with the fused experts in 4 bit (ours), in 16 bit (ours with
``--no-quantize-experts``) and with transformers + bitsandbytes + PEFT (which leaves the experts in 16 bit).

    python -m bench moe                # a random Qwen3-MoE of ~0.7B parameters (32 experts, top-4), seq 256
    python -m bench moe --quick        # a tiny one (smoke test)

The checkpoint is written once by this script (random weights, bf16, transformers' own per-expert layout) under
``--workdir``. Each variant runs in its own subprocess (its peak is its own): load, one warm-up step, ``--steps``
timed steps of batch 1 x ``--seq`` random tokens, r 16 / α 16 / dropout 0 on the attention (``bench._train_loop``'s
targets: the experts are no linears) and, in the ``*-lora-experts`` variants, on the fused experts too (ours:
``--lora-experts``, 4-bit; PEFT: ``target_parameters`` on the 16-bit experts bitsandbytes leaves),
non-reentrant checkpointing, torch AdamW, the machine's compute dtype. ``loaded``: RSS after loading minus before
(CUDA: allocated); ``peak_step_over_loaded``: the step's high-water mark minus the loaded RSS; ``one_token_ms``: a
forward of one token without cache (what decoding pays per layer's experts).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch

from bench import _train_loop as tl
from bench.common import REPO, RowWriter, default_device, describe_machine, format_table

MiB = 1 << 20
VARIANTS = ("ours", "ours-16bit-experts", "bnb-peft", "ours-lora-experts", "bnb-peft-lora-experts")
SHAPES = {"default": dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                          head_dim=128, num_experts=32, moe_intermediate_size=768, num_experts_per_tok=4,
                          intermediate_size=3072, vocab_size=32000),
          "quick": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=16, num_experts=4, moe_intermediate_size=64, num_experts_per_tok=2,
                        intermediate_size=128, vocab_size=512)}


def write_checkpoint(path: str, shape: dict) -> str:
    from transformers import AutoConfig, AutoModelForCausalLM
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    cfg = AutoConfig.for_model("qwen3_moe", **shape, max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    return path


def _build(variant: str, path: str, dtype: torch.dtype, device):
    method = "bnb-peft" if variant.startswith("bnb-peft") else "ours-nf4dq"
    model, _ = tl.build(method, path, device=device, dtype=dtype, quantize_experts=variant != "ours-16bit-experts",
                        lora_experts=variant.endswith("-lora-experts"))
    return model


def worker(args) -> dict:
    from qlora_ds.hardware import resolve_dtype
    device = default_device()
    dtype = resolve_dtype("auto", device)
    before = tl.rss() if device.type == "cpu" else torch.cuda.memory_allocated()
    model = _build(args.worker, args.model, dtype, device)
    loaded = tl.rss() if device.type == "cpu" else torch.cuda.memory_allocated()
    params = [p for p in model.parameters() if p.requires_grad]
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    opt = torch.optim.AdamW(params, lr=1e-4)
    vocab = model.get_input_embeddings().weight.shape[0]
    batch = {k: v.to(device) for k, v in tl.random_batch(vocab, 1, args.seq).items()}

    def step() -> float:
        tl._sync(device)
        t0 = time.perf_counter()
        loss = tl.train_step(model, params, opt, batch)
        tl._sync(device)
        if not math.isfinite(loss):
            raise RuntimeError(f"loss {loss}")
        return time.perf_counter() - t0

    step()
    tl.reset_peak()
    times = [step() for _ in range(args.steps)]
    peak = tl.peak_rss() if device.type == "cpu" else tl.cuda_peak()
    one = batch["input_ids"][:, :1]

    def one_token() -> float:       # a decoding step's forward (no cache): one token reaches top-k experts
        tl._sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            model(input_ids=one, use_cache=False)
        tl._sync(device)
        return time.perf_counter() - t0

    model.eval()
    one_token()
    token_ms = 1000 * statistics.median(one_token() for _ in range(5))
    return {"variant": args.worker, "seq": args.seq, "dtype": str(dtype).replace("torch.", ""),
            "frozen_bytes": frozen, "loaded": loaded - before, "step_s": statistics.median(times),
            "step_s_all": times, "peak_step_over_loaded": peak - loaded, "one_token_ms": token_ms,
            "device": device.type}


def run_variant(variant: str, model: str, seq: int, steps: int, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "bench.moe", "--worker", variant, "--model", model, "--seq", str(seq),
           "--steps", str(steps)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"variant": variant, "error": f"timeout after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        return {"variant": variant, "error": f"exit {proc.returncode}: {tail[-1] if tail else ''}"[:300]}
    return json.loads(lines[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench moe", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--model", help="a MoE checkpoint directory (default: the random one this script writes)")
    p.add_argument("--workdir", default=os.path.expanduser("~/.cache/qlora_ds/bench_moe"))
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--timeout", type=float, default=1800)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return 0
    shape = "quick" if args.quick else "default"
    seq = args.seq or (32 if args.quick else 256)
    model = args.model or write_checkpoint(os.path.join(args.workdir, shape), SHAPES[shape])
    device = default_device()
    print(describe_machine(device), flush=True)
    writer = RowWriter("moe", device)
    rows = []
    for variant in args.variants:
        row = run_variant(variant, model, seq, args.steps, args.timeout)
        rows.append(writer.write(model=model, shape=shape, **row))
    table = [(r["variant"], f"{r['frozen_bytes'] / MiB:.0f}" if "frozen_bytes" in r else r.get("error", "?"),
              f"{r['loaded'] / MiB:.0f}" if "loaded" in r else "", f"{r['step_s']:.2f}" if "step_s" in r else "",
              f"{r['peak_step_over_loaded'] / MiB:.0f}" if "peak_step_over_loaded" in r else "",
              f"{r['one_token_ms']:.0f}" if "one_token_ms" in r else "") for r in rows]
    print(format_table(("variant", "frozen MiB", "loaded MiB", "step s", "step peak over loaded MiB",
                        "1-token forward ms"), table))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
