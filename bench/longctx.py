"""Long sequences: training-step peak and time of ours (chunked LM-head loss) vs transformers + bitsandbytes + PEFT.

    python -m bench longctx                    # SmolLM2-135M, seq 2048, batch 1, grad checkpointing, both variants
    python -m bench longctx --search           # + the longest seq each trains at (doubling, per-run timeout)
    python -m bench longctx --quick            # tiny Llama, seq 256 (smoke test)

Variants, each in its own subprocess (its peak is its own), same r 16 / α 16 / dropout 0 on every linear but the
LM head, non-reentrant checkpointing, torch AdamW, random tokens all labelled (no prompt: the chunked loss gets no
help from response-only labels), in the machine's compute dtype (``qlora_ds.hardware.resolve_dtype("auto")``):
``ours`` (``qlora_ds.from_pretrained`` NF4 + DQ, ``qlora_ds.loss.causal_lm_loss``), ``ours-full-logits`` (the same
model, the model's own loss) and ``bnb-peft`` (BitsAndBytesConfig NF4 + DQ + PEFT LoRA, the model's own loss).
``peak_step``: the RSS high-water mark over the timed steps (reset after warm-up; CUDA: max allocated);
``peak_step_over_loaded``: that minus the memory held right after loading. On the CPU also ``peak_step_anon``
(minus the file-backed pages resident at the end, ``peak_step_rss_file``: transformers keeps bnb's checkpoint mapped,
ours maps none; ``bench.common.peak_fields``), the figure to compare ours with bnb on. The planner's transient terms
(activations + logits/loss) for the same setting are printed beside ours.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from bench import _train_loop as tl
from bench.common import REPO, RowWriter, default_device, describe_machine, format_table, peak_fields

MiB = 1 << 20
VARIANTS = ("ours", "ours-full-logits", "bnb-peft")


def _build(variant: str, path: str, dtype: torch.dtype, device):
    if variant.startswith("ours"):
        from qlora_ds.inject import from_pretrained
        from qlora_ds.nn import QLoRAConfig
        cfg = QLoRAConfig(quant_type="nf4", double_quant=True, r=16, alpha=16, dropout=0.0, compute_dtype=dtype)
        model = from_pretrained(path, cfg, torch_dtype=dtype).to(device)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
        base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=q,
                                                    device_map={"": device.index or 0} if device.type == "cuda"
                                                    else "cpu")
        for p in base.parameters():
            p.requires_grad_(False)
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(base, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, bias="none",
                                                target_modules=tl.LORA_TARGETS, task_type="CAUSAL_LM"))
    model.config.use_cache = False
    return model.train()


def worker(args) -> dict:
    from qlora_ds.hardware import resolve_dtype
    from qlora_ds.loss import causal_lm_loss

    device = default_device()
    dtype = resolve_dtype("auto", device)
    torch.manual_seed(0)
    model = _build(args.worker, args.model, dtype, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    vocab = model.get_input_embeddings().weight.shape[0]
    batch = {k: v.to(device) for k, v in tl.random_batch(vocab, 1, args.seq).items()}
    chunked = args.worker == "ours"

    def step() -> float:
        tl._sync(device)
        t0 = time.perf_counter()
        loss = causal_lm_loss(model, batch, chunked=chunked) if chunked else model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tl._sync(device)
        if not torch.isfinite(loss):
            raise RuntimeError(f"loss {loss.item()}")
        return time.perf_counter() - t0

    loaded = tl.rss() if device.type == "cpu" else torch.cuda.memory_allocated()
    step()                                       # warm-up: kernels, optimizer state
    before = tl.rss() if device.type == "cpu" else torch.cuda.memory_allocated()
    tl.reset_peak()
    times = [step() for _ in range(args.steps)]
    peak = tl.peak_rss() if device.type == "cpu" else tl.cuda_peak()
    anon = peak_fields("peak_step", peak) if device.type == "cpu" else {}
    # peak_step: the high-water mark during the timed steps, absolute; peak_step_over_loaded: minus the memory
    # held once the model was loaded (the step's own activations, logits, optimizer state, allocator slack)
    return {"variant": args.worker, "seq": args.seq, "dtype": str(dtype).replace("torch.", ""),
            "step_s": statistics.median(times), "step_s_all": times, "peak_step": peak, **anon,
            "peak_step_over_loaded": peak - loaded, "rss_after_load": loaded, "rss_before": before,
            "peak_kind": "rss_hwm" if device.type == "cpu" else "cuda_max_allocated", "device": device.type}


def run_variant(variant: str, model: str, seq: int, steps: int, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "bench.longctx", "--worker", variant, "--model", model, "--seq", str(seq),
           "--steps", str(steps)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"variant": variant, "seq": seq, "error": f"timeout after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        why = "killed (out of memory?)" if proc.returncode in (-9, 137) else (tail[-1] if tail else "")
        return {"variant": variant, "seq": seq, "error": f"exit {proc.returncode}: {why}"[:300],
                "wall_s": time.perf_counter() - t0}
    return {**json.loads(lines[-1]), "wall_s": time.perf_counter() - t0}


def planned_peak(model: str, seq: int, chunked: bool) -> float | None:
    """The host planner's step peak above the loaded model for a step after the first (``plan/host.py``: tensors,
    phases, heap slack) — what ``peak_step_over_loaded`` measures."""
    from transformers import AutoConfig

    from qlora_ds.hardware import resolve_dtype
    from qlora_ds.plan import host
    try:
        cfg = AutoConfig.from_pretrained(model).to_dict()
        dtype = "fp32" if resolve_dtype("auto") == torch.float32 else "bf16"
        return host.estimate_first_step(cfg, dtype, seq, chunked_loss=chunked, later=True).over_loaded()
    except Exception:   # noqa: BLE001 - a model the planner cannot model: no column
        return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--model", default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--variants", nargs="*", default=list(VARIANTS))
    p.add_argument("--search", action="store_true", help="double seq from --seq until a run fails or times out")
    p.add_argument("--search-max", type=int, default=65536)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per subprocess")
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return 0
    model = tl.model_path(args.quick, given=args.model)
    seq = args.seq or (256 if args.quick else 2048)
    from qlora_ds.hardware import resolve_dtype

    rows = []
    device = default_device()
    writer = RowWriter("longctx", device, compute_dtype=resolve_dtype("auto", device))
    print(describe_machine(device), flush=True)
    for v in args.variants:
        r = run_variant(v, model, seq, args.steps, args.timeout)
        r["planned_peak"] = planned_peak(model, seq, v == "ours") if v.startswith("ours") else None
        rows.append(r)
        writer.write(**r)
        print(json.dumps(r), flush=True)
    if args.search:
        for v in args.variants:
            s = seq * 2
            while s <= args.search_max:
                r = run_variant(v, model, s, 1, args.timeout)
                r["planned_peak"] = planned_peak(model, s, v == "ours") if v.startswith("ours") else None
                r["search"] = True
                rows.append(r)
                writer.write(**r)
                print(json.dumps(r), flush=True)
                if "error" in r:
                    break
                s *= 2
    table = [[r["variant"], r["seq"], r.get("dtype", ""), f"{r['step_s']:.2f}" if "step_s" in r else r.get("error"),
              f"{r['peak_step'] / MiB:.0f}" if "peak_step" in r else "",
              f"{r['peak_step_anon'] / MiB:.0f}" if "peak_step_anon" in r else "",
              f"{r['peak_step_over_loaded'] / MiB:.0f}" if "peak_step_over_loaded" in r else "",
              f"{r['planned_peak'] / MiB:.0f}" if r.get("planned_peak") else ""] for r in rows]
    print(format_table(["variant", "seq", "dtype", "step s", "peak step MiB", "anon peak MiB (minus RssFile)",
                        "over loaded MiB",
                        "planned over loaded MiB"], table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
