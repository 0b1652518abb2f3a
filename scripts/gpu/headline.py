"""The paper's headline, measured: a LLaMA-shaped model with random weights, quantized layer by layer straight onto
the device (no checkpoint), one real QLoRA training step, peak memory beside the planner's prediction.

    python scripts/gpu/headline.py --shape llama-65b --cap-gib 48             # on a GPU (the paper: < 48 GB)
    python scripts/gpu/headline.py --shape llama-7b --layers 2 --hidden 64 --ffn 172 --heads 4 --vocab 512 \\
        --seq 32 --device cpu                                                 # the same code at a tiny shape
    python scripts/gpu/headline.py --shape llama-7b --long-seq 8192        # + one step at 8192 tokens, chunked loss

Settings are the QLoRA recipe's: NF4 + double quantization, LoRA r 64 (α 16) on all linear layers, dropout 0.05
above 20B parameters else 0.1, gradient checkpointing (non-reentrant), paged AdamW (32-bit state), batch 1,
sequence 512, gradient clipping 0.3. The planner (``qlora_ds.plan``) gets the same settings (ZeRO-0, one GPU,
runtime term 0 on CUDA, where ``max_memory_allocated`` leaves out the context; on CPU the RSS before the model). On CUDA the paged optimizer state lives in
managed memory, which ``max_memory_allocated`` does not count, so the planner's ``required`` (peak minus spillable)
is compared; where managed memory is unusable the state is plain device memory and its ``peak`` is compared.

The process is capped at ``--cap-gib`` (``torch.cuda.set_per_process_memory_fraction``): an out-of-memory error
is a result ("does not fit"), written as a row like any other. One JSONL row per run (``--results-dir``), with
the machine, versions and commit; exit status 0 when the step ran, 1 otherwise.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

GiB = 1 << 30
MiB = 1 << 20


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-65b",
                   help="a planner preset (llama-7b, -13b, -33b, -65b, …), or several separated by commas")
    p.add_argument("--layers", type=int, help="override the preset's layer count")
    p.add_argument("--hidden", type=int, help="override hidden size")
    p.add_argument("--ffn", type=int, help="override the MLP width (intermediate size)")
    p.add_argument("--heads", type=int, help="override attention heads (and key/value heads)")
    p.add_argument("--vocab", type=int, help="override vocabulary size")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--r", type=int, default=64)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--dropout", type=float, default=None, help="default: 0.05 above 20B parameters, else 0.1")
    p.add_argument("--cap-gib", type=float, default=48.0, help="CUDA memory cap of this process (GiB)")
    p.add_argument("--device", default="auto", help="auto (the GPU if any), cuda, cuda:N or cpu")
    p.add_argument("--dtype", default="auto", help="compute dtype: auto, bf16, fp16, fp32")
    p.add_argument("--long-seq", type=int, default=0,
                   help="after the step, one more at this length with the chunked LM-head loss (issue 17 §3); 0: none")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results-dir", default=None, help="where headline.jsonl is appended (default bench/results)")
    return p.parse_args(argv)


def model_shape(args):
    from qlora_ds.plan import load_shape

    shape = load_shape(args.shape)
    over = {k: v for k, v in (("layers", args.layers), ("hidden", args.hidden), ("intermediate", args.ffn),
                              ("heads", args.heads), ("kv_heads", args.heads), ("vocab", args.vocab)) if v}
    if over:
        shape = dataclasses.replace(shape, name=f"{shape.name}-shaped(" + ",".join(f"{k}={v}" for k, v in over.items())
                                    + ")", **over)
    return shape


def hf_config(shape):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                       num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                       num_key_value_heads=shape.kv_heads, max_position_embeddings=max(2048, shape.max_positions),
                       tie_word_embeddings=shape.tie_embeddings, use_cache=False)


def build(shape, config, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    """A LlamaForCausalLM skeleton on meta, QLoRA layers injected, then filled module by module on ``device``:
    each base weight is drawn there in 16 bit (std 0.02), quantized there, and dropped before the next."""
    from accelerate import init_empty_weights
    from transformers import LlamaForCausalLM

    from qlora_ds.inject import inject
    from qlora_ds.nn import QLoRALinear
    from qlora_ds.quant import quantize

    with init_empty_weights(include_buffers=False):
        model = LlamaForCausalLM(hf_config(shape))
    inject(model, config)
    gen = torch.Generator(device=device).manual_seed(seed)
    for module in model.modules():
        if isinstance(module, QLoRALinear):
            w = torch.empty(module.weight_shape, device=device, dtype=torch.bfloat16).normal_(0, 0.02, generator=gen)
            module.set_quantized_weight(quantize(w, "nf4", 64, double_quant=True), None)
            del w
            for sub in (module.lora_A, module.lora_B):
                sub.to_empty(device=device)
            module.reset_lora_parameters()
            continue
        for name, p in list(module._parameters.items()):
            if p is None or not p.is_meta:             # LoRA A/B: filled with their layer above
                continue
            t = torch.empty(p.shape, device=device, dtype=dtype)
            if name == "weight" and p.dim() == 1:
                t.fill_(1.0)                                   # RMSNorm
            else:
                t.normal_(0, 0.02, generator=gen)              # embeddings, lm_head
            module._parameters[name] = nn.Parameter(t, requires_grad=False)
    if shape.tie_embeddings:
        model.tie_weights()
    model.to(device)                                           # buffers (rotary inv_freq) were built on the CPU
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise RuntimeError(f"left on meta: {still_meta[:3]}")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model.train()


def planned(shape, args, dropout: float, device: torch.device, dtype: torch.dtype, managed: bool, runtime: int = 0,
            seq: int | None = None, chunked_loss: bool = False) -> dict:
    from qlora_ds.hardware import dtype_name
    from qlora_ds.plan import PlanConfig, estimate_memory

    cfg = PlanConfig(shape=shape, gpus_per_node=1, gpu_mem_bytes=int(args.cap_gib * GiB), seq_len=seq or args.seq,
                     micro_batch=args.batch, grad_accum=1, zero_stage=0, lora_r=args.r, lora_dropout=dropout,
                     grad_ckpt=True, paged=True, device=device.type, runtime_bytes=runtime, chunked_loss=chunked_loss,
                     compute_dtype=dtype_name(dtype))
    mem = estimate_memory(cfg)
    compare = mem.required if (device.type == "cuda" and managed) else mem.peak
    return {"planned_peak_bytes": int(mem.peak), "planned_required_bytes": int(mem.required),
            "planned_compared_bytes": int(compare), "planned_compared": "required" if compare == mem.required
            else "peak", "planned_fits": bool(mem.fits),
            "planned_items_mib": {it.name: round(it.bytes / MiB, 1) for it in mem.items}}


def cap_memory(device: torch.device, cap_gib: float) -> float:
    """Cap this process's CUDA caching allocator at ``cap_gib`` GiB on ``device``; returns the fraction set.
    ``torch.cuda.set_per_process_memory_fraction`` wants an index: a bare ``cuda`` (what ``--device cuda`` resolves
    to) raises ValueError there, so the current device stands in for it."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    fraction = min(1.0, cap_gib * GiB / torch.cuda.get_device_properties(index).total_memory)
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    return fraction


def run(args) -> dict:
    from bench.common import RowWriter
    from qlora_ds.hardware import dtype_name, resolve_device, resolve_dtype
    from qlora_ds.memstats import peak_rss, reset_peak, rss
    from qlora_ds.nn import QLoRAConfig
    from qlora_ds.optim import PagedAdamW
    from qlora_ds.optim.page_manager import managed_memory_usable

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    shape = model_shape(args)
    dropout = args.dropout if args.dropout is not None else (0.05 if shape.total_params > 20e9 else 0.1)
    cuda = device.type == "cuda"
    row = {"shape": shape.name, "layers": shape.layers, "hidden": shape.hidden, "ffn": shape.intermediate,
           "heads": shape.heads, "vocab": shape.vocab, "params_b": round(shape.total_params / 1e9, 3),
           "seq": args.seq, "batch": args.batch, "r": args.r, "alpha": args.alpha, "dropout": dropout,
           "dtype": dtype_name(dtype), "grad_ckpt": True, "optimizer": "qlora_ds.PagedAdamW",
           "cap_gib": args.cap_gib if cuda else None}
    if cuda:
        cap_memory(device, args.cap_gib)
        row.update(gpu=torch.cuda.get_device_name(device), capability=list(torch.cuda.get_device_capability(device)),
                   cuda=torch.version.cuda, driver=_driver(), gpu_total_gib=round(
                       torch.cuda.get_device_properties(device).total_memory / GiB, 1))
    from qlora_ds import ops
    row["quant_backend"] = ops.backend(device)
    writer = RowWriter("headline", device, args.results_dir)
    runtime = 0 if cuda else rss()      # CPU: the planner's runtime term is what the process holds before the model
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    stage = "build"
    managed = cuda                  # until the optimizer says (the planner's compared term in an out-of-memory row)
    try:
        cfg = QLoRAConfig(r=args.r, alpha=args.alpha, dropout=dropout, compute_dtype=dtype)
        model = build(shape, cfg, device, dtype, args.seed)
        _sync(device)
        row["build_s"] = round(time.perf_counter() - t0, 2)
        row["build_peak_bytes"] = torch.cuda.max_memory_allocated(device) if cuda else peak_rss()
        row["after_build_bytes"] = torch.cuda.memory_allocated(device) if cuda else rss()
        params = [p for p in model.parameters() if p.requires_grad]
        row["lora_params"] = sum(p.numel() for p in params)
        stage = "optimizer"
        opt = PagedAdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0)
        managed = bool(cuda and managed_memory_usable(device))
        row["paged_managed_memory"] = managed
        ids = torch.randint(0, shape.vocab, (args.batch, args.seq), device=device,
                            generator=torch.Generator(device=device).manual_seed(args.seed + 1))
        reset_peak()
        if cuda:                    # reset_peak() resets the current device only; the peak is read on ``device``
            torch.cuda.reset_peak_memory_stats(device)
        stage = "step"
        t1 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        row["step_s"] = round(time.perf_counter() - t1, 3)
        # the state is allocated by the first step(): where cudaMallocManaged was refused then (page_manager.
        # _managed_alloc_refused), it is plain device memory that max_memory_allocated counts: compare the peak
        pm = getattr(opt, "page_manager", None)
        managed = bool(managed and pm is not None and pm._managed())
        row["paged_managed_memory"] = managed
        row["loss"] = loss.item()
        row["tokens_per_s"] = round(args.batch * args.seq / row["step_s"], 1)
        row["measured_peak_bytes"] = torch.cuda.max_memory_allocated(device) if cuda else peak_rss()
        row["measured_peak_kind"] = "cuda_max_memory_allocated" if cuda else "rss_hwm"
        stats = opt.page_manager.stats if hasattr(opt, "page_manager") else None
        if stats is not None:
            row["paging"] = dataclasses.asdict(stats) if dataclasses.is_dataclass(stats) else str(stats)
        row.update(planned(shape, args, dropout, device, dtype, managed, runtime))
        row["planned_over_measured"] = round(row["planned_compared_bytes"] / row["measured_peak_bytes"], 3)
        row["fits_cap"] = (not cuda) or row["measured_peak_bytes"] <= args.cap_gib * GiB
        row["ok"] = math.isfinite(row["loss"])
        if args.long_seq:
            stage = "long-sequence step"
            row["long_seq"] = long_step(model, params, opt, shape, args, dropout, device, dtype, managed, runtime)
    except torch.cuda.OutOfMemoryError as err:
        row.update(ok=False, fits_cap=False, error=f"out of memory during {stage}: {str(err)[:300]}",
                   measured_peak_bytes=torch.cuda.max_memory_allocated(device))
        row.update(planned(shape, args, dropout, device, dtype, managed))
    except Exception as err:  # noqa: BLE001 - a failed step is a result: record it, exit 1
        row.update(ok=False, error=f"{type(err).__name__} during {stage}: {str(err)[:500]}")
    row["wall_s"] = round(time.perf_counter() - t0, 2)
    writer.write(**row)
    print(summary_line(row), flush=True)
    return row


def long_step(model, params, opt, shape, args, dropout: float, device, dtype: torch.dtype, managed: bool,
              runtime: int) -> dict:
    """One more training step at ``--long-seq`` tokens with the chunked LM-head loss (``qlora_ds.loss``): its time, its
    peak beside the planner's (same settings, ``chunked_loss``); out of memory is a result, not a crash."""
    from qlora_ds.loss import causal_lm_loss
    from qlora_ds.memstats import peak_rss, reset_peak

    cuda = device.type == "cuda"
    out = {"seq": args.long_seq, "loss_fn": "qlora_ds.loss.causal_lm_loss (chunked)"}
    ids = torch.randint(0, shape.vocab, (args.batch, args.long_seq), device=device,
                        generator=torch.Generator(device=device).manual_seed(args.seed + 2))
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    reset_peak()
    t = time.perf_counter()
    try:
        loss = causal_lm_loss(model, {"input_ids": ids, "labels": ids})
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        out.update(step_s=round(time.perf_counter() - t, 3), loss=loss.item(), ok=math.isfinite(loss.item()))
        out["tokens_per_s"] = round(args.batch * args.long_seq / out["step_s"], 1)
    except torch.cuda.OutOfMemoryError as err:
        out.update(ok=False, error=f"out of memory: {str(err)[:300]}")
    out["measured_peak_bytes"] = torch.cuda.max_memory_allocated(device) if cuda else peak_rss()
    plan = planned(shape, args, dropout, device, dtype, managed, runtime, seq=args.long_seq, chunked_loss=True)
    out.update(planned_compared_bytes=plan["planned_compared_bytes"], planned_compared=plan["planned_compared"],
               planned_over_measured=round(plan["planned_compared_bytes"] / out["measured_peak_bytes"], 3))
    out["fits_cap"] = bool(out.get("ok")) and ((not cuda) or out["measured_peak_bytes"] <= args.cap_gib * GiB)
    return out


def _driver() -> str | None:
    import subprocess
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
        return out.splitlines()[0] if out else None
    except (OSError, subprocess.SubprocessError):
        return None


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summary_line(row: dict) -> str:
    if "measured_peak_bytes" not in row or "planned_compared_bytes" not in row:
        return f"{row['shape']}: FAILED {row.get('error', '')}"
    meas, plan = row["measured_peak_bytes"] / GiB, row["planned_compared_bytes"] / GiB
    text = (f"{row['shape']} ({row['params_b']}B params, seq {row['seq']}, r {row['r']}, {row['dtype']}): "
            f"peak {meas:.2f} GiB measured vs {plan:.2f} GiB planned ({row['planned_compared']}; planned/measured "
            f"{plan / meas:.3f})")
    if row.get("cap_gib"):
        text += f", cap {row['cap_gib']:g} GiB: {'fits' if row.get('fits_cap') else 'DOES NOT FIT'}"
    if "step_s" in row:
        text += f", step {row['step_s']:.2f} s, build {row['build_s']:.1f} s"
    long = row.get("long_seq")
    if long:
        text += (f"; seq {long['seq']} (chunked loss): peak {long['measured_peak_bytes'] / GiB:.2f} GiB vs "
                 f"{long['planned_compared_bytes'] / GiB:.2f} planned ({long['planned_over_measured']:.3f})"
                 + (f", step {long['step_s']:.2f} s" if long.get("ok") else f" FAILED {long.get('error', '')}"))
    return text + ("" if row.get("ok") else f"  FAILED {row.get('error', '')}")


def main(argv=None) -> int:
    """``--shape a,b,…`` runs the shapes one after another in this process (the dry run); the GPU check starts one
    process per shape, so that each peak and each out-of-memory is its own."""
    import gc

    args = parse_args(argv)
    ok = True
    for name in args.shape.split(","):
        ok &= bool(run(argparse.Namespace(**{**vars(args), "shape": name})).get("ok"))
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
