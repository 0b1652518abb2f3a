"""resolve_ds_config with HF-style "auto" batch values: filled from the command line or the defaults (as the HF
Trainer integration does), never multiplied as strings or handed to DeepSpeed; other non-numbers are refused."""
from __future__ import annotations

import argparse

import pytest

from qlora_ds.ds_config import resolve_ds_config
from qlora_ds.errors import QLoRADSError

BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "gradient_clipping")
HF_AUTO = {key: "auto" for key in BATCH_KEYS}


def _resolve(ds_config: dict, world: int = 2, **flags) -> dict:
    args = argparse.Namespace(ds_config={**ds_config, "zero_optimization": {"stage": 2}}, dtype="fp32",
                              micro_batch=None, grad_accum=None, max_grad_norm=None, optimizer=None, lr=None,
                              adam_beta2=None, weight_decay=None)
    vars(args).update(flags)
    cfg = resolve_ds_config(args, world, "cpu")
    return {key: cfg[key] for key in BATCH_KEYS}


def test_auto_batch_values_take_the_defaults():
    # used to be a TypeError: can't multiply sequence by non-int of type 'str'
    assert _resolve(HF_AUTO) == {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 16,
                                 "train_batch_size": 32, "gradient_clipping": 0.3}


def test_auto_batch_values_take_the_command_line():
    # used to be "train_micro_batch_size_per_gpu=auto conflicts with the command line (2)"
    assert _resolve(HF_AUTO, micro_batch=2, grad_accum=4, max_grad_norm=1.0) == {
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4, "train_batch_size": 16,
        "gradient_clipping": 1.0}


def test_partial_auto_with_numbers_elsewhere():
    # used to resolve train_batch_size to 'autoauto' and keep gradient_clipping 'auto'
    got = _resolve({"train_micro_batch_size_per_gpu": "auto", "gradient_clipping": "auto"}, grad_accum=1)
    assert got == {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": 2,
                   "gradient_clipping": 0.3}
    got = _resolve({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": "auto",
                    "train_batch_size": "auto", "gradient_clipping": 0})
    assert got == {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 16, "train_batch_size": 64,
                   "gradient_clipping": 0}
    with pytest.raises(QLoRADSError, match="train_micro_batch_size_per_gpu=2 conflicts with the command line"):
        _resolve({"train_micro_batch_size_per_gpu": 2, "train_batch_size": "auto"}, micro_batch=4)
    with pytest.raises(QLoRADSError, match="train_batch_size=8 but micro batch 1"):
        _resolve({"train_micro_batch_size_per_gpu": "auto", "train_batch_size": 8}, grad_accum=1, micro_batch=1)


@pytest.mark.parametrize("key,value,want", [
    ("train_micro_batch_size_per_gpu", "Auto", "a positive integer"),
    ("gradient_accumulation_steps", 0, "a positive integer"),
    ("gradient_accumulation_steps", 2.5, "a positive integer"),
    ("train_batch_size", "32", "a positive integer"),
    ("train_micro_batch_size_per_gpu", True, "a positive integer"),
    ("gradient_clipping", "none", "a number >= 0"),
    ("gradient_clipping", -1.0, "a number >= 0"),
])
def test_other_non_numbers_are_refused_naming_the_key(key, value, want):
    with pytest.raises(QLoRADSError, match=rf"ds_config {key}={value!r} must be {want} or \"auto\""):
        _resolve({key: value})


def test_the_planner_reads_auto_values_as_its_defaults():
    """``python -m qlora_ds.plan --ds-config`` on an HF-style config (it raised ``int('auto')``)."""
    from qlora_ds.plan import PlanConfig, apply_ds_config, load_shape
    base = PlanConfig(shape=load_shape("llama-7b"), micro_batch=3, grad_accum=5)
    got = apply_ds_config(base, {**HF_AUTO, "zero_optimization": {
        "stage": 3, "reduce_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
        "stage3_max_live_parameters": 2e8}})
    assert (got.zero_stage, got.micro_batch, got.grad_accum) == (3, 3, 5)
    assert (got.reduce_bucket_elems, got.persistence_threshold, got.max_live_parameters) == (500_000_000, 100_000,
                                                                                             200_000_000)


def test_auto_optimizer_params_take_the_command_line_or_the_defaults():
    """An HF-style optimizer section ({"lr": "auto", …}) raised "could not convert string to float: 'auto'"."""
    section = {"type": "PagedAdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}}
    args = argparse.Namespace(ds_config={"optimizer": section, "zero_optimization": {"stage": 2}}, dtype="fp32",
                              micro_batch=None, grad_accum=None, max_grad_norm=None, optimizer=None, lr=1e-4,
                              adam_beta2=None, weight_decay=None)
    params = resolve_ds_config(args, 1, "cpu")["optimizer"]["params"]
    assert params == {"lr": 1e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}
    assert (args.optimizer, args.lr) == ("PagedAdamW", 1e-4)


@pytest.mark.parametrize("ds_config,flags,world,want", [
    # DeepSpeed derives the key left out (runtime/config.py _set_batch_related_parameters); these were refused
    ({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4}, {}, 1, (4, 8)),
    ({"train_batch_size": 32, "gradient_accumulation_steps": 8}, {}, 1, (4, 8)),
    ({"train_batch_size": 32, "gradient_accumulation_steps": "auto"}, {"micro_batch": 4}, 2, (4, 4)),
    ({"train_batch_size": 32}, {"grad_accum": 2}, 2, (8, 2)),
    # alone: micro batch 1 (the default), the accumulation makes up the rest (DeepSpeed: micro 32/world, accum 1)
    ({"train_batch_size": 32}, {}, 1, (1, 32)),
    ({"train_batch_size": 32}, {}, 2, (1, 16)),
    ({"train_batch_size": 12, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3}, {}, 2, (2, 3)),
    ({}, {"micro_batch": 2}, 2, (2, 16)),                    # no train_batch_size: the defaults, as before
])
def test_train_batch_size_with_one_or_none_of_micro_and_accum(ds_config, flags, world, want):
    got = _resolve(ds_config, world, **flags)
    assert (got["train_micro_batch_size_per_gpu"], got["gradient_accumulation_steps"]) == want
    assert got["train_batch_size"] == want[0] * want[1] * world


@pytest.mark.parametrize("ds_config,flags,world,message", [
    ({"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4}, {}, 1,
     "train_batch_size=30 is not a multiple of micro batch 4 × 1 ranks = 4, so no whole gradient accumulation fits"),
    ({"train_batch_size": 32}, {"grad_accum": 3}, 2,
     "train_batch_size=32 is not a multiple of gradient accumulation 3 × 2 ranks = 6, so no whole micro batch fits"),
    ({"train_batch_size": 7}, {}, 2, "train_batch_size=7 is not a multiple of the 2 ranks"),
    ({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4}, {"grad_accum": 2}, 1,
     "train_batch_size=32 but micro batch 4 × gradient accumulation 2 × 1 ranks = 8"),
])
def test_batch_errors_name_only_what_was_set(ds_config, flags, world, message):
    """The missing key took our default (accumulation 16) and the error named it: 'micro batch 4 × gradient
    accumulation 16 × 1 ranks = 64' for a config that never set an accumulation."""
    with pytest.raises(QLoRADSError) as err:
        _resolve(ds_config, world, **flags)
    assert message in str(err.value)
    assert "16" not in str(err.value)


def test_fp16_on_a_cpu_suggests_bf16_only_where_it_is_native(monkeypatch):
    """The error suggested "--dtype ... or bf16" also on CPUs that emulate bf16 (15-30x slower than fp32)."""
    from qlora_ds import hardware
    from qlora_ds.hardware import DeviceFacts

    monkeypatch.setattr("deepspeed.accelerator.get_accelerator", lambda: type("A", (), {
        "is_fp16_supported": lambda self: False})())
    messages = {}
    for isa in ("avx2", "amx"):
        monkeypatch.setattr(hardware, "device_facts", lambda device, isa=isa: DeviceFacts("cpu", "CPU", cpu_isa=isa))
        with pytest.raises(QLoRADSError, match="--dtype fp16 on this CPU") as err:
            _resolve({}, 1, dtype="fp16")
        messages[isa] = str(err.value)
    assert messages["avx2"].endswith("use --dtype auto (fp32 here) or fp32 on this CPU")
    assert "bf16" not in messages["avx2"].split("; ")[1]
    assert messages["amx"].endswith("use --dtype auto (bf16 here), bf16 or fp32 on this CPU")
