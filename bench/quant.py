"""Quantize / dequantize speed: ours (per backend) vs bitsandbytes vs torchao NF4, against a plain copy.

    python -m bench quant [--quick] [--device cpu|cuda] [--shape 4096x4096 ...] [--results-dir DIR]

All numbers of one shape come from the same run (these machines are noisy: read the ratios). GB/s is
the bytes of the bf16 tensor (numel * 2) over the time — the same definition for every row, so a
dequantize row's GB/s compares directly with the copy rows' ("% copy" is against ``copy_`` into a
preallocated tensor; for a ``dequantize_out`` row, against a ``copy_`` timed right before it, so that the load of a
shared machine drifting during the run cancels). "vs bnb" is bnb's time / this row's time for the same format and double-quant
setting (dequantize into ``out=`` against bnb's allocating dequantize; INT-N against bnb NF4 without
DQ; torchao NF4, which always double-quantizes, against bnb NF4 + DQ).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import sys
import warnings
from typing import Callable

import torch

from qlora_ds import ops, quant
from qlora_ds.quant import intn

from .common import RowWriter, default_device, describe_machine, format_table, time_fn

DEFAULT_SHAPES = ((4096, 4096), (8192, 8192), (11008, 4096))
QUICK_SHAPES = ((512, 512),)
CONFIGS = (("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False))
BLOCKSIZE, NESTED_BLOCKSIZE, GROUP_SIZE = 64, 256, 32
SLOW_MS = 300.0   # ops slower than this at the first shape skip the warmup call at later shapes

GOAL_QUANT_DQ = 20.0     # ours quantize+DQ >= 20x bnb
GOAL_DEQUANT = 1.0       # ours dequantize (allocating) >= bnb
GOAL_OUT_PCT_COPY = {"cpu": 80.0, "cuda": 85.0}  # ours dequantize into out= vs the preallocated copy's GB/s


@dataclasses.dataclass
class Result:
    op: str            # quantize | dequantize | dequantize_out | copy_ | clone
    impl: str          # qlora_ds | bitsandbytes | torchao | torch
    backend: str | None
    fmt: str | None    # nf4 | fp4 | int2 | int3 | int4
    double_quant: bool | None
    blocksize: int | None
    timing: dict
    gbps: float = 0.0
    vs_bnb: float | None = None
    pct_copy: float | None = None
    copy_ms: float | None = None   # dequantize_out: the paired copy_ timed just before

    @property
    def label(self) -> str:
        impl = self.impl if self.backend is None else f"{self.impl}[{self.backend}]"
        cfg = "" if self.fmt is None else self.fmt + ("+dq" if self.double_quant else "")
        return f"{impl} {self.op} {cfg}".strip()


@dataclasses.dataclass
class Plan:
    shapes: tuple
    repeats: int
    max_s: float
    later_repeats: int
    later_max_s: float
    reference_shapes: tuple   # shapes on which the (slow) torch reference backend is timed


def plan_for(quick: bool, device: torch.device, shapes=None) -> Plan:
    gpu = device.type == "cuda"
    if quick:
        return Plan(tuple(shapes or QUICK_SHAPES), 3, 0.5, 3, 0.5, tuple(shapes or QUICK_SHAPES))
    shapes = tuple(shapes or DEFAULT_SHAPES)
    return Plan(shapes, 20 if gpu else 5, 1.0, 20 if gpu else 5, 1.0, shapes[:1])


def load_bnb():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes.functional as bnbf
        return bnbf, None
    except Exception as err:  # noqa: BLE001 - any import failure means "not available here"
        return None, f"bitsandbytes unavailable ({type(err).__name__}: {err}); its rows are skipped"


def load_torchao_nf4():
    """torchao's ``to_nf4`` (its module moved between releases); (None, note) when it cannot import."""
    log = logging.getLogger("torchao")
    level = log.level
    log.setLevel(logging.ERROR)   # torchao 0.18 logs its missing CUDA-only .so files on a CPU build
    errors = []
    try:
        for mod in ("torchao.quantization.quantize_.workflows.nf4.nf4_tensor", "torchao.dtypes.nf4tensor"):
            try:
                return importlib.import_module(mod).to_nf4, None
            except Exception as err:  # noqa: BLE001
                errors.append(f"{mod}: {type(err).__name__}: {err}")
    finally:
        log.setLevel(level)
    return None, "torchao NF4Tensor unavailable (" + "; ".join(errors) + "); its rows are skipped"


def measure_shape(shape, device, plan: Plan, first: bool, slow: set[str], bnbf, to_nf4) -> list[Result]:
    torch.manual_seed(0)
    w = torch.randn(shape, dtype=torch.bfloat16, device=device)
    buf = torch.empty_like(w)
    results: list[Result] = []
    repeats, max_s = (plan.repeats, plan.max_s) if first else (plan.later_repeats, plan.later_max_s)

    def run(fn: Callable[[], object], op, impl, backend=None, fmt=None, dq=None, bs=None, *, reference=False):
        """Time ``fn``, record a Result, return ``fn``'s last output."""
        r = Result(op, impl, backend, fmt, dq, bs, {})
        if reference:   # slow pure-torch reference: one timed call, no warmup
            r.timing, output = time_fn(fn, device, warmup=0, repeats=1)
        else:
            warm = 0 if (not first and r.label in slow) else 1
            r.timing, output = time_fn(fn, device, warmup=warm, repeats=repeats, max_s=max_s)
            if first and r.timing["ms"] > SLOW_MS:
                slow.add(r.label)
        results.append(r)
        return output

    run(lambda: buf.copy_(w), "copy_", "torch")
    run(lambda: w.clone(), "clone", "torch")

    ours = ops.backend(device)
    for fmt, dq in CONFIGS:
        qt = run(lambda: quant.quantize(w, fmt, BLOCKSIZE, dq), "quantize", "qlora_ds", ours, fmt, dq, BLOCKSIZE)
        run(lambda: quant.dequantize(qt, torch.bfloat16), "dequantize", "qlora_ds", ours, fmt, dq, BLOCKSIZE)
        copy_timing, _ = time_fn(lambda: buf.copy_(w), device, warmup=1, repeats=repeats, max_s=max_s)
        run(lambda: quant.dequantize(qt, torch.bfloat16, out=buf), "dequantize_out", "qlora_ds", ours, fmt, dq,
            BLOCKSIZE)
        results[-1].copy_ms = copy_timing["ms"]
        if bnbf is not None:  # right after ours, so that both see the same load on a shared machine
            packed, state = run(lambda: bnbf.quantize_4bit(w, blocksize=BLOCKSIZE, compress_statistics=dq,
                                                           quant_type=fmt),
                                "quantize", "bitsandbytes", None, fmt, dq, BLOCKSIZE)
            run(lambda: bnbf.dequantize_4bit(packed, state), "dequantize", "bitsandbytes", None, fmt, dq, BLOCKSIZE)
            del packed, state
    if shape in plan.reference_shapes and ours != "torch":
        with ops.use_backend("torch"):
            for fmt, dq in CONFIGS:
                qt = run(lambda: quant.quantize(w, fmt, BLOCKSIZE, dq), "quantize", "qlora_ds", "torch", fmt, dq,
                         BLOCKSIZE, reference=True)
                run(lambda: quant.dequantize(qt, torch.bfloat16), "dequantize", "qlora_ds", "torch", fmt, dq,
                    BLOCKSIZE, reference=True)
    del qt

    for bits in intn.BITS:
        qi = run(lambda: intn.quantize(w, bits, GROUP_SIZE), "quantize", "qlora_ds", "intn", f"int{bits}", None,
                 GROUP_SIZE)
        run(lambda: intn.dequantize(qi, torch.bfloat16), "dequantize", "qlora_ds", "intn", f"int{bits}", None,
            GROUP_SIZE)
        del qi

    if to_nf4 is not None:
        nf4 = run(lambda: to_nf4(w, BLOCKSIZE, NESTED_BLOCKSIZE), "quantize", "torchao", None, "nf4", True, BLOCKSIZE)
        run(lambda: nf4.get_original_weight(), "dequantize", "torchao", None, "nf4", True, BLOCKSIZE)
        del nf4

    add_ratios(results, w.numel() * w.element_size())
    order = ["torch", "qlora_ds", "bitsandbytes", "torchao"]  # table order: by implementation, then as measured
    return sorted(results, key=lambda r: order.index(r.impl) if r.impl in order else len(order))


def add_ratios(results: list[Result], nbytes: int) -> None:
    bnb = {(r.op, r.fmt, r.double_quant): r.timing["ms"] for r in results if r.impl == "bitsandbytes"}
    copy = next(r for r in results if r.op == "copy_")
    for r in results:
        r.gbps = nbytes / (r.timing["ms"] * 1e-3) / 1e9
        op = "dequantize" if r.op == "dequantize_out" else r.op
        fmt, dq = (r.fmt, r.double_quant) if r.backend != "intn" else ("nf4", False)
        if (op, fmt, dq) in bnb and r.impl != "bitsandbytes":
            r.vs_bnb = bnb[(op, fmt, dq)] / r.timing["ms"]
    for r in results:
        r.pct_copy = 100.0 * (r.copy_ms / r.timing["ms"] if r.copy_ms else r.gbps / copy.gbps)


def goals(results: list[Result], ours: str, device_type: str) -> list[tuple[str, bool | None, str]]:
    """(goal, met (None = not measurable here), detail) for the goals of issues 3, 8 and 14 (the copy-bandwidth
    target is 80% on CPU, 85% on GPU)."""
    pct = GOAL_OUT_PCT_COPY.get(device_type, 80.0)
    mine = [r for r in results if r.impl == "qlora_ds" and r.backend == ours]

    def check(name, rows, value, target):
        vals = [(r, value(r)) for r in rows]
        if not vals or any(v is None for _, v in vals):
            return (name, None, "not measurable in this run (bitsandbytes missing?)")
        worst_r, worst = min(vals, key=lambda rv: rv[1])
        detail = ", ".join(f"{r.fmt}{'+dq' if r.double_quant else ''} {v:.1f}" for r, v in vals)
        return (name, worst >= target, f"worst {worst:.1f} ({worst_r.label}); {detail}")

    return [
        check(f"quantize+DQ >= {GOAL_QUANT_DQ:g}x bnb", [r for r in mine if r.op == "quantize" and r.double_quant],
              lambda r: r.vs_bnb, GOAL_QUANT_DQ),
        check(f"dequantize (allocating) >= {GOAL_DEQUANT:g}x bnb", [r for r in mine if r.op == "dequantize"],
              lambda r: r.vs_bnb, GOAL_DEQUANT),
        check(f"dequantize out= >= {pct:g}% of copy_ GB/s", [r for r in mine if r.op == "dequantize_out"],
              lambda r: r.pct_copy, pct),
    ]


def table(results: list[Result]) -> str:
    rows = []
    for r in results:
        rows.append([r.impl if r.backend is None else f"{r.impl}[{r.backend}]", r.op,
                     "" if r.fmt is None else r.fmt + ("+dq" if r.double_quant else ""),
                     f"{r.timing['ms']:.2f}", f"{r.gbps:.2f}",
                     "" if r.vs_bnb is None else f"{r.vs_bnb:.2f}x", f"{r.pct_copy:.0f}%", r.timing["reps"]])
    return format_table(["impl[backend]", "op", "format", "ms", "GB/s", "vs bnb", "% copy_", "n"], rows)


def parse_shape(text: str) -> tuple[int, int]:
    try:
        a, b = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not ROWSxCOLS, e.g. 4096x4096") from None
    if a <= 0 or b <= 0 or (a * b) % (BLOCKSIZE * NESTED_BLOCKSIZE) or b % GROUP_SIZE:
        raise argparse.ArgumentTypeError(f"shape {text!r}: rows*cols must be a multiple of "
                                         f"{BLOCKSIZE * NESTED_BLOCKSIZE} and cols of {GROUP_SIZE}")
    return a, b


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench quant", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="512x512 only, few repeats (CI smoke test)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--shape", type=parse_shape, action="append", help="ROWSxCOLS, repeatable (overrides defaults)")
    p.add_argument("--results-dir", default=None, help="where quant.jsonl is appended (default bench/results)")
    args = p.parse_args(argv)

    device = torch.device(args.device) if args.device else default_device()
    plan = plan_for(args.quick, device, args.shape)
    bnbf, bnb_note = load_bnb()
    to_nf4, ao_note = load_torchao_nf4()
    ours = ops.backend(device)
    writer = RowWriter("quant", device, args.results_dir, compute_dtype=torch.bfloat16)
    print(f"# quant benchmark — {describe_machine(device)}")
    print(f"# our backend: {ours}; bf16 weights; NF4/FP4 block {BLOCKSIZE} (DQ nested {NESTED_BLOCKSIZE}); "
          f"INT-N group {GROUP_SIZE}; torch reference timed once on {', '.join('x'.join(map(str, s)) for s in plan.reference_shapes)}")
    for note in (bnb_note, ao_note):
        if note:
            print(f"# note: {note}")

    slow: set[str] = set()
    all_met = True
    for i, shape in enumerate(plan.shapes):
        results = measure_shape(shape, device, plan, i == 0, slow, bnbf, to_nf4)
        for r in results:
            writer.write(shape=list(shape), dtype="bfloat16", op=r.op, impl=r.impl, backend=r.backend, format=r.fmt,
                         double_quant=r.double_quant, blocksize=r.blocksize, ms=round(r.timing["ms"], 4),
                         ms_min=round(r.timing["ms_min"], 4), reps=r.timing["reps"], warmup=r.timing["warmup"],
                         gbps=round(r.gbps, 3), vs_bnb=None if r.vs_bnb is None else round(r.vs_bnb, 3),
                         pct_copy=round(r.pct_copy, 1),
                         copy_ms=None if r.copy_ms is None else round(r.copy_ms, 4))
        print(f"\n## {shape[0]}x{shape[1]} bf16 ({shape[0] * shape[1] * 2 / 2**20:.0f} MiB)\n")
        print(table(results))
        print()
        for name, met, detail in goals(results, ours, device.type):
            all_met &= bool(met)
            print(f"- goal {name}: {'MET' if met else 'NOT MET' if met is False else 'n/a'} — {detail}")
        sys.stdout.flush()
    print(f"\n# {len(writer.rows)} rows appended to {writer.path}; all goals met: {all_met}")
    return 0
