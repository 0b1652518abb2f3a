"""A MoE model end to end, as a user runs one: launch/finetune.py under the deepspeed launcher with ZeRO-3 on 2 ranks
(the 4-bit experts partitioned, gathered for each forward and for the recompute in backward, run in two groups of
experts per layer), then launch/merge.py
(the experts written back dequantized, the merge verified against base + adapter) and transformers loading it."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from .dist_utils import REPO, check, run_deepspeed
from .finetune_fixtures import CHAT_PAIRS, save_word_level_tokenizer

FINETUNE = REPO / "launch" / "finetune.py"


def write_moe_run(root) -> dict:
    """A random Qwen3-MoE (2 layers, 4 experts, top-2) over a word-level tokenizer, saved as transformers saves it
    (per-expert tensors), and a small chat dataset."""
    from transformers import AutoConfig, AutoModelForCausalLM
    model_dir = os.path.join(root, "model")
    vocab = save_word_level_tokenizer(CHAT_PAIRS, model_dir)
    cfg = AutoConfig.for_model("qwen3_moe", vocab_size=vocab, hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                               num_experts=4, moe_intermediate_size=64, num_experts_per_tok=2,
                               max_position_embeddings=256, bos_token_id=2, eos_token_id=3, pad_token_id=1)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(model_dir)
    data = os.path.join(root, "chat.jsonl")
    with open(data, "w", encoding="utf-8") as fh:
        rows = [(f"{q} {' '.join(['Hi'] * r)}".strip(), a) for r in range(8) for q, a in CHAT_PAIRS]
        fh.writelines(json.dumps({"instruction": q, "response": a}) + "\n" for q, a in rows)
    return {"model": model_dir, "data": data}


def test_moe_finetune_zero3_two_ranks_then_merge(tmp_path):
    """With --lora-experts: the 4-bit parts and the experts' LoRA tensors (their module's own parameters) are
    partitioned and gathered together, the LoRA trained, saved in PEFT's target_parameters layout and merged into
    the experts. (The frozen experts without LoRA: the same parts and gathers; their merge is checked in
    tests/test_quantized_experts.py.)"""
    run = write_moe_run(tmp_path)
    ds = json.loads((REPO / "configs" / "ds_cpu_demo.json").read_text())
    ds.update(train_batch_size=4, train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1)
    ds["optimizer"]["params"]["lr"] = 3e-3
    ds["zero_optimization"] = {"stage": 3, "stage3_param_persistence_threshold": 0}
    (tmp_path / "z3.json").write_text(json.dumps(ds))
    out = tmp_path / "out"
    args = ["--model", run["model"], "--dataset", run["data"], "--output-dir", str(out), "--ds-config",
            str(tmp_path / "z3.json"), "--max-len", "32", "--lora-r", "4", "--lora-dropout", "0",
            "--max-steps", "4", "--eval-every", "4", "--save-every", "4", "--eval-size", "4", "--sample-prompt=",
            "--dtype", "fp32", "--lora-experts"]
    # 0.1 MiB holds 2 of the 4 experts (fp32): each layer runs its experts in 2 groups, gathered and recomputed
    proc = run_deepspeed(FINETUNE, *args, timeout=300, QLORA_DS_EXPERTS_DEQUANT_MB="0.1")
    check(proc)
    assert "MoE experts: 2 of a layer's 4 dequantized at a time" in proc.stdout + proc.stderr
    with open(out / "metrics.jsonl") as fh:
        evals = [r["eval_loss"] for r in map(json.loads, fh) if "eval_loss" in r]
    assert len(evals) == 2 and all(map(math.isfinite, evals)) and evals[1] < evals[0]
    assert json.loads((out / "run_config.json").read_text())["quantize_experts"] is True
    memory = json.loads((out / "summary.json").read_text())["memory"]        # the planner modelled the run
    assert memory["planned_peak_mib"] > 0 and memory["items_mib"]["moe_experts_recompute"] > 0
    side = json.loads((out / "adapter" / "qlora_ds.json").read_text())
    assert side["quantize_experts"] is True
    tensors = load_file(out / "adapter" / "adapter_model.safetensors")
    experts_keys = sorted(k for k in tensors if ".experts." in k)
    # per layer: down_proj outer, gate_up_proj nested under base_layer (PEFT's order)
    assert experts_keys == sorted(f"base_model.model.model.layers.{i}.mlp.experts.{b}lora_{p}.weight"
                                  for i in range(2) for b in ("", "base_layer.") for p in "AB")
    assert all(tensors[k].abs().sum() > 0 for k in experts_keys)               # B trained away from zero
    scaling = (lambda c: c["lora_alpha"] / c["r"])(json.loads((out / "adapter" / "adapter_config.json").read_text()))
    assert all(v.numel() > 0 for v in tensors.values())                   # gathered, not ZeRO-3 stubs

    merged = tmp_path / "merged"
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "merge.py"), "--run", str(out), "--device", "cpu",
                           "--dtype", "fp32", "--out", str(merged)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "-> OK" in proc.stderr and "4-bit MoE experts modules dequantized" in proc.stderr
    from transformers import AutoModelForCausalLM

    from qlora_ds.inject import from_pretrained
    from qlora_ds.nn import QLoRAConfig
    from qlora_ds.quant import dequantize, quantize
    model = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(run["model"], dtype=torch.float32)
    # the merged experts: the base's, quantized and dequantized (what training computed with), plus scaling·B_e·A_e
    # from the adapter file (PEFT's layout: A (r·E, in) expert-major rows, B (out, r·E) expert-minor columns), in bf16
    experts = [n for n, _ in model.named_parameters() if ".experts." in n]
    assert len(experts) == 4
    for name in experts:
        base_w = dequantize(quantize(base.get_parameter(name).detach(), "nf4"), torch.float32)
        module, _, weight = name.rpartition(".")
        key = f"base_model.model.{module}.{'base_layer.' if weight == 'gate_up_proj' else ''}lora_"
        a, b = tensors[key + "A.weight"], tensors[key + "B.weight"]
        a = a.view(4, -1, a.shape[-1])
        b = b.view(b.shape[0], -1, 4).permute(2, 0, 1)
        want = base_w + scaling * (b @ a)
        got = model.get_parameter(name)
        torch.testing.assert_close(got, want.to(torch.bfloat16).float(), rtol=8e-3, atol=1e-6)
        assert (want - base_w).abs().max() > 1e-3          # the update is there to see
    assert isinstance(from_pretrained(str(merged), QLoRAConfig(r=4)), torch.nn.Module)   # and it loads again
