"""The summary table of a scripts/gpu_check.sh results directory (steps, headline, benchmarks) as Markdown.

    python scripts/gpu/summarize.py RESULTS_DIR [--elapsed SECONDS]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from bench.common import format_table  # noqa: E402

GiB = 1 << 30
MiB = 1 << 20
PLANNER_GOAL = 0.15     # the goal: the planner within 15 % of the measured peak


def _jsonl(path: str) -> list[dict]:
    rows = []
    if os.path.exists(path):
        with open(path) as fh:
            for line in fh:
                line = line.strip()
                if line:
                    try:
                        rows.append(json.loads(line))
                    except ValueError:
                        rows.append({"bench": "unreadable", "line": line[:200]})
    return rows


def _json(path: str):
    """A JSON file's object, None where it is missing; a file cut short (its step killed while writing) or otherwise
    unreadable gives ``{"unreadable": reason}``, so that the summary is still written."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError) as err:
        return {"unreadable": f"{os.path.basename(path)}: {type(err).__name__}: {err}"[:300]}


def _num(v, fmt="{:.2f}"):
    return fmt.format(v) if isinstance(v, (int, float)) else ("" if v is None else str(v))


def header(env: dict, elapsed: int | None) -> list[str]:
    v = env.get("versions", {})
    lines = ["# GPU check (scripts/gpu_check.sh)", "",
             f"- device: {env.get('gpu', 'no GPU (CPU: ' + str(env.get('cpu')) + ', ' + str(env.get('cpu_isa')) + ')')}"
             f", capability {env.get('capability')}, {env.get('gpu_memory_gib', '?')} GiB, driver {env.get('driver')}, "
             f"CUDA (torch) {env.get('torch_cuda')}, nvcc {env.get('nvcc')}",
             "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
             f"- python {env.get('python')}, commit {env.get('commit')}"
             + (f", total {elapsed} s" if elapsed is not None else "")]
    if isinstance(env.get("build"), dict):          # what a failed CUDA build is read against
        lines.append("- build: " + ", ".join(f"{k} {val}" for k, val in env["build"].items() if val))
    if env.get("unreadable"):
        lines.append(f"- env.json unreadable ({env['unreadable']})")
    lines.append("")
    return lines


def steps_table(steps: list[dict]) -> list[str]:
    rows = [[s.get("step", "?"), s.get("rc", ""), s.get("seconds", ""), s.get("budget_s", ""),
             "timed out" if s.get("timed_out") else s.get("note", s.get("line", ""))]
            for s in steps]
    return ["## Steps", "", format_table(["step", "exit", "s", "budget s", "note"], rows), ""]


def headline_table(rows: list[dict]) -> list[str]:
    out = []
    expanded = []
    for r in rows:              # a run's long-sequence step (headline.py --long-seq) is a row of its own, under its run
        expanded.append(r)
        if r.get("long_seq"):
            expanded.append({**r, **r["long_seq"], "shape": f"{r.get('shape')} + chunked loss", "build_s": None})
    for r in expanded:
        meas, plan = r.get("measured_peak_bytes"), r.get("planned_compared_bytes")
        ratio = plan / meas if meas and plan else None
        out.append([r.get("shape"), _num(r.get("params_b")), r.get("seq"), r.get("r"), r.get("dtype"),
                    _num(meas / GiB if meas else None), _num(plan / GiB if plan else None),
                    r.get("planned_compared", ""), _num(ratio, "{:.3f}"),
                    ("yes" if ratio and abs(ratio - 1) <= PLANNER_GOAL else "no") if ratio else "",
                    _num(r.get("cap_gib"), "{:g}"), {True: "yes", False: "NO"}.get(r.get("fits_cap"), ""),
                    _num(r.get("step_s")), _num(r.get("build_s"), "{:.1f}"), r.get("quant_backend", ""),
                    (r.get("error") or "")[:80]])
    return ["## Headline: one QLoRA step (NF4+DQ, r 64 all linears, grad ckpt, paged AdamW), random weights", "",
            format_table(["shape", "params B", "seq", "r", "dtype", "peak GiB", "planned GiB", "planned term",
                          "planned/measured", "within 15%", "cap GiB", "fits", "step s", "build s", "quant ops",
                          "error"], out), ""]


def fp16_table(rows: list[dict]) -> list[str]:
    """scripts/gpu/fp16.py's rows: one per ZeRO stage that ended (a stage killed with its step has none)."""
    fp16 = [r for r in rows if r.get("bench") == "fp16"]
    if not fp16:
        return []
    checks = lambda r: ", ".join(k for k, v in (r.get("checks") or {}).items() if not v)  # noqa: E731
    return ["## fp16 under DeepSpeed (scripts/gpu/fp16.py)", "", format_table(
        ["ZeRO", "ok", "optimizer", "initial scale", "failed checks", "error"],
        [[r.get("stage"), r.get("ok"), r.get("inner") or r.get("optimizer", ""), r.get("scale", ""), checks(r),
          (r.get("error") or r.get("note") or "")[:80]] for r in fp16]), ""]


def unfinished_headlines(steps: list[dict]) -> list[str]:
    """Headline steps that ended without success: a killed or crashed process wrote no row, so say which."""
    bad = [s for s in steps if str(s.get("step", "")).startswith("headline") and s.get("rc") != 0]
    return [f"- {s.get('step')}: exit {s.get('rc')}{' (timed out)' if s.get('timed_out') else ''}"
            f"{': ' + s['note'] if s.get('note') else ''} (its row, if any, is in the table below)" for s in bad] \
        + ([""] if bad else [])


def bench_tables(rows: list[dict]) -> list[str]:
    out = []
    quant = [r for r in rows if r.get("bench") == "quant"]
    if quant:
        out += ["## bench quant", "", format_table(
            ["shape", "op", "impl", "format", "dq", "ms", "GB/s", "vs bnb", "% of copy_"],
            [[r.get("shape"), r.get("op"), r.get("impl"), r.get("format"), r.get("double_quant"), _num(r.get("ms"), "{:.3f}"),
              _num(r.get("gbps")), _num(r.get("vs_bnb")), _num(r.get("pct_copy"), "{:.1f}")] for r in quant]), ""]
    layer = [r for r in rows if r.get("bench") == "layer"]
    if layer:
        out += ["## bench layer (fwd+bwd)", "", format_table(
            ["shape", "tokens", "dtype", "dense LoRA ms", "qlora_ds ms", "bnb+PEFT ms", "ours/dense", "ours/bnb", "error"],
            [[r.get("shape"), r.get("tokens"), r.get("dtype"), _num(r.get("dense_lora_ms"), "{:.3f}"),
              _num(r.get("qlora_ds_ms"), "{:.3f}"), _num(r.get("bnb_peft_ms"), "{:.3f}"), _num(r.get("ratio_vs_dense")),
              _num(r.get("ratio_vs_bnb")),
              "; ".join(str(r[k])[:60] for k in r if k.endswith("_error"))] for r in layer]), ""]
    train = [r for r in rows if r.get("bench") == "train"]
    if train:
        out += ["## bench train (one step: fwd + bwd + clip + AdamW)", "", format_table(
            ["model", "batch x seq", "variant", "tok/s", "peak MiB", "peak kind", "ours speedup", "error"],
            [[r.get("shape", {}).get("model"), f"{r.get('shape', {}).get('batch')} x {r.get('shape', {}).get('seq')}",
              r.get("variant"), _num(r.get("tokens_per_s"), "{:.0f}"),
              _num(r["peak_step"] / MiB if isinstance(r.get("peak_step"), (int, float)) else None, "{:.0f}"),
              r.get("peak_step_kind", ""), _num(r.get("ours_speedup")), (r.get("error") or "")[:60]] for r in train]), ""]
    return out


def paging_lines(res: str) -> list[str]:
    data = _json(os.path.join(res, "paging.json"))
    if data is None:
        return []
    text = json.dumps(data, indent=1)
    return ["## Paged optimizer (tests/scripts/optim_gpu_paging.py)", "", "```", text[:3000], "```", ""]


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("results")
    p.add_argument("--elapsed", type=int, default=None)
    args = p.parse_args(argv)
    env = _json(os.path.join(args.results, "env.json"))
    env = env if isinstance(env, dict) else {}
    rows = _jsonl(os.path.join(args.results, "rows.jsonl"))
    steps = _jsonl(os.path.join(args.results, "steps.jsonl"))
    lines = header(env, args.elapsed) + steps_table(steps)
    lines += bench_tables(rows) + fp16_table(rows) + paging_lines(args.results) + unfinished_headlines(steps)
    lines += headline_table([r for r in rows if r.get("bench") == "headline"])   # last: the reply's output tail
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
