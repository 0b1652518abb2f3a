"""Memory & scaling planner and the shipped configs (CPU only, no dist init)."""
import dataclasses
import glob
import json
import os
import subprocess
import sys
from dataclasses import replace
from unittest import mock

import pytest

from qlora_ds.errors import QLoRADSError
from qlora_ds.plan import (ALL_LINEAR, NF4_DQ_BITS, PlanConfig, apply_recipe, estimate_memory, estimate_scaling,
                           load_shape, lora_params, parse_mem, plan, rank_for_fraction)
from qlora_ds.plan.memory import CUDA_CONTEXT_BYTES, GiB, base_weight_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
MiB = 1 << 20


def test_65b_single_48gb_with_recipe_fits():
    cfg = PlanConfig(shape=load_shape("llama-65b"), gpu_mem_bytes=parse_mem("48GB"))
    cfg = apply_recipe(cfg, os.path.join(CONFIGS, "recipes", "guanaco_65b.json"))
    assert (cfg.zero_stage, cfg.paged, cfg.bf16_master, cfg.lora_r, cfg.grad_ckpt) == (2, True, True, 64, True)
    r = plan(cfg)
    assert r.fits
    assert r.memory.device_peak < 48 * GiB
    assert r.memory.peak < 48 * GiB          # even with all optimizer state resident at seq 528


def test_65b_bf16_base_does_not_fit_and_names_a_knob():
    cfg = PlanConfig(shape=load_shape("llama-65b"), base_bits=16, paged=True, bf16_master=True)
    r = plan(cfg)
    assert not r.fits
    flags = " ".join(a.flag for a in r.advice if a.fits_after)
    assert "--bits 4" in flags and "--zero 3" in flags


def test_7b_base_weights_vs_paper():
    """Paper: the 4-bit 7B base model takes 5,048 MB. Pure accounting gives 3,866 MB (bf16 embeddings);
    the paper's set-up kept embeddings/lm_head in fp32 and measured on a GPU (CUDA context included)."""
    s = load_shape("llama-7b")
    ours = sum(base_weight_bytes(s, NF4_DQ_BITS, embed_bytes=2).values())
    paper_style = sum(base_weight_bytes(s, NF4_DQ_BITS, embed_bytes=4).values()) + CUDA_CONTEXT_BYTES
    assert abs(paper_style / 1e6 - 5048) / 5048 < 0.10
    assert abs(paper_style / MiB - 5048) / 5048 < 0.10
    assert 3800e6 < ours < 3900e6


def test_7b_lora_params_vs_paper():
    """Paper: LoRA weights of 0.2 % of the model take 26 MB (bf16). That is r ≈ 5.4 on all linear
    layers (r = 64 on all linears is 2.4 %, 305 MiB), not r = 64."""
    s = load_shape("llama-7b")
    r = rank_for_fraction(s, 0.002)
    assert 5 < r < 6
    assert abs(lora_params(s, 1) * r * 2 / MiB - 26) / 26 < 0.10
    assert lora_params(s, 64) * 2 / MiB == pytest.approx(305, rel=0.01)


def test_zero3_divides_weights_by_world():
    s = load_shape("llama-65b")
    one = estimate_memory(PlanConfig(shape=s, zero_stage=3))
    eight = estimate_memory(PlanConfig(shape=s, zero_stage=3, gpus_per_node=8))
    for name in ("quantized_linears", "embeddings_norms", "lora_params", "optimizer_states"):
        assert eight.get(name) == pytest.approx(one.get(name) / 8)
    assert eight.get("zero3_gathered") < one.get("quantized_linears") / 8 / 4
    z2 = estimate_memory(PlanConfig(shape=s, zero_stage=2, gpus_per_node=8))
    assert z2.get("quantized_linears") == one.get("quantized_linears")      # frozen base replicated


def test_packed_zero3_traffic_is_a_quarter_of_bf16():
    s = load_shape("llama-65b")
    base = PlanConfig(shape=s, zero_stage=3, gpus_per_node=8, nodes=2, grad_accum=1)
    packed, bf16 = estimate_scaling(base), estimate_scaling(replace(base, base_bits=16))
    ratio = packed.volume["allgather_linears"] / bf16.volume["allgather_linears"]
    # codes (4 bit) + absmax bytes (8/64 bit) move every step; the nested absmax and offset tensors are
    # below DeepSpeed's persistence threshold and stay gathered, so 4.125 of the 4.127 bits move
    assert ratio == pytest.approx((4 + 8 / 64) / 16, rel=1e-6)
    assert NF4_DQ_BITS / 16 - ratio < 1e-3
    assert 0.25 < packed.total_bytes / bf16.total_bytes < 0.32
    assert packed.comm_s < bf16.comm_s / 3


def test_paged_state_is_spillable():
    cfg = PlanConfig(shape=load_shape("llama-33b"), gpu_mem_bytes=parse_mem("24GB"))
    unpaged, paged = estimate_memory(cfg), estimate_memory(replace(cfg, paged=True))
    assert paged.peak == unpaged.peak and paged.required < unpaged.required
    assert paged.required == pytest.approx(paged.peak - paged.get("optimizer_states"))


def test_checkpointing_lowers_activations():
    cfg = PlanConfig(shape=load_shape("llama-7b"))
    on, off = estimate_memory(cfg), estimate_memory(replace(cfg, grad_ckpt=False))
    assert on.get("activations") * 10 < off.get("activations")


def test_hf_config_json_and_bad_input(tmp_path):
    cfg = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "vocab_size": 100, "max_position_embeddings": 128}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    s = load_shape(str(tmp_path))
    assert (s.hidden, s.kv_dim, s.layers) == (64, 32, 2)
    with pytest.raises(QLoRADSError, match="neither a preset"):
        load_shape("llama-9000b")
    with pytest.raises(QLoRADSError, match="--zero"):
        PlanConfig(shape=s, zero_stage=4)
    with pytest.raises(QLoRADSError, match="48GB"):
        parse_mem("lots")
    assert parse_mem("48GB") == 48 * GiB


def _json_files():
    return sorted(glob.glob(os.path.join(CONFIGS, "*.json")) + glob.glob(os.path.join(CONFIGS, "recipes", "*.json")))


@pytest.mark.parametrize("path", _json_files(), ids=os.path.basename)
def test_config_parses_and_names_hardware(path):
    with open(path) as f:
        d = json.load(f)
    assert d.get("_hardware") and d.get("_comment")


WORLD = {"ds_cpu_demo.json": 2, "ds_single_gpu.json": 1, "ds_single_gpu_65b.json": 1,
         "ds_zero3_multi_gpu.json": 8, "ds_multinode.json": 16}


@pytest.mark.parametrize("name", sorted(WORLD))
def test_ds_config_accepted_by_deepspeed(name):
    from deepspeed.runtime import config as ds_config_mod

    with open(os.path.join(CONFIGS, name)) as f:
        d = json.load(f)
    assert d.pop("optimizer")["type"] == "PagedAdamW"      # popped by qlora_ds.optim's registration
    world = WORLD[name]
    assert d["train_batch_size"] == d["train_micro_batch_size_per_gpu"] * d["gradient_accumulation_steps"] * world
    with mock.patch.object(ds_config_mod.dist, "get_rank", return_value=0), \
            mock.patch.object(ds_config_mod.dist, "get_world_size", return_value=world):
        c = ds_config_mod.DeepSpeedConfig(d)
    assert c.world_size == world and c.train_batch_size == d["train_batch_size"]
    assert c.gradient_clipping == 0.3 and c.zero_optimization_stage == d["zero_optimization"]["stage"]


@pytest.mark.parametrize("size", ["7b", "13b", "33b", "65b"])
def test_guanaco_recipes_follow_the_paper(size):
    path = os.path.join(CONFIGS, "recipes", f"guanaco_{size}.json")
    with open(path) as f:
        r = json.load(f)
    big = size in ("33b", "65b")
    assert (r["lora_r"], r["lora_alpha"], r["lora_dropout"]) == (64, 16, 0.05 if big else 0.1)
    assert r["lr"] == (1e-4 if big else 2e-4)
    assert (r["warmup_ratio"], r["max_grad_norm"], r["adam_beta2"]) == (0.03, 0.3, 0.999)
    assert r["group_by_length"] and not r["train_on_prompt"] and r["grad_ckpt"] and r["optimizer"] == "PagedAdamW"
    with open(os.path.join(ROOT, r["ds_config"])) as f:
        ds = json.load(f)
    assert ds["optimizer"]["type"] == "PagedAdamW" and ds["optimizer"]["params"]["lr"] == r["lr"]
    assert ds["train_batch_size"] == 16 and ds["optimizer"]["params"]["betas"][1] == 0.999
    assert plan(apply_recipe(PlanConfig(shape=load_shape(r["_planner_preset"])), path)).fits


def test_recipes_accepted_by_finetune_and_optimizer_registration():
    launch = os.path.join(ROOT, "launch", "finetune.py")
    sys.path.insert(0, os.path.dirname(launch))
    try:
        import finetune
    finally:
        sys.path.pop(0)
    for path in glob.glob(os.path.join(CONFIGS, "recipes", "*.json")):
        args = finetune.parse_args(["--recipe", path, "--model", "m", "--dataset", "d", "--output-dir", "o"])
        assert os.path.exists(os.path.join(ROOT, args.ds_config))
    from qlora_ds.optim.deepspeed_registration import split_ds_config
    for name in WORLD:
        rest, section = split_ds_config(os.path.join(CONFIGS, name))
        assert section["type"] == "PagedAdamW" and "optimizer" not in rest


def test_cli_65b_fits():
    """With the paged optimizer, as the README's 65B run (unpaged, ZeRO-2's step flattens the bf16 gradients and copies
    them to fp32 beside the Adam moments: 1.2 GiB over)."""
    out = subprocess.run([sys.executable, "-m", "qlora_ds.plan", "--model", "llama-65b", "--gpus", "1",
                          "--gpu-mem", "48GB", "--paged"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "fits: yes" in out.stdout


def test_cli_json_and_error():
    out = subprocess.run([sys.executable, "-m", "qlora_ds.plan", "--model", "llama-65b", "--bits", "16", "--json"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    d = json.loads(out.stdout)
    assert d["fits"] is False and d["advice"]
    bad = subprocess.run([sys.executable, "-m", "qlora_ds.plan", "--model", "nope"], capture_output=True,
                         text=True, cwd=ROOT, timeout=60)
    assert bad.returncode == 2 and "neither a preset" in bad.stdout + bad.stderr


def test_cpu_terms_and_run_config():
    """CPU: the runtime term is what the run measured; oneDNN's per-shape buffers sum over the padded
    widths; ZeRO-3 gathers follow the ds_config's persistence threshold."""
    from qlora_ds.plan.memory import CPU_TRAINING_RUNTIME_BYTES, cpu_shape_cache_bytes
    from qlora_ds.plan.run_check import config_for_run, memory_check
    hf = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
          "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 8192, "tie_word_embeddings": True}
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "zero_optimization": {"stage": 2}}
    cfg = config_for_run(hf, ds, world=2, device="cpu", seq_len=128, lora_r=16, lora_dropout=0.05, targets=None,
                         grad_ckpt=True, runtime_bytes=400 * MiB, pad_multiple=16)
    assert (cfg.zero_stage, cfg.micro_batch, cfg.shape.vocab, cfg.lora_targets) == (2, 2, 49152, ALL_LINEAR)
    widths = sum(range(16, 129, 16))
    assert cpu_shape_cache_bytes(cfg) == 4 * 2 * 49152 * widths
    assert cpu_shape_cache_bytes(replace(cfg, seq_len=120)) == 4 * 2 * 49152 * (widths - 8)   # last width capped
    assert cpu_shape_cache_bytes(replace(cfg, width_sum=128 + 112)) == 4 * 2 * 49152 * 240   # the widths a run met
    met = config_for_run(hf, ds, world=2, device="cpu", seq_len=128, lora_r=16, lora_dropout=0.05, targets=None,
                         grad_ckpt=True, runtime_bytes=400 * MiB, pad_multiple=16, width_sum=240)
    assert estimate_memory(met).get("cpu_shape_cache") == 4 * 2 * 49152 * 240
    mem = estimate_memory(cfg)
    assert mem.get("process_runtime") == 400 * MiB and mem.get("cpu_training_runtime") == CPU_TRAINING_RUNTIME_BYTES
    assert mem.get("logits_loss") == 2 * 128 * 49152 * 12
    report = memory_check(cfg, mem.peak * 1.1)
    assert report["planned_over_measured"] == pytest.approx(1 / 1.1, abs=1e-3)
    # the run-measured runtime taken out of both sides: what the planner itself predicted vs what was measured above it
    above = (mem.peak - 400 * MiB) / (mem.peak * 1.1 - 400 * MiB)
    assert report["planned_over_measured_above_runtime"] == pytest.approx(above, abs=1e-3)
    assert report["planned_over_measured_above_runtime"] < report["planned_over_measured"]
    assert "cuda_context" not in report["items_mib"]
    with pytest.raises(QLoRADSError, match="planner models LoRA on"):
        config_for_run(hf, ds, world=1, device="cpu", seq_len=8, lora_r=8, lora_dropout=0.0, targets=["c_attn"],
                       grad_ckpt=True)
    qa = config_for_run(hf, ds, world=1, device="cpu", seq_len=8, lora_r=8, lora_dropout=0.0, targets=None,
                        grad_ckpt=True, method="qalora", bits=2, group_size=32)
    assert qa.base_bits_per_param == 2 + 64 / 32


def test_cuda_check_leaves_out_paged_state_and_context():
    """On a GPU the run measures torch's max_memory_allocated: no CUDA context (runtime 0) and no paged
    optimizer state (CUDA managed memory, outside torch's allocator)."""
    from qlora_ds.plan.run_check import config_for_run, memory_check
    hf = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
          "vocab_size": 32000}
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 16, "zero_optimization": {"stage": 2},
          "optimizer": {"type": "PagedAdamW"}}
    cfg = config_for_run(hf, ds, world=1, device="cuda", seq_len=512, lora_r=64, lora_dropout=0.1, targets=None,
                         grad_ckpt=True, runtime_bytes=0)
    mem = estimate_memory(cfg)
    report = memory_check(cfg, 10 * GiB)
    assert cfg.paged and report["items_mib"]["cuda_context"] == 0 and "cpu_shape_cache" not in report["items_mib"]
    assert report["planned_peak_mib"] == pytest.approx((mem.peak - mem.get("optimizer_states")) / MiB, abs=0.1)


def test_planner_fused_rule_is_the_fused_linears_rule():
    """The planner's copy of ``qlora_ds.ops.fused_linear``'s row/shape rule (it imports no package code) gives the
    same answer for every shape class and row count, with the path's hardware check taken as met."""
    import torch

    from qlora_ds.ops import fused_linear
    from qlora_ds.plan.memory import fused_linear_takes
    shapes = [(576, 192), (576, 1536), (1536, 576), (4096, 1024), (4096, 4096), (4096, 11008), (11008, 4096),
              (100, 64), (64, 48), (8192, 1024)]
    with mock.patch.object(fused_linear, "available", return_value=True):
        for in_f, out_f in shapes:
            for rows in (1, 255, 256, 257, 512, 1024, 1025):
                x = torch.empty(1, in_f, dtype=torch.bfloat16).expand(rows, in_f)
                for blocksize in (64, 128, 32):
                    assert fused_linear.supported(x, (out_f, in_f), blocksize) == \
                        fused_linear_takes(in_f, out_f, rows, blocksize), (in_f, out_f, rows, blocksize)


def test_planner_counts_no_dequantized_weight_for_fused_linears():
    """On a CPU with the fused AMX linear (bf16) the linears it takes write no dequantized weight: no workspace and
    no kept copy for them; the others (too many rows, small weights) still count; fp32 compute never fuses."""
    from qlora_ds.plan.presets import shape_from_hf_config
    llama3_8b = shape_from_hf_config({"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                                      "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256})

    def items(model, **kw):
        shape = llama3_8b if model == "llama-3-8b" else load_shape(model)
        cfg = replace(PlanConfig(shape=shape, device="cpu", compute_dtype="bf16", fused_cpu_linear=True), **kw)
        return {it.name: it.bytes for it in estimate_memory(cfg).items}

    demo = items("smollm2-135m", seq_len=128, micro_batch=2, grad_ckpt=False)      # 256 rows: all fused
    assert "dequant_workspace" not in demo and "dequant_keep" not in demo
    wide = items("smollm2-135m", seq_len=512, micro_batch=1)                      # small weights: fused to 256 rows
    assert wide["dequant_workspace"] == 576 * 1536 * 2 and wide["dequant_keep"] == load_shape(
        "smollm2-135m").linear_params_per_layer * 2
    big = items("llama-7b", seq_len=1024, micro_batch=1)                          # ≥ 8M-element weights: to 1024
    assert "dequant_workspace" not in big and "dequant_keep" not in big
    # Llama-3-8B at 1024 rows: q/o/gate/up/down fused, k and v (4096 × 1024, 4M elements) are not
    l3 = items("llama-3-8b", seq_len=1024, micro_batch=1)
    assert l3["dequant_workspace"] == 4096 * 1024 * 2 and l3["dequant_keep"] == 2 * 4096 * 1024 * 2
    for kw in ({"seq_len": 1024, "micro_batch": 2}, {"seq_len": 512, "fused_cpu_linear": False},
               {"seq_len": 512, "device": "cuda"}, {"seq_len": 512, "compute_dtype": "fp32"}):
        elem = 4 if kw.get("compute_dtype") == "fp32" else 2
        off = items("llama-7b", **kw)
        assert off["dequant_workspace"] == 4096 * 11008 * elem, kw
        assert off["dequant_keep"] == min(256 * MiB, load_shape("llama-7b").linear_params_per_layer * elem), kw
    cli = subprocess.run([sys.executable, "-m", "qlora_ds.plan", "--model", "smollm2-135m", "--device", "cpu",
                          "--seq-len", "128", "--batch", "2", "--cpu-amx", "--json"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert cli.returncode == 0, cli.stderr
    assert "dequant_workspace" not in cli.stdout and "dequant_keep" not in cli.stdout
    from qlora_ds.plan.__main__ import config_from_args, parse_args
    flags = config_from_args(parse_args(["--model", "smollm2-135m", "--device", "cpu", "--packing", "--cpu-amx"]))
    assert flags.packing and flags.fused_cpu_linear
    assert not config_from_args(parse_args(["--model", "smollm2-135m"])).packing


def _tiny_hf(arch):
    import transformers as tf
    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=100)
    config = {"gemma": lambda: tf.GemmaConfig(head_dim=32, **kw),      # 4 heads of 32 at hidden 64
              "mixtral": lambda: tf.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **kw),
              "qwen2_moe": lambda: tf.Qwen2MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                                     shared_expert_intermediate_size=48, **kw)}[arch]()
    return tf.AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("arch", ["gemma", "mixtral", "qwen2_moe"])
def test_shape_counts_what_the_hf_model_holds(arch):
    """Explicit head_dim and MoE experts: the planner's counts equal the parameters of the real model;
    what inject() wraps is the quantized part; the experts (fused 3-D, routers, one-output gates) are the planner's
    ``moe_experts`` (tests/test_plan_moe.py counts their bytes)."""
    import torch
    from qlora_ds.inject import inject, select
    from qlora_ds.nn import QLoRAConfig
    from qlora_ds.plan.presets import shape_from_hf_config
    model = _tiny_hf(arch)
    s = shape_from_hf_config(model.config.to_dict())
    wrapped = sum(model.get_submodule(p).weight.numel() for p in select(model, QLoRAConfig(r=4)))
    weights = {n: p.numel() for n, p in model.named_parameters()}      # Qwen2-MoE's q/k/v biases included
    experts = sum(v for n, v in weights.items() if ".mlp.experts." in n or ".mlp.gate." in n or "expert_gate" in n)
    assert (s.linear_params, s.expert_params, s.total_params) == (wrapped, experts, sum(weights.values()))
    lora = [p for n, p in model.named_parameters() if ".lora_" in n]
    assert not lora and inject(model, QLoRAConfig(r=4, compute_dtype=torch.float32))
    assert sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n) == lora_params(s, 4)
    if arch == "gemma":
        assert s.linears()["self_attn.q_proj"] == (64, 128) and s.linears()["self_attn.o_proj"] == (128, 64)
        assert s.kv_dim == 64
    else:
        assert experts > wrapped
        mem = estimate_memory(PlanConfig(shape=s, zero_stage=0, quantize_experts=False))
        assert mem.get("embeddings_norms") + mem.get("moe_experts") == s.embedding_params * 2


def test_mixtral_8x7b_plans_its_experts_in_4bit_or_16bit():
    from qlora_ds.plan.presets import shape_from_hf_config
    s = shape_from_hf_config({"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                              "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8,
                              "num_experts_per_tok": 2, "vocab_size": 32000})
    assert s.total_params == 46_702_792_704                  # Mixtral-8x7B's published 46.7 B
    assert s.linear_params == 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024) and s.intermediate == 2 * 14336
    experts = 8 * 3 * 4096 * 14336                                     # one layer's
    r = plan(PlanConfig(shape=s, gpu_mem_bytes=24 * GiB, quantize_experts=False))
    assert not r.fits and r.memory.get("moe_experts") > 84 * GiB
    r4 = plan(PlanConfig(shape=s, gpu_mem_bytes=32 * GiB))
    assert r4.fits and 21.6 * GiB < r4.memory.get("moe_experts") < 21.7 * GiB
    z3 = estimate_memory(PlanConfig(shape=s, gpu_mem_bytes=24 * GiB, zero_stage=3, gpus_per_node=4,
                                    quantize_experts=False))
    assert z3.get("zero3_gathered") > 2 * experts * 2      # a layer's bf16 experts, twice
    z3 = estimate_memory(PlanConfig(shape=s, gpu_mem_bytes=24 * GiB, zero_stage=3, gpus_per_node=4))
    assert 2 * experts * 4.127 / 8 < z3.get("zero3_gathered") < 2 * experts * 2 * 0.3      # packed 4-bit experts


@pytest.mark.parametrize("extra,match", [
    ({"num_experts": 4, "num_experts_per_tok": 2, "decoder_sparse_step": 2}, "mixes dense and MoE"),
    ({"num_experts": 4, "num_experts_per_tok": 2, "mlp_only_layers": [0]}, "mixes dense and MoE"),
    ({"num_local_experts": 4}, "needs num_experts_per_tok"),
    ({"n_routed_experts": 4, "moe_intermediate_size": 32}, "MoE keys .* not supported"),
])
def test_moe_layouts_the_planner_cannot_model_are_refused(extra, match):
    from qlora_ds.plan.presets import shape_from_hf_config
    base = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "vocab_size": 100}
    with pytest.raises(QLoRADSError, match=match):
        shape_from_hf_config({**base, **extra})


def test_qalora_lora_params_are_the_pooled_ones():
    """QA-LoRA's A takes in/group_size inputs: the planner counts what QALoRALinear builds (it counted QLoRA's)."""
    import torch

    from qlora_ds.inject import inject, lora_parameters
    from qlora_ds.nn import QALoRAConfig
    from qlora_ds.plan.memory import PlanConfig, cfg_lora_params
    from qlora_ds.plan.presets import shape_from_hf_config
    from tests.tiny_models import tiny_model
    model = tiny_model("llama")
    inject(model, QALoRAConfig(bits=4, group_size=32, r=8, dropout=0.0, compute_dtype=torch.float32))
    built = sum(p.numel() for p in lora_parameters(model).values())
    cfg = PlanConfig(shape=shape_from_hf_config(model.config.to_dict()), lora_r=8, quant="int", base_bits=4,
                     group_size=32)
    assert cfg_lora_params(cfg) == built
    assert cfg_lora_params(dataclasses.replace(cfg, quant="nf4")) > built


@pytest.mark.parametrize("isa, auto", [("avx2", "fp32"), ("avx512", "fp32"), ("amx", "bf16")])
def test_cli_dtype_auto_on_cpu_is_what_finetune_picks_on_this_host(monkeypatch, isa, auto):
    """--device cpu plans finetune --dtype auto's choice for this host: fp32 without native bf16 (4-byte
    activations and embeddings, fp32 LoRA, no master copy), bf16 with it; --cpu-amx names an AMX CPU (bf16)."""
    from qlora_ds import hardware
    from qlora_ds.plan import format_report
    from qlora_ds.plan.__main__ import config_from_args, parse_args
    monkeypatch.setattr(hardware, "device_facts", lambda device: hardware.DeviceFacts("cpu", "CPU", cpu_isa=isa))
    cli = ["--model", "llama-7b", "--device", "cpu", "--seq-len", "512", "--zero", "0"]
    cfg = config_from_args(parse_args(cli))
    assert cfg.compute_dtype == auto and config_from_args(parse_args(cli + ["--dtype", "auto"])).compute_dtype == auto
    assert config_from_args(parse_args(cli + ["--cpu-amx"])).compute_dtype == "bf16"
    assert config_from_args(parse_args(["--model", "llama-7b"])).compute_dtype == "bf16"     # cuda
    for name in ("bf16", "fp16", "fp32"):
        assert config_from_args(parse_args(cli + ["--dtype", name])).compute_dtype == name
    items = {it.name: it for it in estimate_memory(cfg).items}
    shape, p = load_shape("llama-7b"), lora_params(load_shape("llama-7b"), 64)
    elem = 4 if auto == "fp32" else 2
    assert items["embeddings_norms"].bytes == shape.embedding_params * elem
    assert items["lora_params"].bytes == p * elem
    assert items["master_weights"].bytes == (0 if auto == "fp32" else 4 * p)
    assert f"{auto} compute" in format_report(plan(cfg)) and plan(cfg).as_dict()["compute_dtype"] == auto
