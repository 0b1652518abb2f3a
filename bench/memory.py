"""Bits/param from storage, per-rank bytes under ZeRO-3 (1 and 2 ranks), and the planner beside each peak.

    python -m bench memory            # SmolLM2-135M
    python -m bench memory --quick    # tiny Llama from a config (smoke test)
    python -m bench memory --dtype fp32   # compute dtype (default auto: qlora_ds.hardware.resolve_dtype's choice)

1. bits/param: ``from_pretrained`` with each base format; 8 x (bytes of every frozen tensor of the
   quantized layers: codes, absmax, nested absmax, offset / scales, zeros) / (their weights' elements).
2. ZeRO-3: ``bench/scripts/zero3_load.py`` under torchrun with 1 and 2 ranks: each rank's share of the
   quantized bytes and its RSS (CUDA: max allocated) after loading.
3. The planner (``qlora_ds.plan``, ``--device cpu`` on CPU) for the same shape: its static bytes
   next to the measured loaded bytes, and its training peak next to the measured peak of one training
   step (batch 4 x seq 128, r 16, checkpointing; ``bench train``'s worker, run here in a subprocess).
   Measured RSS peaks are minus the process's RSS before loading (the interpreter and libraries).

Every part loads and computes in one compute dtype (``--dtype``; the unquantized embeddings and norms are held in
it, so their bytes depend on it), and the planner is asked about that dtype; each row records it as
``compute_dtype``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

from bench import _train_loop as tl
from bench.common import REPO, RowWriter, default_device, describe_machine, format_table
from qlora_ds.hardware import DTYPE_CHOICES, dtype_name, resolve_dtype

MiB = 1 << 20
FORMATS = {"nf4+dq": ("qlora", dict(quant_type="nf4", double_quant=True)),
           "nf4": ("qlora", dict(quant_type="nf4", double_quant=False)),
           "fp4": ("qlora", dict(quant_type="fp4", double_quant=False)),
           "int4 g32": ("qalora", dict(bits=4)), "int3 g32": ("qalora", dict(bits=3)),
           "int2 g32": ("qalora", dict(bits=2))}
EXPECTED = {"nf4+dq": 4 + 8 / 64 + 32 / (64 * 256), "nf4": 4 + 32 / 64, "fp4": 4 + 32 / 64,
            "int4 g32": 4 + 64 / 32, "int3 g32": 3 + 64 / 32, "int2 g32": 2 + 64 / 32}


def bits_per_param(path: str, fmt: str, dtype: torch.dtype = torch.bfloat16) -> dict:
    from qlora_ds.inject import from_pretrained
    from qlora_ds.inject.replace import is_quantized_layer
    from qlora_ds.nn import QALoRAConfig, QLoRAConfig
    kind, kw = FORMATS[fmt]
    cfg = (QLoRAConfig if kind == "qlora" else QALoRAConfig)(r=16, alpha=16, dropout=0.0, compute_dtype=dtype, **kw)
    model = from_pretrained(path, cfg, torch_dtype=dtype)
    qbytes = qparams = 0
    for m in model.modules():
        if is_quantized_layer(m):
            qparams += m.weight_shape.numel()
            qbytes += sum(p.numel() * p.element_size() for n, p in m.named_parameters(recurse=False) if n != "bias")
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    lora = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return {"format": fmt, "quantized_params": qparams, "quantized_bytes": qbytes,
            "bits_per_param": 8 * qbytes / qparams, "expected_bits": EXPECTED[fmt],
            "model_bytes": total, "lora_bytes": lora, "other_bytes": total - qbytes - lora}


def run_zero3(path: str, nproc: int, tmp: str, timeout: float, dtype: str = "bf16") -> dict:
    out = os.path.join(tmp, f"zero3-{nproc}.json")
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu"),
               MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    if not torch.cuda.is_available():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
           "--master_addr=127.0.0.1", str(REPO / "bench" / "scripts" / "zero3_load.py"), path, out, dtype]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not os.path.exists(out):
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        return {"world": nproc, "error": f"exit {proc.returncode}: {tail[-1] if tail else ''}"[:300]}
    with open(out) as f:
        return json.load(f)


def planned(path: str, world: int, zero: int, device: str, batch: int = 4, seq: int = 128, dtype: str = "bf16"):
    """Planner (static, peak) for the measured setting, minus its runtime term: the measurements are taken
    relative to the process before loading. One batch width (the worker's fixed random batches)."""
    from qlora_ds.plan import PlanConfig, load_shape, plan
    cfg = PlanConfig(shape=load_shape(path), device=device, gpus_per_node=world, zero_stage=zero, micro_batch=batch,
                     seq_len=seq, grad_accum=1, lora_r=16, runtime_bytes=0, pad_multiple=seq,
                     compute_dtype=dtype)
    mem = plan(cfg).memory
    return mem.phase_bytes("static"), mem.peak


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bench memory", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default=None)
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                    help="compute dtype (auto: bf16 where native, fp16 on pre-Ampere GPUs, fp32 on CPUs without "
                         "native bf16)")
    ap.add_argument("--no-zero", action="store_true", help="skip the torchrun ZeRO-3 runs")
    ap.add_argument("--no-train", action="store_true", help="skip the measured training-step peak")
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args(argv)
    device = default_device()
    dtype = resolve_dtype(args.dtype, device)
    dname = dtype_name(dtype)
    plan_device = "cuda" if device.type == "cuda" else "cpu"
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        path = tl.model_path(args.quick, tmp, args.model)
        name = os.path.basename(os.path.normpath(path))
        print(describe_machine(device) + f"; compute {dname}", flush=True)
        writer = RowWriter("memory", device, compute_dtype=dtype)
        shape = {"model": name}

        rows = []
        for fmt in args.formats.split(","):
            r = bits_per_param(path, fmt, dtype)
            writer.write(shape=shape, kind="bits_per_param", **r)
            rows.append([fmt, f"{r['bits_per_param']:.4f}", f"{r['expected_bits']:.4f}",
                         f"{r['quantized_params'] / 1e6:.1f}", f"{r['quantized_bytes'] / MiB:.1f}",
                         f"{r['other_bytes'] / MiB:.1f}", f"{r['lora_bytes'] / MiB:.1f}"])
        print(f"\n{name}: storage of the quantized linears (bits/param) and the rest of the loaded model")
        print(format_table(["format", "bits/param", "expected", "quantized M params", "quantized MiB",
                            "unquantized (embeddings, norms) MiB", "LoRA r16 fp32 MiB"], rows))

        prow = []
        if not args.no_train:
            from bench.train import _run_variant
            targs = argparse.Namespace(model=path, batch=4, seq=32 if args.quick else 128,
                                       r=16, alpha=16, dropout=0.0, steps=1, warmup=1, seed=0, optim="torch",
                                       no_ckpt=False,
                                       timeout=args.timeout, dtype=dname)
            t = _run_variant("ours-nf4dq", targs, os.path.join(tmp, "train.json"))
            static, peak = planned(path, 1, 0, plan_device, targs.batch, targs.seq, dname)
            if "error" in t:
                print(f"training-step measurement failed: {t['error']}")
            else:
                base = 0 if device.type == "cuda" else t["rss_before_load"]
                # on CUDA peak_step is max allocated: the loaded bytes must be CUDA's too, not the process's RSS
                after = t.get("cuda_after_load") if device.type == "cuda" else None
                loaded = after if after is not None else t["rss_after_load"] - base
                stepped = t["peak_step"] - base
                # the anonymous part too (RssFile taken out; ours maps no checkpoint, so the two differ by libraries)
                has_anon = device.type != "cuda" and t.get("peak_step_anon") and t.get("rss_before_load_anon")
                anon = t["peak_step_anon"] - t["rss_before_load_anon"] if has_anon else None
                writer.write(shape={**shape, "batch": targs.batch, "seq": targs.seq, "r": 16, "grad_ckpt": True},
                             kind="train_peak_vs_plan", world=1, zero_stage=0, measured_loaded=loaded,
                             measured_peak=stepped, measured_peak_anon=anon, planned_static=static, planned_peak=peak,
                             peak_ratio=stepped / peak, plan_device=plan_device, compute_dtype=t.get("compute_dtype"))
                prow.append(["1 rank, no ZeRO, train step", f"{loaded / MiB:.0f}", f"{static / MiB:.0f}",
                             f"{stepped / MiB:.0f}", f"{peak / MiB:.0f}", f"{stepped / peak:.2f}"])

        zrows = []
        if not args.no_zero:
            for nproc in (1, 2):
                z = run_zero3(path, nproc, tmp, args.timeout, dname)
                static, peak = planned(path, nproc, 3, plan_device, 4, 32 if args.quick else 128, dname)
                if "error" in z:
                    print(f"ZeRO-3 x{nproc}: {z['error']}")
                    writer.write(shape=shape, kind="zero3_load", world=nproc, error=z["error"])
                    continue
                for rk in z["ranks"]:
                    base = 0 if device.type == "cuda" else rk["rss_before"]
                    writer.write(shape=shape, kind="zero3_load", world=nproc, **rk, planned_static=static,
                                 planned_peak=peak)
                    zrows.append([nproc, rk["rank"], f"{rk['quantized_local'] / MiB:.2f}",
                                  f"{rk['quantized_full'] / MiB:.2f}", f"{rk['quantized_local'] / rk['quantized_full']:.3f}",
                                  f"{rk['params_local_bytes'] / MiB:.1f}", f"{(rk['peak_load'] - base) / MiB:.0f}",
                                  f"{static / MiB:.0f}"])
                prow.append([f"{nproc} rank(s), ZeRO-3, load only", "see below", f"{static / MiB:.0f}", "-",
                             f"{peak / MiB:.0f}", "-"])
        if prow:
            print(f"\nplanner (--device {plan_device}, batch 4 x seq {32 if args.quick else 128}, r 16, grad ckpt, "
                  f"{dname}) vs measured "
                  f"({'CUDA MiB' if device.type == 'cuda' else 'RSS MiB minus pre-load RSS'})")
            print(format_table(["setting", "measured after load", "planned static", "measured peak",
                                "planned peak", "measured/planned peak"], prow))
        if zrows:
            print("\nZeRO-3 per rank after from_pretrained")
            print(format_table(["ranks", "rank", "quantized MiB held", "quantized MiB full", "share",
                                "all params MiB held", "load peak MiB (minus pre-load)", "planned static MiB"], zrows))
        print(f"rows appended to {writer.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
