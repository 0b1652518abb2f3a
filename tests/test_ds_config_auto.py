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
        _resolve({"train_micro_batch_size_per_gpu": "auto", "train_batch_size": 8}, grad_accum=1)


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
