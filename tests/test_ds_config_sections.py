"""Users' own ds_config sections under finetune: what DeepSpeed does from hooks on the engine's forward outputs
(offloaded ZeRO gradient accumulation, wall-clock timers) works with the chunked loss, which returns its own loss;
monitor sections get our losses and gradient norm, under the run's output directory; comms_logger prints its
summary; sections DeepSpeed would ignore or fail on late are refused before the model loads."""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import types

import pytest
import torch
from safetensors.torch import load_file

from qlora_ds.ds_config import resolve_ds_config
from qlora_ds.errors import QLoRADSError

from .dist_utils import REPO, check, dist_env
from .test_finetune_resume import DS, FINETUNE, _args, _finetune, _steps, word  # noqa: F401 - word is a fixture


def _run(word, name, ds, *extra):
    path = word["root"] / f"{name}.ds.json"
    path.write_text(json.dumps(ds))
    out = word["root"] / name
    check(_finetune(*_args(word, out, "--max-steps", "2", "--eval-size", "0", "--warmup-ratio", "0", "--dtype",
                           "fp32", *extra, ds=str(path))))
    return [r["loss"] for r in _steps(out)], load_file(str(out / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("timers", [False, True])
def test_offloaded_accumulation_with_the_chunked_loss_equals_full_logits(word, timers):
    """ZeRO-2 with offload_optimizer, accumulation 2, and LoRA gradients reduced during backward (the LoRA is
    larger than reduce_bucket_size, as a 7B r64 LoRA is with configs/ds_single_gpu.json's 5e7): the chunked loss
    trained on wrong gradients (the engine's backward prologue never ran: the adapter was 0.97 relatively off)."""
    ds = {**DS, "zero_force_ds_cpu_optimizer": False, "optimizer": {"type": "PagedAdamW", "params": {"lr": 1e-3}},
          "zero_optimization": {"stage": 2, "reduce_bucket_size": 1000, "offload_optimizer": {"device": "cpu"}},
          "wall_clock_breakdown": timers}   # its timers start in that prologue too (it crashed without it)
    chunked_loss, chunked = _run(word, f"offload_chunked_{timers}", ds)
    full_loss, full = _run(word, f"offload_full_{timers}", ds, "--no-chunked-loss")
    assert len(chunked_loss) == len(full_loss) == 2
    assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(chunked_loss, full_loss)), (chunked_loss, full_loss)
    for k, ref in full.items():
        assert torch.allclose(chunked[k].float(), ref.float(), rtol=1e-4, atol=1e-6), k


# ------------------------------------------------------------------------- monitors, comms_logger, grad norm

def _monitored_run(word, name, zero, monitors, env=None):
    """A 2-step fp32 finetune (4 samples a step) with ``monitors`` sections, started from its own empty directory
    (DeepSpeed's default monitor path is the current directory): (output dir, that directory, the process)."""
    cwd = word["root"] / f"{name}_cwd"
    cwd.mkdir()
    ds = {**DS, "zero_force_ds_cpu_optimizer": False, "zero_optimization": zero, **monitors}
    path = word["root"] / f"{name}.ds.json"
    path.write_text(json.dumps(ds))
    out = word["root"] / name
    args = _args(word, out, "--max-steps", "2", "--eval-size", "4", "--warmup-ratio", "0", "--dtype", "fp32",
                 ds=str(path))
    proc = subprocess.run([sys.executable, str(FINETUNE), *args], env=dist_env(**(env or {})), capture_output=True,
                          text=True, timeout=300, cwd=cwd)
    return out, cwd, proc


def _csv(path):
    rows = path.read_text().splitlines()
    return rows[0], [tuple(float(v) for v in r.split(",")) for r in rows[1:]]


@pytest.fixture(scope="module")
def monitored(word):
    """The same run at ZeRO-2 (csv_monitor at a relative output_path) and at ZeRO-3 with parameters and optimizer
    offloaded (csv_monitor without an output_path, comms_logger on)."""
    z2 = _monitored_run(word, "mon_z2", {"stage": 2},
                        {"csv_monitor": {"enabled": True, "output_path": "csv", "job_name": "job"}})
    z3 = _monitored_run(word, "mon_z3", {"stage": 3, "offload_param": {"device": "cpu"},
                                         "offload_optimizer": {"device": "cpu"}},
                        {"csv_monitor": {"enabled": True},
                         "comms_logger": {"enabled": True, "verbose": False, "prof_all": True}})
    for _, _, proc in (z2, z3):
        check(proc)
    return {"z2": z2, "z3": z3}


@pytest.mark.parametrize("stage", ["z2", "z3"])
def test_monitor_sections_get_the_train_and_heldout_loss_under_the_output_dir(monitored, stage):
    """DeepSpeed 0.19 writes only Train/Samples/lr: the loss curves were missing; and without an output_path its
    files went to the current directory (appended to by every run started there)."""
    out, cwd, _ = monitored[stage]
    assert list(cwd.iterdir()) == []                         # nothing in the directory the run started from
    job = out / "csv" / "job" if stage == "z2" else out / "monitor" / "DeepSpeedJobName"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps, evals = [r for r in rows if "loss" in r], [r for r in rows if "eval_loss" in r]
    header, train = _csv(job / "Train_Samples_train_loss.csv")   # x: samples trained (micro 2 × accum 2 = 4 a step)
    assert header == "step,train_loss" and train == [(4.0 * r["step"], r["loss"]) for r in steps] and len(train) == 2
    held_out = _csv(job / "Train_Samples_eval_loss.csv")[1]
    assert held_out == [(4.0 * r["step"], r["eval_loss"]) for r in evals] and [x for x, _ in held_out] == [0.0, 8.0]
    assert _csv(job / "Train_Samples_grad_norm.csv")[1] == [(4.0 * r["step"], r["grad_norm"]) for r in steps]
    assert [x for x, v in _csv(job / "Train_Samples_tokens_per_s.csv")[1] if v > 0] == [4.0, 8.0]
    assert [x for x, _ in _csv(job / "Train_Samples_lr.csv")[1]] == [4.0, 8.0]      # DeepSpeed's own, same x


def test_grad_norm_is_logged_under_zero2_and_zero3_offload(monitored):
    """metrics.jsonl had no gradient norm (the recipe clips at 0.3: is clipping active?). The pre-clip norm of
    each step, the same at ZeRO-2 and at ZeRO-3 with offload (same seed, data, fp32)."""
    norms = {stage: [r["grad_norm"] for r in _steps(monitored[stage][0])] for stage in ("z2", "z3")}
    assert len(norms["z2"]) == 2 and all(isinstance(n, float) and n > 0 for n in norms["z2"] + norms["z3"])
    assert norms["z3"] == pytest.approx(norms["z2"], rel=1e-4)


def test_zero3_counts_the_partitioned_trainable_params(monitored):
    """ZeRO-3 partitions parameters to numel 0: the start-up line said "0.00 M trainable params"."""
    counts = {stage: re.findall(r"([\d.]+) M trainable params", monitored[stage][2].stderr)
              for stage in ("z2", "z3")}
    assert counts["z3"] == counts["z2"] and len(counts["z2"]) == 1 and float(counts["z2"][0]) > 0


def test_comms_logger_prints_its_summary(monitored):
    """An enabled comms_logger printed nothing: DeepSpeed prints its table only when asked (log_summary)."""
    assert "Comm. Op" in monitored["z3"][2].stdout
    assert "Comm. Op" not in monitored["z2"][2].stdout


def test_monitor_without_its_package_fails_before_the_model_loads(word, tmp_path):
    """It failed inside deepspeed.initialize, after the model load and data build, as exit 1 with a bare
    ModuleNotFoundError, leaving a run_config.json that made the rerun need --resume or --overwrite."""
    stub = tmp_path / "stub" / "tensorboard"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError(\"No module named 'tensorboard'\")\n")   # absent, wherever
    out, _, proc = _monitored_run(word, "mon_missing", {"stage": 2}, {"tensorboard": {"enabled": True}},
                                  env={"PYTHONPATH": os.pathsep.join([str(stub.parent), str(REPO)])})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "tensorboard section is enabled, but tensorboard cannot be imported" in proc.stderr
    assert "`pip install tensorboard`" in proc.stderr
    assert not (out / "run_config.json").exists()
    assert "trainable params" not in proc.stderr             # refused before the model and engine were built


def _resolve(ds_config: dict, output_dir=None) -> dict:
    args = argparse.Namespace(ds_config=ds_config, dtype="fp32", micro_batch=None, grad_accum=None,
                              max_grad_norm=None, optimizer=None, lr=None, adam_beta2=None, weight_decay=None,
                              output_dir=output_dir)
    return resolve_ds_config(args, 1, "cpu")


def test_monitor_packages_and_output_paths(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)           # import wandb -> ImportError
    with pytest.raises(QLoRADSError, match=r"`pip install wandb` \(.*WANDB_MODE=offline\)"):
        _resolve({"wandb": {"enabled": True}})
    _resolve({"wandb": {"enabled": False}})                  # disabled: not imported
    monkeypatch.setitem(sys.modules, "tensorboard", types.ModuleType("tensorboard"))
    cfg = _resolve({"tensorboard": {"enabled": True}, "csv_monitor": {"enabled": True, "output_path": "/abs"}},
                   str(tmp_path))
    assert cfg["tensorboard"] == {"enabled": True, "output_path": str(tmp_path / "monitor")}
    assert cfg["csv_monitor"]["output_path"] == "/abs"        # an absolute path is kept
    cfg = _resolve({"csv_monitor": {"enabled": True, "output_path": "logs/"}}, str(tmp_path))
    assert cfg["csv_monitor"]["output_path"] == str(tmp_path / "logs") + "/"


@pytest.mark.parametrize("stage,device,refused", [(2, "cpu", True), (1, "nvme", True), (0, "cpu", True),
                                                  (3, "cpu", False), (2, "none", False)])
def test_offload_param_below_zero3_is_refused(stage, device, refused):
    """DeepSpeed ignores offload_param below stage 3 without a word (and the planner's header claimed it)."""
    ds = {"zero_optimization": {"stage": stage, "offload_param": {"device": device}}}
    if not refused:
        assert _resolve(ds)["zero_optimization"]["offload_param"] == {"device": device}
        return
    with pytest.raises(QLoRADSError, match=rf"offload_param \(device '{device}'\) needs ZeRO stage 3; stage {stage} "
                                           rf"keeps the parameters on the device"):
        _resolve(ds)
