"""One MoE layer's 4-bit experts, fwd+bwd, at several dequantization limits (``QLORA_DS_EXPERTS_DEQUANT_MB``): the
peak RSS above the loaded layer and the time per step, each limit in a fresh process (bench/RESULTS.md, "moe"):

    python bench/scripts/experts_groups.py --limits 2048,256,64

Default shape: a Qwen3-30B-A3B layer (128 experts, hidden 2048, expert intermediate 768, top-8: 1.2 GB of expert
weights in bf16), 512 tokens.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def worker(args) -> dict:
    import torch
    from transformers import AutoConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    from qlora_ds.hardware import resolve_dtype
    from qlora_ds.heap import release_free_heap
    from qlora_ds.memstats import peak_rss, reset_peak, rss
    from qlora_ds.nn import QLoRAConfig
    from qlora_ds.nn.quantized_experts import quantize_experts_module
    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    cfg = AutoConfig.for_model("qwen3_moe", hidden_size=args.hidden, moe_intermediate_size=args.intermediate,
                               num_experts=args.experts, num_experts_per_tok=args.top_k)
    torch.manual_seed(0)
    experts = Qwen3MoeExperts(cfg)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(std=0.02)
    experts.to(dtype)
    quantize_experts_module(experts, QLoRAConfig(dropout=0.0, compute_dtype=dtype))
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(args.tokens, args.hidden, generator=gen).to(dtype).requires_grad_(True)
    index = torch.stack([torch.randperm(args.experts, generator=gen)[:args.top_k] for _ in range(args.tokens)])
    weights = torch.softmax(torch.randn(args.tokens, args.top_k, generator=gen), -1).to(dtype).requires_grad_(True)
    group = experts._group_size(dtype)
    release_free_heap()            # the 16-bit weights and the quantization's temporaries, freed, off the count
    reset_peak()
    loaded = rss() / 2**20
    times = []
    for _ in range(args.steps + 1):
        t = time.perf_counter()
        experts(hidden, index, weights).float().square().mean().backward()
        times.append(time.perf_counter() - t)
    peak = peak_rss() / 2**20
    return {"limit_mb": args.limit, "group": group, "experts": args.experts, "dtype": str(dtype).split(".")[-1],
            "tokens": args.tokens, "step_s": min(times[1:]), "peak_above_loaded_mib": round(peak - loaded),
            "layer_mib": round(sum(s[0] * s[1] * s[2] for s, _ in experts._qds_weights.values())
                               * dtype.itemsize / 2**20)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limits", default="2048,256,64", help="QLORA_DS_EXPERTS_DEQUANT_MB values, comma-separated")
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=768)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--results", default=None, help="directory of the results rows (default bench/results)")
    ap.add_argument("--limit", type=float, default=None, help=argparse.SUPPRESS)    # the worker's
    args = ap.parse_args()
    if args.limit is not None:
        print(json.dumps(worker(args)))
        return
    from bench.common import RowWriter, describe_machine
    print(describe_machine("cpu"))
    rows = RowWriter("experts_groups", "cpu", args.results)
    shape = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("limits", "limit", "results")]
    for limit in args.limits.split(","):
        env = dict(os.environ, QLORA_DS_EXPERTS_DEQUANT_MB=limit)
        out = subprocess.run([sys.executable, __file__, *shape, "--limit", limit], env=env, cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout
        print(json.dumps(rows.write(**json.loads(out.strip().splitlines()[-1]))), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
