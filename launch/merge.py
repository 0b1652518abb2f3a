"""Merge a trained adapter into its base and verify the merged model against base + adapter.

    python launch/merge.py --run runs/demo --out runs/demo/merged                   # bf16 safetensors
    python launch/merge.py --run runs/qalora --out runs/qalora/gptq --format gptq   # QA-LoRA -> INT-N GPTQ
    python launch/merge.py --run runs/demo --out runs/demo/gptq --format gptq --calibration data.jsonl  # QLoRA -> GPTQ
    python launch/merge.py --model DIR --adapter DIR [--method qlora|qalora …] --out DIR

Reads top to bottom: parse arguments once, then ``merge(args)``: load the quantized base with the
adapter on ``--device`` (default: the local GPU if any) computing in ``--dtype`` (the reference; ``auto``
= bf16 where native, fp32 on CPUs without native bf16), take its logits on a few prompts, merge layer by
layer (each merged weight computed in fp32; on a GPU each merged layer goes to the host as it is built, so the
device never holds the 16-bit model), write the checkpoint into a temporary sibling of ``--out``, reload it on the
same device (the CPU where it does not fit there) in the same dtype (bf16: plain transformers; gptq: our INT-N
reader, as no GPTQ kernel runs on CPU), compare logits, and only then move it into ``--out``. Exit status 1 when
the difference is above tolerance, with ``--out`` left as it was (a previous merge there stays):

* bf16: every merged weight is rounded once to bf16 (relative error ≤ 2^-8 per weight); through the
  network that gives logits within ``--tol`` = 2^-5 of max|logit| in fp32 (measured ~3·2^-8 on tiny
  Llamas). Computing in bf16/fp16 adds the activations' rounding on both sides: 2^-4 / 2^-5.
* gptq: the reader rebuilds the merged model exactly (codes + fp32 scales/zeros), so in fp32 the
  tolerance is fp32 rounding: 1e-4 relative (bf16/fp16 compute: 2^-4 / 2^-6). What a GPTQ kernel sees
  (integer zeros, fp16 scales) is reported alongside; it differs by up to scale/2 per weight where the
  merge moved a zero point.
* gptq from a QLoRA run (``--calibration``): the merged weights are GPTQ-quantized (INT ``--gptq-bits``,
  group ``--gptq-group-size``, act-order off, true-sequential) on the calibration records; the check is
  then the written checkpoint against the in-memory GPTQ model (same tolerance), and the logit change
  that GPTQ itself made against base + adapter is reported as ``gptq_vs_adapter``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import torch

from qlora_ds.cli import add_adapter_format_args, add_device_args, run_main, source_overrides
from qlora_ds.errors import QLoRADSError

log = logging.getLogger("merge")
PROMPTS = ("What is AI?", "Write a haiku about the sea.", "List three prime numbers.")
TOLERANCE = {("bf16", torch.float32): 2 ** -5, ("gptq", torch.float32): 1e-4,      # (format, compute dtype)
             ("bf16", torch.bfloat16): 2 ** -4, ("gptq", torch.bfloat16): 2 ** -4,
             ("bf16", torch.float16): 2 ** -5, ("gptq", torch.float16): 2 ** -6}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="finetune output dir (run_config.json + adapter/)")
    p.add_argument("--model", help="base checkpoint dir (default: the run's)")
    p.add_argument("--adapter", help="PEFT-format adapter dir (default: <run>/adapter)")
    p.add_argument("--out", required=True, help="output dir (empty, new, or a previous merge)")
    p.add_argument("--format", choices=["bf16", "gptq"], default="bf16",
                   help="bf16 safetensors (any adapter) or INT-N GPTQ layout (QA-LoRA: exact; QLoRA: GPTQ-quantized "
                        "on --calibration records)")
    p.add_argument("--tol", type=float, default=None, help="max relative logit difference (default per format)")
    p.add_argument("--no-verify", dest="verify", action="store_false")
    g = p.add_argument_group("GPTQ deployment of a QLoRA adapter (--format gptq)")
    g.add_argument("--calibration", help="calibration records (.jsonl/.json/.txt, as --dataset in finetune)")
    g.add_argument("--calibration-samples", type=int, default=128)
    g.add_argument("--calibration-len", type=int, default=512, help="tokens per calibration sample (at most)")
    g.add_argument("--gptq-bits", type=int, choices=[2, 3, 4], default=4)
    g.add_argument("--gptq-group-size", type=int, default=32)
    g.add_argument("--percdamp", type=float, default=0.01, help="GPTQ dampening, a fraction of mean(diag H)")
    add_device_args(p, dtype_help="compute dtype of the verification (reference and reloaded merge)")
    add_adapter_format_args(p)
    args = p.parse_args(argv)
    if not args.run and not (args.model and args.adapter):
        p.error("pass --run DIR, or --model PATH and --adapter DIR")
    return args


def prompt_ids(tokenizer) -> list[torch.Tensor]:
    out = []
    for text in PROMPTS:
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True)
        out.append(tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"])
    return out


@torch.no_grad()
def logits_of(model, ids: list[torch.Tensor]) -> list[torch.Tensor]:
    """fp32 logits on the CPU (so that models on different devices compare, and the device is freed)."""
    device = next(model.parameters()).device
    return [model(input_ids=x.to(device), use_cache=False).logits.float().cpu() for x in ids]


def compare(ref: list[torch.Tensor], got: list[torch.Tensor]) -> dict:
    max_abs = max((a - b).abs().max().item() for a, b in zip(ref, got))
    scale = max(a.abs().max().item() for a in ref)
    agree = sum(int((a[0, -1].argmax() == b[0, -1].argmax()).item()) for a, b in zip(ref, got))
    return {"max_abs_diff": max_abs, "rel_diff": max_abs / max(scale, 1e-30), "max_abs_logit": scale,
            "next_token_agree": f"{agree}/{len(ref)}"}


def check_gptq_args(args, source) -> None:
    """GPTQ deployment needs calibration data for QLoRA and none for QA-LoRA (which merges exactly)."""
    from qlora_ds.eval.runs import layer_config
    from qlora_ds.nn.config import QLoRAConfig

    qlora = isinstance(layer_config(source), QLoRAConfig)
    if args.format == "gptq" and qlora and not args.calibration:
        raise QLoRADSError("--format gptq of a QLoRA adapter quantizes the merged model with GPTQ, which needs "
                           "calibration data: pass --calibration data.jsonl (e.g. the training set)")
    if args.calibration and not (args.format == "gptq" and qlora):
        raise QLoRADSError("--calibration is for --format gptq of a QLoRA adapter; a QA-LoRA adapter merges exactly "
                           "into its INT-N base and needs none")


def calibration_ids(args, tokenizer) -> list[torch.Tensor]:
    from qlora_ds.data import load_records, tokenize_records

    examples = tokenize_records(load_records(args.calibration)[:args.calibration_samples], tokenizer,
                                max_len=args.calibration_len)
    if not examples:
        raise QLoRADSError(f"{args.calibration} gave no calibration samples; pass a file with a few dozen records")
    return [e["input_ids"] for e in examples]


class VerifyFailed(Exception):
    """The merge is out of tolerance: it was not moved into --out (``report`` says by how much)."""

    def __init__(self, report: dict):
        super().__init__("merge verification failed")
        self.report = report


def dense_bytes(model, dtype: torch.dtype) -> int:
    """What ``model`` takes once every INT-N layer is read back as a dense ``dtype`` linear (the reloaded merge)."""
    from qlora_ds.nn import QALoRALinear

    quantized = [m for m in model.modules() if isinstance(m, QALoRALinear)]
    qids = {id(p) for m in quantized for p in m.parameters()}
    n = sum(p.numel() for p in model.parameters() if id(p) not in qids)
    return (n + sum(m.in_features * m.out_features for m in quantized)) * dtype.itemsize


def dtype_str(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def fits(device: torch.device, nbytes: int) -> bool:
    """Whether ``nbytes`` more fit the free memory of ``device`` (a CPU always does, as far as we can tell)."""
    return device.type != "cuda" or nbytes < 0.9 * torch.cuda.mem_get_info(device)[0]


def check_gptq_merge_fits(model, device: torch.device) -> None:
    """QLoRA -> GPTQ calibrates the merged (16-bit) model on ``device``; refuse before merging when it does not fit."""
    from qlora_ds.adapters.merge import _activation_dtype
    from qlora_ds.nn import QLoRALinear

    dtype = _activation_dtype(model) or torch.bfloat16
    grow = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QLoRALinear)) * dtype.itemsize
    if not fits(device, grow):
        raise QLoRADSError(f"--format gptq of a QLoRA adapter calibrates GPTQ on the merged {dtype_str(dtype)} model, "
                           f"which needs {grow / 2 ** 30:.1f} GiB more on {device} than it has free; pass --device cpu "
                           f"(about {grow / 2 ** 30:.0f} GiB of host RAM more than the 4-bit model; slow) or use a "
                           f"larger GPU, or merge with --format bf16")


def merge(args) -> dict:
    from transformers import AutoConfig

    from qlora_ds.atomic import atomic_directory, atomic_write_text
    from qlora_ds.adapters.merge import MERGE_META, check_out_dir, export_merged, merge_model
    from qlora_ds.eval.runs import load_base_and_adapter, load_tokenizer, resolve
    from qlora_ds.hardware import dtype_name, resolve_device, resolve_dtype

    source = resolve(run=args.run, model=args.model, adapter=args.adapter, **source_overrides(args))
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    check_out_dir(args.out)                     # before any expensive work
    check_gptq_args(args, source)
    base_dtype = getattr(AutoConfig.from_pretrained(source.model), "dtype", None) or torch.bfloat16
    base_dtype = getattr(torch, base_dtype) if isinstance(base_dtype, str) else base_dtype
    tokenizer = load_tokenizer(source.model)
    written = torch.bfloat16 if args.format == "bf16" else base_dtype     # the dtype the unquantized tensors get
    holds = dtype == base_dtype or dtype == torch.float32 and base_dtype in (torch.bfloat16, torch.float16)
    if not holds and (args.format == "gptq" or dtype == torch.float16):
        name = {base_dtype: dtype_str(base_dtype), written: dtype_str(written)}
        log.warning("--dtype %s on a %s checkpoint: its unquantized tensors (embeddings, norms, LM head, biases) "
                    "pass through %s before they are written as %s, and lose bits on the way; pass --dtype fp32 (or "
                    "the checkpoint's own dtype)", dtype_name(dtype), name[base_dtype], dtype_name(dtype),
                    name[written])
    model = load_base_and_adapter(source, compute_dtype=dtype, torch_dtype=dtype, device=device)
    ids = prompt_ids(tokenizer)
    ref = logits_of(model, ids) if args.verify else None
    qlora_paths = [p for p, m in model.named_modules() if type(m).__name__ == "QLoRALinear"]
    meta = {"base_model": os.path.abspath(source.model), "adapter": os.path.abspath(source.adapter)}
    # on a GPU the merged layers go to the host as they are built: the device never holds the 16-bit model
    offload = torch.device("cpu") if device.type == "cuda" else None
    if args.format == "gptq" and qlora_paths:
        from qlora_ds.adapters.merge import quantize_gptq
        check_gptq_merge_fits(model, device)
        # merged into the model's dtype so that the calibration forward runs in one dtype; GPTQ reads the
        # weights in fp32, and their bf16 rounding (2^-9 relative) is far below an INT-N step
        merge_model(model)
        meta.update(quantize_gptq(model, calibration_ids(args, tokenizer), qlora_paths, args.gptq_bits,
                                  args.gptq_group_size, args.percdamp))
        if args.verify:
            meta["gptq_vs_adapter"] = compare(ref, gptq_ref := logits_of(model, ids))
            ref = gptq_ref
    else:
        merge_model(model, dtype=torch.bfloat16, offload=offload)
    if offload is not None:
        model.to(offload)                       # what is left there: embeddings, norms, an untargeted head
    reload_bytes = dense_bytes(model, dtype)
    try:
        # written next to --out, verified there, then swapped in: a failed check leaves a previous merge untouched
        with atomic_directory(args.out, allowed_existing=check_out_dir(args.out)) as tmp:
            report = export_merged(model, tmp, args.format, tokenizer_dir=source.model,
                                   dtype=torch.bfloat16 if args.format == "bf16" else base_dtype, meta=meta)
            del model
            warn_clamped(report)
            if args.verify:
                verify(args, report, ref, ids, tmp, dtype, verify_device(device, reload_bytes))
            atomic_write_text(os.path.join(tmp, MERGE_META), json.dumps(report, indent=2, sort_keys=True, default=str))
    except VerifyFailed as failed:
        log.error("the merge is out of tolerance and was not written: %s is unchanged; pass a larger --tol (or "
                  "--no-verify) to keep such a merge", args.out)
        return failed.report
    log.info("wrote %s (%s)", args.out, args.format)
    return report


def warn_clamped(report: dict) -> None:
    if report.get("zeros_clamped"):
        log.warning("%d of %d zero points lie outside what GPTQ's zero-minus-one format holds ([1, %d]) and were "
                    "clamped: GPTQ loaders read those groups with extra error (largest weight change %.3g). "
                    "read_gptq_checkpoint(exact=True) and qlora_ds_intn.safetensors keep the exact values",
                    report["zeros_clamped"], report["zeros_total"], 2 ** report["bits"],
                    report["gptq_max_abs_weight_error"])


def verify_device(device: torch.device, nbytes: int) -> torch.device:
    """Where the reloaded merge is verified: ``device``, or the CPU when the dense model does not fit there."""
    if device.type == "cuda":
        torch.cuda.empty_cache()                # the merged model has left the device; give its cache back
    if fits(device, nbytes):
        return device
    log.warning("the reloaded merge (%.1f GiB) does not fit the free memory of %s: verifying it on the CPU (slower)",
                nbytes / 2 ** 30, device)
    return torch.device("cpu")


def verify(args, report: dict, ref, ids, directory: str, dtype: torch.dtype, device: torch.device) -> None:
    """Reload the merge written to ``directory`` and compare its logits with ``ref`` (into ``report``); raises
    VerifyFailed when out of tolerance."""
    from transformers import AutoModelForCausalLM

    from qlora_ds.adapters.merge import read_gptq_checkpoint
    from qlora_ds.hardware import dtype_name

    tol = args.tol if args.tol is not None else TOLERANCE[args.format, dtype]
    if args.format == "bf16":
        reloaded = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval().to(device)
        report["verify"] = compare(ref, logits_of(reloaded, ids))
        del reloaded
    else:
        for key, exact in (("verify", True), ("verify_gptq_kernel_view", False)):
            reloaded = read_gptq_checkpoint(directory, exact=exact, dtype=dtype).to(device)
            report[key] = compare(ref, logits_of(reloaded, ids))
            del reloaded
        v = report["verify_gptq_kernel_view"]
        log.info("as a GPTQ kernel reads it (integer zeros, fp16 scales): max |Δlogit| %.3g, relative %.3g, "
                 "next token agrees %s; %d of %d zero points were rounded (largest weight change %.3g)",
                 v["max_abs_diff"], v["rel_diff"], v["next_token_agree"], report["zeros_rounded"],
                 report["zeros_total"], report["gptq_max_abs_weight_error"])
    v = report["verify"]
    v.update(tolerance=tol, device=str(device), dtype=dtype_name(dtype))
    v["ok"] = v["rel_diff"] <= tol
    log.info("verify (%d prompts) on %s: max |Δlogit| %.3g, relative %.3g (tolerance %.3g), next token agrees %s -> "
             "%s", len(ids), device, v["max_abs_diff"], v["rel_diff"], tol, v["next_token_agree"],
             "OK" if v["ok"] else "FAILED")
    if not v["ok"]:
        raise VerifyFailed(report)


def main(argv=None) -> int:
    def verified(report) -> int:
        log.info("report: %s", json.dumps(report, indent=2, default=str))
        return 0 if report.get("verify", {}).get("ok", True) else 1

    return run_main(merge, parse_args, argv, exit_code=verified)

if __name__ == "__main__":
    sys.exit(main())
