"""Decoding on CPU: the few-rows 4-bit / INT-N linears (ops/small_rows.py) vs dequantize + matmul, per linear and
in generate.

    python -m bench decode                      # 4096x4096, SmolLM2-135M's 1536x576 and 576x576 at 1/2/4/8 rows (NF4,
                                                # then INT4 and INT3), then SmolLM2-135M model.generate with the path
                                                # on and off (QLoRA NF4, then QA-LoRA INT4)
    python -m bench decode --threads 1 --dtype fp32
    python -m bench decode --quick              # small shapes and a tiny random Llama: a smoke run

Per linear (the frozen NF4 base with double quantization, blocksize 64; no LoRA): ``small_rows`` =
``small_rows.linear_4bit``; ``deq_matmul`` = dequantize into the layers' workspace + torch's matmul (what the layers
do otherwise); INT-N rows (``--intn-bits``, group size ``--intn-group``): ``small_rows.linear_intn`` against the
INT-N dequantizer + matmul (QA-LoRA's base); ``amx_fused`` = the AMX fused linear, where this CPU runs it (bf16);
``dense`` = torch's matmul with the weight already in the compute dtype (16-bit or fp32 inference without
quantization). Interleaved rounds; ratios are medians of per-round ratios. generate: the packaged
SmolLM2-135M-Instruct loaded through ``qlora_ds.inject`` (every linear but the LM head quantized, a fresh LoRA
adapter), greedy, exactly ``--new-tokens`` new tokens (EOS ignored)
after a one-message chat prompt; the time includes the prompt's forward (> 8 rows: dequantize + matmul either way). The
path is switched on and off in alternate order per round, in one process; ``--qalora-bits`` (0: skip) repeats it
with QA-LoRA (INT-N base, group size ``--intn-group``). Rows: ``bench/results/decode.jsonl``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from bench.common import RowWriter, describe_machine, format_table, paired_ratio, time_interleaved
from bench.layer import parse_shape
from qlora_ds import dequantize, quantize
from qlora_ds.nn.functional import dequantize_nf4_parts, workspace
from qlora_ds.ops import fused_linear, small_rows
from qlora_ds.quant import intn

SHAPES, QUICK_SHAPES = [(4096, 4096), (1536, 576), (576, 576)], [(256, 512)]
PROMPT = "Explain in a few sentences why the sky is blue."


def linear_variants(out_f: int, in_f: int, rows: int, dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    qt = quantize(torch.randn(out_f, in_f) * 0.02, "nf4", 64, True)
    shape, meta = (out_f, in_f), ((out_f, in_f), "nf4", 64, qt.nested_blocksize)
    parts = (qt.packed, qt.absmax, qt.absmax2, qt.offset)
    dense_w = dequantize(qt, dtype)
    x = torch.randn(rows, in_f).to(dtype)
    fns = {"small_rows": lambda: small_rows.linear_4bit(x, *parts, "nf4", 64, qt.nested_blocksize, shape),
           "deq_matmul": lambda: F.linear(x, dequantize_nf4_parts(*parts, meta, dtype,
                                                                  workspace(out_f * in_f, dtype, x.device))),
           "dense": lambda: F.linear(x, dense_w)}
    if dtype == torch.bfloat16 and fused_linear.available() and fused_linear.supported(x, shape, 64):
        fns["amx_fused"] = lambda: fused_linear.linear_4bit(x, *parts, "nf4", 64, qt.nested_blocksize, shape)
    return fns


def intn_variants(out_f: int, in_f: int, rows: int, dtype: torch.dtype, bits: int, group_size: int) -> dict:
    torch.manual_seed(0)
    qt = intn.quantize(torch.randn(out_f, in_f) * 0.02, bits, group_size)
    shape, parts = (out_f, in_f), (qt.qweight, qt.scales, qt.zeros, bits, group_size)
    dense_w = qt.dequantize(dtype)
    x = torch.randn(rows, in_f).to(dtype)
    return {"small_rows": lambda: small_rows.linear_intn(x, *parts, shape),
            "deq_matmul": lambda: F.linear(x, intn.dequantize_parts(*parts, shape, dtype,
                                                                    workspace(out_f * in_f, dtype, x.device))),
            "dense": lambda: F.linear(x, dense_w)}


def bench_linears(shapes, rows_list, dtype, iters, max_s, writer, fmt: str = "nf4+dq", bits: int = 4,
                  group_size: int = 64) -> list[list]:
    """fmt "nf4+dq" (blocksize 64) or "int" (INT-``bits``, ``group_size``)."""
    table = []
    for out_f, in_f in shapes:
        for rows in rows_list:
            fns = linear_variants(out_f, in_f, rows, dtype) if fmt == "nf4+dq" else \
                intn_variants(out_f, in_f, rows, dtype, bits, group_size)
            timings, samples = time_interleaved(fns, "cpu", warmup=2, repeats=iters, max_s=max_s)
            label = fmt if fmt == "nf4+dq" else f"int{bits}/g{group_size}"
            row = {"kind": "linear", "shape": [out_f, in_f], "rows": rows, "format": label,
                   "small_rows_max_rows": small_rows.MAX_ROWS}
            row.update({"blocksize": 64} if fmt == "nf4+dq" else {"bits": bits, "group_size": group_size})
            for name, timing in timings.items():
                row[f"{name}_us"] = round(1e3 * timing["ms"], 1)
                row[f"{name}_reps"] = timing["reps"]
            for other in ("deq_matmul", "dense", "amx_fused"):
                if other in samples:
                    row[f"ratio_vs_{other}"] = round(paired_ratio(samples, "small_rows", other), 3)
            writer.write(**row)
            table.append([label, f"{out_f}x{in_f}", rows, row["small_rows_us"], row["deq_matmul_us"], row["dense_us"],
                          row.get("amx_fused_us", "-"), row["ratio_vs_deq_matmul"], row["ratio_vs_dense"],
                          row.get("ratio_vs_amx_fused", "-")])
    return table


def bench_generate(path: str, dtype: torch.dtype, new_tokens: int, rounds: int, writer, qalora_bits: int = 0,
                   group_size: int = 32) -> list:
    """QLoRA (NF4 + double quant), or with ``qalora_bits`` QA-LoRA (INT-N, ``group_size``)."""
    from bench._train_loop import load_tokenizer
    from qlora_ds.inject import from_pretrained
    from qlora_ds.nn import QALoRAConfig, QLoRAConfig

    config = QALoRAConfig(bits=qalora_bits, group_size=group_size, compute_dtype=dtype) if qalora_bits else \
        QLoRAConfig(compute_dtype=dtype)
    model = from_pretrained(path, config, torch_dtype=dtype).eval()
    tok = load_tokenizer(path)
    messages = [{"role": "user", "content": PROMPT}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) \
        if getattr(tok, "chat_template", None) else PROMPT
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None,
              top_k=None, pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)

    def run(on: bool):
        previous = small_rows.set_enabled(on)
        try:
            t0 = time.perf_counter()
            with torch.no_grad():
                out = model.generate(**ids, **kw)
            return time.perf_counter() - t0, out
        finally:
            small_rows.set_enabled(previous)

    outs = {on: run(on)[1] for on in (True, False)}              # warm-up, and the tokens each path generates
    secs: dict[bool, list[float]] = {True: [], False: []}
    for r in range(rounds):
        for on in ((True, False) if r % 2 == 0 else (False, True)):
            secs[on].append(run(on)[0])
    med = {on: statistics.median(v) for on, v in secs.items()}
    layers = [m for m in model.modules() if hasattr(m, "disable_adapter")]
    for m in layers:                                            # the LoRA branch's share of a token
        m.disable_adapter = True
    no_adapter = statistics.median(run(True)[0] for _ in range(rounds))
    for m in layers:
        m.disable_adapter = False
    fmt = f"qalora int{qalora_bits}/g{group_size}" if qalora_bits else "qlora nf4+dq"
    row = {"kind": "generate", "model": path, "format": fmt, "prompt_tokens": ids["input_ids"].shape[1],
           "new_tokens": new_tokens, "rounds": rounds, "tokens_per_s_on": round(new_tokens / med[True], 2),
           "tokens_per_s_off": round(new_tokens / med[False], 2),
           "ms_per_token_on": round(1e3 * med[True] / new_tokens, 1),
           "ms_per_token_off": round(1e3 * med[False] / new_tokens, 1),
           "ms_per_token_on_no_adapter": round(1e3 * no_adapter / new_tokens, 1),
           "speedup": round(statistics.median(b / a for a, b in zip(secs[True], secs[False])), 3),
           "same_tokens": bool(torch.equal(outs[True], outs[False]))}
    writer.write(**row)
    return [fmt, row["prompt_tokens"], new_tokens, row["tokens_per_s_off"], row["tokens_per_s_on"],
            row["ms_per_token_off"], row["ms_per_token_on"], row["ms_per_token_on_no_adapter"], row["speedup"],
            row["same_tokens"]]


def main(argv=None) -> int:
    from bench._train_loop import model_path
    from qlora_ds.hardware import DTYPE_CHOICES, dtype_name, resolve_dtype

    ap = argparse.ArgumentParser(prog="python -m bench decode", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--shape", type=parse_shape, action="append", help="OUTxIN, repeatable (overrides defaults)")
    ap.add_argument("--rows", default="1,2,4,8", help="comma-separated rows (tokens) per call")
    ap.add_argument("--iters", type=int, default=50, help="rounds per linear (bounded by --max-s)")
    ap.add_argument("--max-s", type=float, default=2.0, help="time budget per variant and linear case (s)")
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens generated per call (default 32, quick 8)")
    ap.add_argument("--rounds", type=int, default=3, help="generate calls per setting")
    ap.add_argument("--model", default=None, help="checkpoint dir (default: the packaged SmolLM2-135M export)")
    ap.add_argument("--intn-bits", default="4,3", help="INT-N linears: comma-separated bits ('' for none)")
    ap.add_argument("--intn-group", type=int, default=32, help="INT-N group size (linears and QA-LoRA generate)")
    ap.add_argument("--qalora-bits", type=int, default=4, help="QA-LoRA generate: base bits (0: skip)")
    ap.add_argument("--no-generate", action="store_true")
    ap.add_argument("--results-dir", default=None)
    ap.add_argument("--device", default=None, help="cpu only (the path is a CPU kernel)")
    args = ap.parse_args(argv)
    if args.device not in (None, "cpu"):
        ap.error("bench decode measures a CPU kernel: --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = resolve_dtype(args.dtype, "cpu")
    if dtype not in (torch.float32, torch.bfloat16):
        ap.error(f"the few-rows path computes in fp32 or bf16, not {dtype_name(dtype)}")
    shapes = args.shape or (QUICK_SHAPES if args.quick else SHAPES)
    rows_list = [int(r) for r in args.rows.split(",")]
    print(f"# decode benchmark — {describe_machine('cpu')}; compute {dtype_name(dtype)}", flush=True)
    writer = RowWriter("decode", "cpu", args.results_dir, compute_dtype=dtype)
    if not small_rows.available():
        print("the few-rows path is unavailable (no compiled CPU op, or QLORA_DS_SMALL_ROWS=0)", file=sys.stderr)
        return 1
    iters = 3 if args.quick else args.iters
    table = bench_linears(shapes, rows_list, dtype, iters, args.max_s, writer)
    for bits in (int(b) for b in args.intn_bits.split(",") if b.strip()):
        table += bench_linears(shapes, rows_list, dtype, iters, args.max_s, writer, "int", bits, args.intn_group)
    print(format_table(["format", "shape", "rows", "small_rows us", "deq+matmul us", "dense us", "amx fused us",
                        "ours/deq+mm", "ours/dense", "ours/amx"], table), flush=True)
    if not args.no_generate:
        path = model_path(args.quick, given=args.model)
        new_tokens, rounds = args.new_tokens or (8 if args.quick else 32), 1 if args.quick else args.rounds
        gen = [bench_generate(path, dtype, new_tokens, rounds, writer)]
        if args.qalora_bits:
            gen.append(bench_generate(path, dtype, new_tokens, rounds, writer, args.qalora_bits, args.intn_group))
        print(format_table(["format", "prompt tokens", "new tokens", "tok/s off", "tok/s on", "ms/tok off", "ms/tok on",
                            "ms/tok on, adapters off", "speedup", "same tokens"], gen))
    print(f"rows appended to {writer.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
