"""Planner: what DeepSpeed 0.19.8 really holds per ZeRO stage, offload, recipes and model layouts (CPU only, no dist).

The measured figures are from real DeepSpeed runs (world 1, gloo) of the tiny Llama below: ``TINY``, LoRA r=8 on all
linears (P = 65,536), bf16, PagedAdamW, reduce_bucket_size 1M."""
import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest

from qlora_ds.errors import QLoRADSError
from qlora_ds.plan import PlanConfig, apply_ds_config, apply_recipe, estimate_memory, format_report, plan
from qlora_ds.plan.presets import shape_from_hf_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 100,
        "tie_word_embeddings": False}
P = 65_536


def _cfg(zero, world=1, **kw):
    ds = {"bf16": {"enabled": True}, "optimizer": {"type": "PagedAdamW"},
          "zero_optimization": {"stage": zero, "contiguous_gradients": True, "overlap_comm": False,
                                "reduce_bucket_size": 1_000_000}}
    cfg = PlanConfig(shape=shape_from_hf_config(TINY), lora_r=8, gpus_per_node=world, **kw)
    return apply_ds_config(cfg, ds)


def _items(cfg):
    return {it.name: it for it in estimate_memory(cfg).items}


def test_zero3_lora_working_copy_is_fp32_and_its_bucket_counts():
    """Measured at ZeRO-3: ds_tensor fp32 262,144 B, ipg bucket bf16 2,000,000 B, grad partitions bf16 131,072 B."""
    it = _items(_cfg(3))
    assert it["lora_params"].bytes == 262_144 == 4 * P
    assert it["reduce_bucket"].bytes == 2_000_000 and it["reduce_bucket"].phase == "static"
    assert it["lora_grads"].bytes == 131_072 and it["master_weights"].bytes == 262_144
    assert _items(_cfg(3, compute_dtype="fp16"))["lora_params"].bytes == 2 * P      # loading.py halves them for fp16
    eight = _items(_cfg(3, world=8))
    assert eight["lora_params"].bytes == 4 * P / 8 and eight["reduce_bucket"].bytes == 2_000_000
    # the step flattens this rank's gradient partition and copies it to fp32 (stage3.py
    # _prepare_fp32_grad_for_sub_group; measured: a new fp32 tensor of 262,144 B at world 1)
    assert (eight["step_grad_flatten"].bytes, eight["step_fp32_grad_copy"].bytes) == (2 * P / 8, 4 * P / 8)
    assert eight["step_fp32_grad_copy"].phase == "step"
    assert "step_fp32_grad_copy" not in _items(replace(_cfg(3, world=8), bf16_master=True))
    # no contiguous_gradients: no bucket; a ds_config without reduce_bucket_size gets DeepSpeed's 5e8 elements
    assert "reduce_bucket" not in _items(replace(_cfg(3), contiguous_gradients=False))
    default = apply_ds_config(PlanConfig(shape=shape_from_hf_config(TINY)), {"zero_optimization": {"stage": 3}})
    assert default.contiguous_gradients and _items(default)["reduce_bucket"].bytes == 5e8 * 2


def test_zero3_gathered_layer_moves_fp32_lora():
    s = shape_from_hf_config(TINY)
    it = _items(_cfg(3, world=2, seq_len=8))
    layer = s.linear_params_per_layer * 4.127 / 8 + P / s.layers * 4
    assert it["zero3_gathered"].bytes == pytest.approx(max(2 * layer, s.vocab * s.hidden * 2), rel=1e-3)


def test_zero0_keeps_16bit_grads_and_copies_to_fp32_in_the_step():
    """Measured at ZeRO-0 (FP16_UnfusedOptimizer): bf16 grads 2.0 B/param, no fp32 gradient outside step()."""
    it = _items(_cfg(0))
    assert it["lora_grads"].bytes == 2 * P and it["lora_grads"].phase == "static"
    assert it["step_fp32_grad_copy"].bytes == 4 * P and it["step_fp32_grad_copy"].phase == "step"
    # DeepSpeed 0.19.8 refuses fp32 accumulation at ZeRO-0 ("unsupported mix of model_dtype and grad_accum_dtype")
    with pytest.raises(QLoRADSError, match="grad_accum_dtype"):
        apply_ds_config(_cfg(0), {"zero_optimization": {"stage": 0}, "data_types": {"grad_accum_dtype": "fp32"}})
    # at ZeRO-1 it selects BF16_Optimizer: a full fp32 buffer (measured 4.0 B/param) beside the bf16 grads
    bf16_opt = _items(apply_ds_config(_cfg(1, world=2), {"zero_optimization": {"stage": 1},
                                                          "data_types": {"grad_accum_dtype": "fp32"}}))
    assert bf16_opt["lora_grads"].bytes == 6 * P and "reduce_bucket" not in bf16_opt
    assert "step_fp32_grad_copy" not in bf16_opt


def test_zero1_step_copies_only_this_ranks_partition():
    """stage_1_and_2.py step: flat_grad_partition.to(fp32) has partition_size[i] = P/N elements at ZeRO-1 as at 2."""
    for zero in (1, 2):
        assert _items(_cfg(zero, world=4))["step_fp32_grad_copy"].bytes == 4 * P / 4


def test_offload_moves_its_terms_to_the_host():
    base = _cfg(2)
    off = apply_ds_config(base, {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"},
                                                       "reduce_bucket_size": 1_000_000}})
    on, moved = estimate_memory(base), estimate_memory(off)
    host = {it.name for it in moved.items if it.phase == "host"}
    assert host == {"master_weights", "optimizer_states", "offload_grad_buffers"}
    assert moved.host == 4 * P + 8 * P + 6 * P and "step_fp32_grad_copy" not in _items(off)
    # the masters leave the GPU figure; the paged moments were spillable already
    assert moved.required == pytest.approx(on.required - 4 * P, abs=1)
    assert moved.spillable == 0 and moved.as_dict()["host_bytes"] == 18 * P
    z3 = apply_ds_config(base, {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"},
                                                      "offload_param": {"device": "cpu"}}})
    items = _items(z3)
    assert all(items[k].phase == "host" for k in ("quantized_linears", "embeddings_norms", "lora_params",
                                                   "lora_grads", "master_weights", "optimizer_states"))
    assert items["reduce_bucket"].phase == "static" and "step_fp32_grad_copy" not in items
    assert "on the host (offload)" in format_report(plan(z3))
    with pytest.raises(QLoRADSError, match="offload needs ZeRO"):
        replace(off, zero_stage=0)
    # DeepSpeed ignores offload_param below stage 3 (finetune refuses it): no plan claims it
    with pytest.raises(QLoRADSError, match=r"offload_param needs ZeRO stage 3 \(DeepSpeed ignores it at stage 2\)"):
        apply_ds_config(base, {"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}})


QALORA_RECIPE = {"method": "qalora", "bits": 2, "group_size": 64, "lora_r": 64, "max_len": 2048, "micro_batch": 4,
                 "grad_accum": 4, "optimizer": "PagedAdamW8bit", "grad_ckpt": True, "dtype": "bf16", "lr": 1e-4,
                 "_comment": "ignored",
                 "ds_config": {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                               "zero_optimization": {"stage": 2}}}


def test_recipe_plans_what_finetune_runs():
    base = PlanConfig(shape=shape_from_hf_config(TINY))
    c = apply_recipe(base, QALORA_RECIPE)
    assert (c.quant, c.base_bits, c.group_size, c.micro_batch, c.grad_accum) == ("int", 2, 64, 4, 4)
    assert (c.optim_bits, c.paged, c.chunked_loss, c.zero_stage, c.seq_len) == (8, True, True, 2, 2048)
    # no optimizer anywhere: finetune's PagedAdamW; no chunked_loss key: finetune's default (on)
    plain = apply_recipe(replace(base, chunked_loss=False), {"lora_r": 8, "ds_config": {"zero_optimization": {}}})
    assert (plain.paged, plain.optim_bits, plain.chunked_loss, plain.quant) == (True, 32, True, "nf4")
    assert not apply_recipe(base, {"chunked_loss": False}).chunked_loss
    with pytest.raises(QLoRADSError, match=r"unknown keys \['micro_batch_size'\]"):
        apply_recipe(base, {"micro_batch_size": 4})
    conflict = {**QALORA_RECIPE, "ds_config": {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "AdamW"}}}
    with pytest.raises(QLoRADSError, match="micro_batch 4 vs .* 2; optimizer PagedAdamW8bit vs ds_config AdamW"):
        apply_recipe(base, conflict)


def test_recipe_keys_are_finetunes():
    """The planner refuses exactly the recipe keys finetune refuses: its list is finetune's argparse destinations."""
    import argparse
    from unittest import mock

    from qlora_ds.plan import FINETUNE_KEYS
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    try:
        import finetune
    finally:
        sys.path.pop(0)
    seen = {}
    real = argparse.ArgumentParser.parse_args

    def spy(self, *a, **k):
        seen["dests"] = {action.dest for action in self._actions}
        return real(self, *a, **k)
    with mock.patch.object(argparse.ArgumentParser, "parse_args", spy):
        finetune.parse_args(["--model", "m", "--dataset", "d", "--output-dir", "o"])
    assert FINETUNE_KEYS == seen["dests"]


def test_cli_plans_the_chunked_loss_by_default(tmp_path):
    from qlora_ds.plan.__main__ import config_from_args, parse_args
    cli = ["--model", "llama-7b", "--seq-len", "2048"]
    on, off = config_from_args(parse_args(cli)), config_from_args(parse_args(cli + ["--no-chunked-loss"]))
    assert on.chunked_loss and not off.chunked_loss
    assert estimate_memory(off).get("logits_loss") == 2048 * 32000 * 12
    assert estimate_memory(on).get("logits_loss") < estimate_memory(off).get("logits_loss") / 3
    assert "loss chunked" in format_report(plan(on))
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"chunked_loss": False, "method": "qalora", "bits": 3}))
    from_recipe = config_from_args(parse_args(cli + ["--recipe", str(recipe)]))
    assert not from_recipe.chunked_loss and (from_recipe.quant, from_recipe.base_bits) == ("int", 3)
    assert config_from_args(parse_args(cli + ["--recipe", str(recipe), "--chunked-loss"])).chunked_loss


def test_qalora_group_size_must_divide_every_input():
    shape = shape_from_hf_config(TINY)         # inputs 256 and 512
    with pytest.raises(QLoRADSError, match=r"group_size=48 .*\(not \[256, 512\]\)"):
        PlanConfig(shape=shape, quant="int", base_bits=4, group_size=48)
    with pytest.raises(QLoRADSError, match="group_size=7"):
        PlanConfig(shape=shape, quant="int", base_bits=4, group_size=7)
    assert PlanConfig(shape=shape, quant="int", base_bits=4, group_size=128).base_bits_per_param == 4.5
    out = subprocess.run([sys.executable, "-m", "qlora_ds.plan", "--model", "llama-7b", "--quant", "int",
                          "--group-size", "7"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 2 and "group_size=7" in out.stdout + out.stderr


def test_missing_tie_word_embeddings_takes_the_model_types_default():
    """transformers' per-class default: Llama untied, Gemma tied (google/gemma-7b's config.json has no such key)."""
    base = {k: v for k, v in TINY.items() if k != "tie_word_embeddings"}
    assert shape_from_hf_config({**base, "model_type": "gemma"}).tie_embeddings
    assert not shape_from_hf_config(base).tie_embeddings
    assert not shape_from_hf_config({k: v for k, v in base.items() if k != "model_type"}).tie_embeddings
    assert not shape_from_hf_config({**base, "model_type": "gemma", "tie_word_embeddings": False}).tie_embeddings


@pytest.mark.parametrize("model_type", ["t5", "mamba", "gptj"])
def test_layouts_the_planner_does_not_model_are_refused(model_type):
    """A model type without a layout (plan/layouts.py) is refused, also beside a finetune run; the layouts it has
    are counted against transformers in tests/test_plan_layouts.py."""
    with pytest.raises(QLoRADSError, match=f"model_type '{model_type}' is not modelled"):
        shape_from_hf_config({**TINY, "model_type": model_type})
    from qlora_ds.plan.run_check import config_for_run
    with pytest.raises(QLoRADSError, match="not modelled"):
        config_for_run({**TINY, "model_type": model_type}, {}, world=1, device="cpu", seq_len=8, lora_r=8,
                       lora_dropout=0.0, targets=None, grad_ckpt=True)


MOE = {"mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
       "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                         shared_expert_intermediate_size=48),
       "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)}


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_host_load_lists_the_moe_experts(model_type):
    """plan/host.py's load order holds every tensor the model has: the experts and routers too; 4-bit experts (the
    default) keep their quantized bytes, 16-bit ones their load dtype's."""
    import transformers as tf

    from qlora_ds.plan.host import estimate_load, load_order
    config = tf.AutoConfig.for_model(model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                     **MOE[model_type])
    model = tf.AutoModelForCausalLM.from_config(config)
    cfg = config.to_dict()
    order = load_order(cfg)
    assert sum(n for _, n, *_ in order) == sum(p.numel() for p in model.parameters())
    from qlora_ds.plan.host import nf4_dq_bytes
    s = shape_from_hf_config(cfg)
    assert sum(n for _, n, *_ in load_order(cfg, quantize_experts=False)) == sum(n for _, n, *_ in order)
    assert estimate_load(cfg, runtime_bytes=0, quantize_experts=False).resident > 2 * s.expert_params
    saved = s.layers * sum(2 * n - nf4_dq_bytes(n) for n in s.expert_tensors())      # bf16 vs NF4 + DQ
    assert (estimate_load(cfg, runtime_bytes=0, quantize_experts=False).resident
            - estimate_load(cfg, runtime_bytes=0).resident) == saved


def test_old_bfloat16_section_is_read_as_bf16():
    """DeepSpeed reads "bfloat16" where "bf16" is absent: its bf16_master_weights_and_grads counts too."""
    base = PlanConfig(shape=shape_from_hf_config(TINY))
    section = {"enabled": True, "bf16_master_weights_and_grads": True}
    assert apply_ds_config(base, {"bfloat16": section}).bf16_master
    assert apply_ds_config(base, {"bf16": section, "bfloat16": dict(section)}).bf16_master
    assert not apply_ds_config(base, {"bfloat16": {"enabled": True}}).bf16_master
    with pytest.raises(QLoRADSError, match="both \"bf16\" .* and its old name \"bfloat16\" .* disagree"):
        apply_ds_config(base, {"bf16": {"enabled": True}, "bfloat16": section})


def test_recipe_dtype_is_planned(tmp_path, monkeypatch):
    """A recipe's explicit dtype is planned; its "auto" (or none) is what finetune --dtype auto picks on the planned
    device (the CLI resolves it: on an AVX2 host, fp32); a --dtype flag overrides the recipe."""
    from qlora_ds import hardware
    from qlora_ds.plan.__main__ import config_from_args, parse_args
    monkeypatch.setattr(hardware, "device_facts", lambda device: hardware.DeviceFacts("cpu", "CPU", cpu_isa="avx2"))
    cli = ["--model", "llama-7b", "--device", "cpu"]
    for dtype, want in (("auto", "fp32"), ("bf16", "bf16"), ("fp16", "fp16"), (None, "fp32")):
        recipe = tmp_path / f"{dtype}.json"
        recipe.write_text(json.dumps({"lora_r": 8} if dtype is None else {"lora_r": 8, "dtype": dtype}))
        assert config_from_args(parse_args(cli + ["--recipe", str(recipe)])).compute_dtype == want, dtype
        assert config_from_args(parse_args(cli + ["--recipe", str(recipe), "--dtype", "fp16"])).compute_dtype == "fp16"
        assert config_from_args(parse_args(cli + ["--recipe", str(recipe), "--dtype", "auto"])).compute_dtype == "fp32"
    base = PlanConfig(shape=shape_from_hf_config(TINY), compute_dtype="fp32")
    assert apply_recipe(base, {"dtype": "auto"}).compute_dtype == "fp32"
    assert apply_recipe(base, {"dtype": "bf16"}).compute_dtype == "bf16"


ACCUM_P = 64 * 64 + 32 * 64       # the probe's two bf16 linears
ACCUM_BUCKET = 10_000


def _grad_buffer_probe(stage: int, accum: str) -> list:
    """One rank of DeepSpeed (bf16, two linears, 2 micro steps per step) at ``stage`` with data_types.grad_accum_dtype
    ``accum`` (or none): [live tensor bytes after the boundary's backward (over those before initialize), the
    allocations of at least 1 KiB of the second step's backward and of its step]. Run in its own interpreter."""
    import gc

    import deepspeed
    import torch
    from torch.profiler import ProfilerActivity, profile

    def allocations(fn) -> list:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        return sorted(e.cpu_memory_usage for e in prof.events()
                      if e.cpu_memory_usage >= 1024 and not e.cpu_children and e.name != "[memory]")

    def live() -> int:
        gc.collect()
        tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
        tensors += [p.grad for p in model.parameters() if p.grad is not None]
        return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors
                    if t.device.type == "cpu"}.values())

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64, bias=False), torch.nn.Linear(64, 32, bias=False))
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "bf16": {"enabled": True},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}, "steps_per_print": 1000,
          "zero_optimization": {"stage": stage, "reduce_bucket_size": ACCUM_BUCKET, "overlap_comm": False,
                                "contiguous_gradients": True}}
    if accum:
        ds["data_types"] = {"grad_accum_dtype": accum}
    before = live()
    engine, *_ = deepspeed.initialize(model=model, config=ds, model_parameters=model.parameters())
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    for micro in range(4):       # two optimizer steps: the second one finds Adam's moments allocated
        loss = engine(x).float().pow(2).mean()
        backward = allocations(lambda: engine.backward(loss))
        del loss
        kept = live() - before
        step = allocations(engine.step) if micro == 3 else engine.step()
    return [kept, backward, step]


@pytest.mark.slow
def test_grad_accum_dtype_fp32_at_zero2_and_3_keeps_the_gradient_partition_in_fp32():
    """data_types.grad_accum_dtype "fp32" in bf16 at ZeRO-2 and 3 (DeepSpeed 0.19.8, measured with one rank): the
    accumulated gradient partition is fp32 (ZeRO-2's flat fp32 buffer in place of the bf16 grads_in_partition;
    ZeRO-3's grad_partitions_flat_buffer): +2 B/param kept. The step then makes no fp32 copy (ZeRO-2 not even its
    flatten: -6 B/param of allocations; ZeRO-3 flattens 4 B instead of 2 + 4: -2 B/param). The bf16 reduce bucket
    is the same (ZeRO-2 allocates it every backward; ZeRO-3 keeps it). Each difference is the planner's."""
    from .dist_utils import dist_env
    got = {}
    for stage in (2, 3):
        for accum in ("", "fp32"):
            code = (f"import json; from tests.test_plan_zero import _grad_buffer_probe; "
                    f"print(json.dumps(_grad_buffer_probe({stage}, {accum!r})))")
            proc = subprocess.run([sys.executable, "-c", code], env=dist_env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"),
                                  capture_output=True, text=True, timeout=300, cwd=ROOT)
            assert proc.returncode == 0, proc.stderr[-3000:]
            got[f"{stage}/{accum}"] = json.loads(proc.stdout.strip().splitlines()[-1])
    shape = shape_from_hf_config(TINY)
    for stage in (2, 3):
        (kept, bwd, step), (kept32, bwd32, step32) = got[f"{stage}/"], got[f"{stage}/fp32"]
        plain = _items(PlanConfig(shape=shape, zero_stage=stage, reduce_bucket_elems=ACCUM_BUCKET))
        accum = _items(PlanConfig(shape=shape, zero_stage=stage, reduce_bucket_elems=ACCUM_BUCKET,
                                  grad_accum_fp32=True))
        p = plain["lora_grads"].bytes / 2                       # the planner's P
        assert kept32 - kept == 2 * ACCUM_P == (accum["lora_grads"].bytes - plain["lora_grads"].bytes) / p * ACCUM_P
        planned_step = [sum(it.bytes for it in items.values() if it.phase == "step") / p * ACCUM_P
                        for items in (plain, accum)]
        assert sum(step32) - sum(step) == planned_step[1] - planned_step[0] == -(6 if stage == 2 else 2) * ACCUM_P
        assert accum["reduce_bucket"].bytes == plain["reduce_bucket"].bytes
        if stage == 2:
            assert 2 * ACCUM_BUCKET in bwd and 2 * ACCUM_BUCKET in bwd32      # allocated afresh, bf16, both ways
    # ZeRO-1 in bf16: BF16_Optimizer instead (test_zero0_keeps_16bit_grads_and_copies_to_fp32_in_the_step); with fp32
    # compute the dtype is the model's already: nothing changes
    fp32 = PlanConfig(shape=shape, zero_stage=2, compute_dtype="fp32")
    assert _items(fp32) == _items(replace(fp32, grad_accum_fp32=True))
