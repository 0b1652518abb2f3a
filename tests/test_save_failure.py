"""A checkpoint write that fails on one rank only, inside DeepSpeed's own save_checkpoint (a full disk on one node),
with a real DeepSpeed engine on 2 ranks (torchrun, CPU/gloo) at ZeRO-2 and ZeRO-3, saved as finetune's
``Loop.checkpoint`` saves (the adapter as ``also``). Every rank must get the clear QLoRADSError at once, not block in
DeepSpeed's barrier or the adapter's gather until the process-group timeout.

This file is also the worker: ``torchrun tests/test_save_failure.py MODEL_DIR OUT_DIR``."""
from __future__ import annotations

import json
import os
import sys
import time

import pytest

needs_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
PG_TIMEOUT_S = 20  # a rank left blocked in a collective fails the test after this, instead of hanging


@needs_dev_full
def test_full_disk_on_one_rank_inside_deepspeed_save_fails_every_rank_at_once(tmp_path):
    from tests.dist_utils import check, run_torchrun
    from tests.tiny_models import tiny_model

    tiny_model("llama").save_pretrained(tmp_path / "model")
    check(run_torchrun(__file__, str(tmp_path / "model"), str(tmp_path), nproc=2, timeout=240))
    for stage in (2, 3):
        got = [json.loads((tmp_path / f"rank{r}.json").read_text())[str(stage)] for r in (0, 1)]
        print(f"ZeRO-{stage}:", got)
        assert got[1]["error"].startswith("QLoRADSError: saving checkpoint step 4 failed on rank 1: RuntimeError")
        assert "most likely a full disk" in got[1]["error"]
        assert got[0]["error"].startswith("QLoRADSError: saving checkpoint step 4 failed on another rank")
        assert "last good checkpoint (step0000002) is kept and the partial step0000004 removed" in got[0]["error"]
        assert max(g["seconds"] for g in got) < PG_TIMEOUT_S / 2          # nobody waited for a timeout
        ckpt = tmp_path / f"z{stage}"
        assert got[0]["tags_after_failure"] == ["step0000002"]
        assert got[0]["latest_after_failure"] == "step0000002"
        # the ranks are still in step: the next save (the disk freed) completes and prunes as usual
        assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith("step")) == ["step0000002", "step0000006"]
        assert (ckpt / "latest").read_text() == "step0000006"
        assert (ckpt / "step0000006" / "adapter" / "adapter_model.safetensors").exists()
        # a failed write outside the checkpoint engine (rank 0 copies DeepSpeed's recovery scripts) fails it the same
        assert got[0]["script_error"].startswith("QLoRADSError: saving checkpoint step 8 failed on rank 0: OSError")
        assert got[1]["script_error"].startswith("QLoRADSError: saving checkpoint step 8 failed on another rank")
        assert max(g["script_seconds"] for g in got) < PG_TIMEOUT_S / 2


def test_save_quantized_under_zero3_returns_when_complete_and_fails_on_every_rank(tmp_path):
    """save_quantized gathers on every rank and writes on rank 0: every rank returns once the directory is complete
    (rank 1 reads it at once), and a write failing on rank 0 raises on rank 1 too instead of leaving it waiting."""
    from tests.dist_utils import check, run_torchrun
    from tests.tiny_models import tiny_model

    tiny_model("llama").save_pretrained(tmp_path / "model")
    check(run_torchrun(__file__, str(tmp_path / "model"), str(tmp_path), "quantized", nproc=2, timeout=240))
    got = [json.loads((tmp_path / f"quantized{r}.json").read_text()) for r in (0, 1)]
    assert all(g["complete"] for g in got), got
    assert got[0]["error"].startswith("OSError: [Errno 28] No space left on device"), got
    assert got[1]["error"] == "QLoRADSError: save_quantized: writing " + str(tmp_path / "full") + \
        " failed on rank 0 (its error says why)"
    assert max(g["seconds"] for g in got) < PG_TIMEOUT_S / 2


def test_recovery_script_copy_replaces_a_planted_symlink(tmp_path, monkeypatch):
    """DeepSpeed's copy of its recovery scripts (rank 0, every ZeRO save) followed a symlink planted at
    <ckpt>/zero_to_fp32.py: every save overwrote the file it named with the script and made it executable."""
    import stat

    import torch
    import torch.distributed as dist
    from deepspeed.runtime.engine import DeepSpeedEngine

    from qlora_ds import checkpointing

    class Engine:  # DeepSpeed's own copy of the scripts, after the model states
        _copy_recovery_script = DeepSpeedEngine._copy_recovery_script
        _change_recovery_script_permissions = DeepSpeedEngine._change_recovery_script_permissions

        def __init__(self):
            self.checkpoint_engine = type("Writer", (), {"save": lambda self, sd, path: torch.save(sd, path)})()

        def save_checkpoint(self, ckpt_dir, tag, client_state, save_latest, exclude_frozen_parameters):
            os.makedirs(os.path.join(ckpt_dir, tag))
            path = os.path.join(ckpt_dir, tag, "mp_rank_00_model_states.pt")
            self.checkpoint_engine.save({"client": client_state}, path)
            self._copy_recovery_script(ckpt_dir)

    monkeypatch.setenv("QLORA_DS_SECRET_DIR", str(tmp_path / "secrets"))
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    victim = tmp_path / "notes.txt"
    victim.write_text("my notes\n")
    victim.chmod(0o644)
    (ckpt / "zero_to_fp32.py").symlink_to(victim)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        checkpointing.save(Engine(), str(ckpt), 2, {"step": 2}, keep=2)
    finally:
        dist.destroy_process_group()
    assert victim.read_text() == "my notes\n" and stat.S_IMODE(victim.stat().st_mode) == 0o644
    script = ckpt / "zero_to_fp32.py"
    assert not script.is_symlink() and script.read_text().startswith("#!/usr/bin/env python")
    assert stat.S_IMODE(script.stat().st_mode) & stat.S_IXUSR and (ckpt / "zero_to_torch.py").is_file()
    assert checkpointing.latest_complete(str(ckpt)) == "step0000002"


def _quantized_worker(model_dir: str, out: str) -> None:
    from datetime import timedelta

    import deepspeed
    import torch
    import torch.distributed as dist

    from qlora_ds.inject import from_pretrained, save_quantized
    from qlora_ds.inject.loading import QUANT_META_NAME
    from qlora_ds.nn import QLoRAConfig

    deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=PG_TIMEOUT_S))
    rank = dist.get_rank()
    ds = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    model = from_pretrained(model_dir, QLoRAConfig(r=4, dropout=0.0, compute_dtype=torch.float32), ds_config=ds,
                            torch_dtype=torch.float32)
    good = os.path.join(out, "good")
    save_quantized(model, good)
    result = {"complete": all(os.path.exists(os.path.join(good, f))
                              for f in ("model.safetensors", "config.json", QUANT_META_NAME))}
    from qlora_ds.safetensors_writer import SafetensorsWriter
    real, written = SafetensorsWriter.write, []

    def full_disk(self, name, tensor):   # rank 0's disk fills up after a few tensors (the others go on gathering)
        if len(written) == 3:
            raise OSError(28, "No space left on device", name)
        written.append(name)
        real(self, name, tensor)
    SafetensorsWriter.write = full_disk
    t0 = time.time()
    try:
        save_quantized(model, os.path.join(out, "full"))
        result["error"] = "no error"
    except Exception as err:
        result["error"] = f"{type(err).__name__}: {err}"
    result["seconds"] = time.time() - t0
    SafetensorsWriter.write = real
    with open(os.path.join(out, f"quantized{rank}.json"), "w") as fh:
        json.dump(result, fh)
    dist.barrier()
    dist.destroy_process_group()


def _worker(model_dir: str, out: str) -> None:
    from datetime import timedelta

    import deepspeed
    import torch
    import torch.distributed as dist

    from qlora_ds import checkpointing
    from qlora_ds.errors import QLoRADSError
    from qlora_ds.inject import from_pretrained, save_adapter
    from qlora_ds.nn import QLoRAConfig

    os.environ["QLORA_DS_SECRET_DIR"] = os.path.join(out, "secrets")
    deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=PG_TIMEOUT_S))
    rank, results = dist.get_rank(), {}
    for stage in (2, 3):
        ds = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
              "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
              "steps_per_print": 10**6}
        model = from_pretrained(model_dir, QLoRAConfig(r=4, alpha=8, dropout=0.0, compute_dtype=torch.float32),
                                ds_config=ds, torch_dtype=torch.float32)
        engine, *_ = deepspeed.initialize(model=model, config=ds,
                                          model_parameters=[p for p in model.parameters() if p.requires_grad])
        ckpt = os.path.join(out, f"z{stage}")

        def also(tag_dir, engine=engine):  # as finetune's Loop.checkpoint
            save_adapter(engine, os.path.join(tag_dir, "adapter"), barrier=False)

        checkpointing.save(engine, ckpt, 2, {"step": 2}, keep=2, also=also)
        real = engine.checkpoint_engine.save

        def full_disk(state_dict, path, real=real):  # rank 1's disk is full: a real torch.save failure
            return real(state_dict, "/dev/full" if rank == 1 else path)

        engine.checkpoint_engine.save = full_disk
        t0 = time.time()
        caught = None
        try:
            checkpointing.save(engine, ckpt, 4, {"step": 4}, keep=2, also=also)
        except Exception as err:
            caught = err
        error = f"{type(caught).__name__}: {caught}" if caught else "no error"
        results[stage] = {"error": error, "seconds": time.time() - t0,
                          "tags_after_failure": sorted(t for t in os.listdir(ckpt) if t.startswith("step")),
                          "latest_after_failure": open(os.path.join(ckpt, "latest")).read()}
        if not isinstance(caught, QLoRADSError):  # e.g. a timed-out group: report, never wait on it again
            break
        del engine.checkpoint_engine.save
        checkpointing.save(engine, ckpt, 6, {"step": 6}, keep=2, also=also)

        def no_space(save_path):  # rank 0's copy of DeepSpeed's recovery scripts meets a full disk
            raise OSError(28, "No space left on device", os.path.join(save_path, "zero_to_fp32.py"))

        if rank == 0:
            engine._copy_recovery_script = no_space
        t0 = time.time()
        try:
            checkpointing.save(engine, ckpt, 8, {"step": 8}, keep=2, also=also)
            caught = None
        except Exception as err:
            caught = err
        results[stage]["script_error"] = f"{type(caught).__name__}: {caught}" if caught else "no error"
        results[stage]["script_seconds"] = time.time() - t0
        if not isinstance(caught, QLoRADSError):
            break
    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump(results, fh)
    if len(results) < 2:
        os._exit(1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    (_quantized_worker if sys.argv[3:] == ["quantized"] else _worker)(sys.argv[1], sys.argv[2])
