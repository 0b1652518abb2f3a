"""Injected faults during real 2-rank finetunes: SIGKILL (also mid-checkpoint), a raising rank, a full disk,
NaN losses, tampered checkpoints. Nothing may be lost: a resumed run equals an uninterrupted one."""
from __future__ import annotations

import json
import os
import time

import pytest
import torch
from safetensors.torch import load_file

from qlora_ds import checkpointing
from qlora_ds.errors import QLoRADSError

from ..dist_utils import REPO, check, run_deepspeed

FINETUNE = REPO / "launch" / "finetune.py"
STEPS = "5"


def _args(tiny, out, *extra):
    return ["--model", tiny["model"], "--dataset", tiny["data"], "--output-dir", str(out),
            "--ds-config", str(REPO / "configs" / "ds_cpu_demo.json"), "--max-len", "64", "--lora-r", "8",
            "--eval-every", "2", "--save-every", "2", "--sample-prompt=", "--max-steps", STEPS, *extra]


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r], [r["eval_loss"] for r in rows if "eval_loss" in r]


def _adapter(out):
    return load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def reference(tiny_run):
    out = tiny_run["root"] / "reference"
    check(run_deepspeed(FINETUNE, *_args(tiny_run, out)))
    return out


@pytest.mark.parametrize("fault", ["kill_after_step:3:1", "kill_in_save:4:0"])
def test_sigkill_then_resume_equals_uninterrupted(tiny_run, reference, fault):
    out = tiny_run["root"] / fault.replace(":", "_")
    start = time.monotonic()
    killed = run_deepspeed(FINETUNE, *_args(tiny_run, out), QLORA_DS_FAULT=fault)
    assert killed.returncode != 0 and time.monotonic() - start < 240   # the job dies, it does not hang
    assert not (out / "adapter").exists()
    ckpt = out / "checkpoints"
    assert checkpointing.latest_complete(str(ckpt)) == "step0000002"      # a half-saved step 4 is skipped
    check(run_deepspeed(FINETUNE, *_args(tiny_run, out, "--resume")))
    assert _losses(out) == _losses(reference)
    a, b = _adapter(reference), _adapter(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_raising_rank_fails_the_job_and_is_named(tiny_run):
    out = tiny_run["root"] / "raise"
    start = time.monotonic()
    proc = run_deepspeed(FINETUNE, *_args(tiny_run, out), QLORA_DS_FAULT="raise_at_step:2:1")
    assert proc.returncode != 0 and time.monotonic() - start < 240
    assert "rank 1 failed: RuntimeError: injected fault raise_at_step at step 2" in proc.stdout + proc.stderr


def test_disk_full_during_save_keeps_last_good_checkpoint(tiny_run):
    out = tiny_run["root"] / "enospc"
    proc = run_deepspeed(FINETUNE, *_args(tiny_run, out), QLORA_DS_FAULT="enospc_in_save:4:1")
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "saving checkpoint step 4 failed" in text and "No space left on device" in text
    ckpt = out / "checkpoints"
    assert checkpointing.latest_complete(str(ckpt)) == "step0000002"
    assert not (ckpt / "step0000004").exists()


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nan_loss_policy(tiny_run, policy):
    out = tiny_run["root"] / f"nan_{policy}"
    proc = run_deepspeed(FINETUNE, *_args(tiny_run, out, "--nan-policy", policy, "--max-steps", "3"),
                         QLORA_DS_FAULT="nan_loss_at_micro_step:2:0")
    text = proc.stdout + proc.stderr
    if policy == "stop":
        assert proc.returncode != 0 and "non-finite loss at step 1" in text
    else:
        check(proc)
        assert "non-finite loss at step 1 (micro step 2) on at least one rank: skipped on every rank" in text
        steps, _ = _losses(out)
        assert [s for s, _ in steps] == [1, 2, 3] and all(l == l for _, l in steps)  # noqa: E741 - no NaN logged


def test_tampered_or_planted_checkpoint_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_DS_SECRET_DIR", str(tmp_path.parent / f"{tmp_path.name}-secrets"))
    tag = tmp_path / "step0000002"
    tag.mkdir()
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"genuine bytes")
    checkpointing.write_manifest(str(tag), 2)
    assert checkpointing.latest_complete(str(tmp_path)) == "step0000002"
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"a planted pickle")
    with pytest.raises(QLoRADSError, match="changed after it was written"):
        checkpointing.latest_complete(str(tmp_path))
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"genuine bytes")
    (tag / "extra.pt").write_bytes(b"x")
    with pytest.raises(QLoRADSError, match="did not write"):
        checkpointing.latest_complete(str(tmp_path))


def test_resume_refuses_a_planted_tag_then_resumes_the_genuine_one(tiny_run, reference, evil):
    """A planted newest tag with a matching (unsigned) sha256 manifest stops ``--resume`` on every rank with a
    clear message before DeepSpeed may unpickle it; once it is removed the run's own checkpoint verifies."""
    import hashlib
    import shutil

    write, marker = evil
    out = tiny_run["root"] / "planted"
    shutil.copytree(reference, out)
    run_config = json.loads((out / "run_config.json").read_text())
    (out / "run_config.json").write_text(json.dumps({**run_config, "output_dir": str(out)}))   # the same run, moved
    ckpt = out / "checkpoints"
    assert checkpointing.latest_complete(str(ckpt)) == "step0000005"
    planted = ckpt / "step0000009"
    planted.mkdir()
    write(planted / "mp_rank_00_model_states.pt")
    digest = hashlib.sha256((planted / "mp_rank_00_model_states.pt").read_bytes()).hexdigest()
    run_id = json.loads((ckpt / checkpointing.RUN_FILE).read_text())["run_id"]
    (planted / checkpointing.MANIFEST).write_text(json.dumps(
        {"run_id": run_id, "tag": planted.name, "step": 9, "files": {"mp_rank_00_model_states.pt": digest}}))
    proc = run_deepspeed(FINETUNE, *_args(tiny_run, out, "--resume"))
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "step0000009 was not written by this run" in text
    assert not marker.exists()
    shutil.rmtree(planted)               # a genuine resume end to end: test_sigkill_then_resume_equals_uninterrupted
    assert checkpointing.latest_complete(str(ckpt)) == "step0000005"


def test_sigterm_to_one_rank_stops_every_rank_at_its_step_with_a_checkpoint(tiny_run, reference):
    """A real SIGTERM to rank 1 only, in step 3 (QLORA_DS_FAULT=sigterm_at_step): every rank finishes step 3, saves
    its checkpoint (complete, signed) and exits 143 for the scheduler to requeue; --resume then ends exactly as the
    uninterrupted run. No /dev/shm buffer is left (DeepSpeed's shm all-reduce op is not loaded). The signal used to
    kill rank 1 at once and the job with it, losing step 3."""
    from ..dist_utils import shm_buffers

    out = tiny_run["root"] / "sigterm"
    stopped = run_deepspeed(FINETUNE, *_args(tiny_run, out), QLORA_DS_FAULT="sigterm_at_step:3:1")
    text = stopped.stdout + stopped.stderr
    assert stopped.returncode == 143, text[-4000:]
    for rank in (0, 1):
        assert f"rank {rank}: stopped by SIGTERM at step 3, its checkpoint saved" in text
    assert [s for s, _ in _losses(out)[0]] == [1, 2, 3] and not (out / "adapter").exists()
    assert checkpointing.latest_complete(str(out / "checkpoints")) == "step0000003"
    assert shm_buffers(stopped.master_port) == set()
    check(run_deepspeed(FINETUNE, *_args(tiny_run, out, "--resume")))
    assert _losses(out) == _losses(reference)
    a, b = _adapter(reference), _adapter(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_failed_job_leaves_no_shm_buffer(tiny_run):
    """A rank that raises fails the job; DeepSpeed's CPU shared-memory all-reduce buffers (66 MB of RAM per rank in
    /dev/shm, removed only by a successful run's shutdown) used to stay behind after every failed or killed run.
    That op is no longer loaded, so there are none to leave."""
    from ..dist_utils import shm_buffers

    proc = run_deepspeed(FINETUNE, *_args(tiny_run, tiny_run["root"] / "raise_shm", "--max-steps", "2"),
                         QLORA_DS_FAULT="raise_at_step:1:1")
    assert proc.returncode != 0 and "injected fault raise_at_step at step 1" in proc.stdout + proc.stderr
    assert shm_buffers(proc.master_port) == set()
