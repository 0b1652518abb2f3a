"""fp16 end to end under DeepSpeed (issue 14 §2): ZeRO 0-3 with our client optimizers, dynamic loss scaling, a
forced overflow -> a skipped step counted and its module named, and a resume that keeps the loss scale.

Per stage, on a tiny random Llama loaded through ``qlora_ds.inject.from_pretrained`` (NF4 + DQ, fp16 compute, the
ds_config's fp16 section derived by ``qlora_ds.hardware.fold_ds_precision``): train STEPS steps through
``qlora_ds.overflow.OverflowMonitor`` with the loss of step FORCE multiplied by 1e8 (its scaled gradients must
overflow fp16), checkpoint with ``qlora_ds.checkpointing.save`` after step SAVE, train on; then a fresh engine
restored by ``qlora_ds.run_dir.restore`` (launch/finetune.py's resume path) trains the same steps again.
Checked: the scale starts dynamic (2^8), exactly one skipped step at FORCE with the scale halved and a module
named, the restored engine has the saved scale and skipped-step count, and its losses match the first run's.

    python scripts/gpu/fp16.py [--device cuda|cpu] [--stages 0,1,2,3] [--out result.json] [--cpu-fp16]

``--cpu-fp16``: DeepSpeed refuses fp16 on a CPU without AVX512-FP16 (its gate asks oneDNN); torch's CPU fp16 math
runs anyway, so this tells DeepSpeed's CPU accelerator yes (tests/test_fp16.py runs ZeRO 0 and 2 that way).
Prints one JSON row per stage; exit 1 if a check failed.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import types

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
OPTIMIZERS = {0: "PagedAdamW", 1: "AdamW8bit", 2: "PagedAdamW8bit", 3: "PagedAdamW"}
STEPS, FORCE, SAVE, SCALE_POWER = 6, 2, 3, 8
VOCAB, SEQ, MICRO = 256, 16, 2


def tiny_checkpoint(path: str) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    return path


def ds_config(stage: int) -> dict:
    import torch

    from qlora_ds.hardware import fold_ds_precision

    params = {"lr": 1e-3}
    if "8bit" in OPTIMIZERS[stage]:
        params["min_8bit_size"] = 256
    cfg = {"train_batch_size": MICRO, "train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1,
           "optimizer": {"type": OPTIMIZERS[stage], "params": params}, "gradient_clipping": 1.0,
           "fp16": {"enabled": "auto", "initial_scale_power": SCALE_POWER, "loss_scale_window": 1000,
                    "hysteresis": 1, "min_loss_scale": 1},
           "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}, "steps_per_print": 10_000}
    return fold_ds_precision(cfg, torch.float16, "fp16")


def build(model_dir: str, stage: int, device):
    import torch

    from qlora_ds.inject import from_pretrained
    from qlora_ds.nn import QLoRAConfig, guards
    from qlora_ds.optim import deepspeed_initialize

    cfg = ds_config(stage)
    torch.manual_seed(1)
    model = from_pretrained(model_dir, QLoRAConfig(r=8, alpha=16, dropout=0.0, compute_dtype=torch.float16),
                            ds_config=cfg, torch_dtype=torch.float16)
    for name, p in model.named_parameters():       # nonzero B: every adapter gets gradients from step 1
        if "lora_B" in name and p.numel():
            torch.nn.init.normal_(p, std=0.02)
    guards.watch(model)
    engine, *_ = deepspeed_initialize(model, cfg)
    return engine


def batch(step: int, device):
    import torch

    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, VOCAB, (MICRO, SEQ), generator=g)
    return {"input_ids": ids.to(device), "labels": ids.clone().to(device)}


def train(engine, steps, device) -> list[dict]:
    from qlora_ds.loss import causal_lm_loss
    from qlora_ds.overflow import OverflowMonitor, loss_scale

    monitor, rows = OverflowMonitor(engine), []
    engine.train()
    for step in steps:
        loss = causal_lm_loss(engine, batch(step, device), chunked=False)
        value = float(loss.detach().float())
        engine.backward(loss * 1e8 if step == FORCE else loss)
        report = monitor.step()
        rows.append({"step": step, "loss": value, "scale": loss_scale(engine), "skipped": int(engine.skipped_steps),
                     "module": report and report["overflow_module"], "at": report and report["overflow_at"]})
    return rows


def run_stage(stage: int, model_dir: str, device, work: str) -> dict:
    from qlora_ds import checkpointing
    from qlora_ds.overflow import loss_scale
    from qlora_ds.run_dir import CKPT_DIR, restore

    out = os.path.join(work, f"zero{stage}")
    ckpt = os.path.join(out, CKPT_DIR)
    engine = build(model_dir, stage, device)
    first = {"scale": loss_scale(engine), "optimizer": type(engine.optimizer).__name__,
             "inner": type(getattr(engine.optimizer, "optimizer", engine.optimizer)).__name__}
    rows = train(engine, range(SAVE), device)
    checkpointing.save(engine, ckpt, SAVE, {"step": SAVE, "micro_step": SAVE}, keep=2)
    saved = {"scale": loss_scale(engine), "skipped": int(engine.skipped_steps)}
    rows += train(engine, range(SAVE, STEPS), device)
    del engine
    gc.collect()

    engine = build(model_dir, stage, device)
    # what restore reads of finetune's arguments (a checkpoint past --max-steps is refused)
    args = types.SimpleNamespace(output_dir=out, max_steps=STEPS, epochs=None)
    step, _ = restore(args, engine, checkpointing.resume_tag(ckpt), 0)
    restored = {"step": step, "scale": loss_scale(engine), "skipped": int(engine.skipped_steps)}
    resumed = train(engine, range(SAVE, STEPS), device)
    del engine
    gc.collect()

    forced = rows[FORCE]
    close = all(abs(a["loss"] - b["loss"]) <= 1e-3 * max(1.0, abs(a["loss"])) for a, b in zip(rows[SAVE:], resumed))
    checks = {
        "dynamic_scale": first["scale"] == 2.0 ** SCALE_POWER,
        "one_skip_at_force": [r["skipped"] for r in rows] == [0] * FORCE + [1] * (STEPS - FORCE),
        "scale_halved": forced["scale"] == first["scale"] / 2,
        "module_named": bool(forced["module"]),
        "resume_keeps_scale": restored["scale"] == saved["scale"] and restored["skipped"] == saved["skipped"]
                              and restored["step"] == SAVE,
        "resumed_losses_match": close and [r["scale"] for r in resumed] == [r["scale"] for r in rows[SAVE:]],
    }
    note = ""
    if first["scale"] == 1.0:
        note = ("DeepSpeed chose a static loss scale of 1: its ZeRO-3 optimizer takes the dtype of the trainable "
                "parameters, fp32 LoRA weights when they were partitioned; cast them to fp16 before ZeRO-3 partitions "
                "them (qlora_ds/inject/loading.py from_pretrained)" if stage == 3 else "static loss scale of 1")
    return {"bench": "fp16", "stage": stage, **first, "note": note, "forced": forced, "saved": saved, "restored": restored,
            "losses": [r["loss"] for r in rows], "resumed": [r["loss"] for r in resumed], "checks": checks,
            "ok": all(checks.values())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--stages", default="0,1,2,3")
    p.add_argument("--out", default=None, help="append the rows as JSON lines here too (default: "
                                               "$QLORA_DS_BENCH_RESULTS/fp16.jsonl when set, as the GPU check does)")
    p.add_argument("--cpu-fp16", action="store_true", help="let DeepSpeed run fp16 on this CPU (see the doc)")
    args = p.parse_args(argv)
    if args.out is None and os.environ.get("QLORA_DS_BENCH_RESULTS"):
        args.out = os.path.join(os.environ["QLORA_DS_BENCH_RESULTS"], "fp16.jsonl")
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if args.device.startswith("cuda") else "cpu")
    import torch
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from qlora_ds.distributed import init_distributed, shutdown

    accelerator, secret = get_accelerator(), os.environ.get("QLORA_DS_SECRET_DIR")
    if args.cpu_fp16:
        accelerator.is_fp16_supported = lambda: True
    ours = not dist.is_initialized()          # the GPU check's dry run calls this in its own process
    init_distributed()
    device = torch.device(args.device)
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="qlora_ds_fp16.") as work:
            os.environ["QLORA_DS_SECRET_DIR"] = secret or os.path.join(work, "secrets")
            model_dir = tiny_checkpoint(os.path.join(work, "model"))
            for stage in (int(s) for s in args.stages.split(",")):
                try:
                    row = run_stage(stage, model_dir, device, work)
                except Exception as err:  # noqa: BLE001 - one stage's failure is a row, the next stage runs
                    row = {"bench": "fp16", "stage": stage, "ok": False, "error": f"{type(err).__name__}: {err}"[:600]}
                row.update(device=str(device), commit=os.environ.get("QLORA_DS_COMMIT", ""),
                           versions={"torch": torch.__version__, "deepspeed": _version("deepspeed")})
                print(json.dumps(row), flush=True)
                rows.append(row)
                if args.out:        # now, not after the last stage: a step killed at its budget keeps finished rows
                    with open(args.out, "a") as fh:
                        fh.write(json.dumps(row) + "\n")
    finally:
        accelerator.__dict__.pop("is_fp16_supported", None)
        if secret is None:
            os.environ.pop("QLORA_DS_SECRET_DIR", None)
        else:
            os.environ["QLORA_DS_SECRET_DIR"] = secret
        if ours:
            shutdown()
    failed = [f"ZeRO-{r['stage']}: {r.get('error') or [k for k, v in r['checks'].items() if not v]}"
              for r in rows if not r["ok"]]
    print("fp16: all checks passed" if not failed else f"fp16: FAILED {'; '.join(map(str, failed))}", flush=True)
    return 0 if not failed else 1


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return ""


if __name__ == "__main__":
    sys.exit(main())
