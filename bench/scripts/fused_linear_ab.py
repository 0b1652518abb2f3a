"""The fused 4-bit dequantize + AMX GEMM linear against dequantize + torch's matmul, in one process: a QLoRALinear
(NF4 + DQ, LoRA r 16, bf16) fwd+bwd per shape, the two paths alternated in 11 rounds (the order flipped every round),
median ms of each and the median of the per-round ratios. Needs a CPU with AMX (``qlora_ds.ops.fused_linear``); the
path's row rule is bypassed here, so every shape is measured both ways, and the few-rows kernel (``ops/small_rows``,
tried before the fused path at <= 8 rows) is off in both arms, so each arm takes the path it is named after
(bench/RESULTS.md, "fused linear"):

    python bench/scripts/fused_linear_ab.py --rows 512 --shapes 576x576,1536x576,4096x4096
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=512, help="tokens per call (rows of the layer input)")
    ap.add_argument("--shapes", default="576x576,1536x576,576x1536,4096x4096,11008x4096",
                    help="out x in, comma-separated")
    ap.add_argument("--rounds", type=int, default=11)
    args = ap.parse_args()

    from bench.common import describe_machine
    from qlora_ds.nn import QLoRAConfig, QLoRALinear
    from qlora_ds.ops import fused_linear, small_rows

    print(f"# {describe_machine('cpu')}")
    fused_linear.MAX_ROWS = fused_linear.MAX_ROWS_LARGE = 1 << 62     # measure every shape both ways
    small_rows.set_enabled(False)      # else it takes the forward of both arms at <= 4 rows, of the unfused one at <= 8
    if not fused_linear.available():
        sys.exit("this CPU (or build) has no fused AMX linear: nothing to compare")
    torch.manual_seed(0)
    print("| shape (out x in) | rows | fused ms | dequantize + matmul ms | fused / dequantize + matmul |")
    print("|---|---|---|---|---|")
    for spec in args.shapes.split(","):
        out_f, in_f = (int(v) for v in spec.split("x"))
        base = torch.nn.Linear(in_f, out_f, bias=False).to(torch.bfloat16)
        layer = QLoRALinear.from_linear(base, QLoRAConfig(r=16, dropout=0.0, compute_dtype="bf16"))
        x = torch.randn(args.rows, in_f, dtype=torch.bfloat16, requires_grad=True)

        def step():
            y = layer(x)
            y.backward(torch.ones_like(y))

        reps = max(3, int(2e9 / (args.rows * in_f * out_f * 6)))
        times, ratios = {True: [], False: []}, []
        for r in range(args.rounds):
            for on in ((True, False) if r % 2 else (False, True)):
                fused_linear.set_enabled(on)
                step()
                t0 = time.perf_counter()
                for _ in range(reps):
                    step()
                times[on].append((time.perf_counter() - t0) / reps * 1e3)
            ratios.append(times[True][-1] / times[False][-1])
        print(f"| {out_f}x{in_f} | {args.rows} | {statistics.median(times[True]):.2f} | "
              f"{statistics.median(times[False]):.2f} | {statistics.median(ratios):.3f} |", flush=True)


if __name__ == "__main__":
    main()
