"""Our optimizers as DeepSpeed client optimizers: 2-rank ZeRO 0-3 (torchrun, CPU/gloo, bf16) on a tiny model of
QLoRALinear layers (frozen uint8 NF4 base + fp32 LoRA). Training lowers the loss, and a run resumed from
``engine.save_checkpoint`` / ``load_checkpoint`` reproduces the uninterrupted run's losses exactly."""
from __future__ import annotations

import json

import pytest

from tests.dist_utils import REPO, check, run_torchrun

SCRIPT = REPO / "tests" / "scripts" / "optim_ds_resume.py"
STEPS = 4

# ~15-25 s each on 2 CPU cores; the ZeRO-2 and ZeRO-3 cases are the core ones, the rest are marked slow.
CASES = [
    pytest.param(2, "PagedAdamW", False, id="zero2-PagedAdamW"),
    pytest.param(3, "PagedAdamW8bit", False, id="zero3-PagedAdamW8bit"),
    pytest.param(0, "PagedAdamW", False, id="zero0-PagedAdamW", marks=pytest.mark.slow),
    pytest.param(1, "AdamW8bit", False, id="zero1-AdamW8bit", marks=pytest.mark.slow),
    pytest.param(2, "PagedAdamW8bit", True, id="zero2-offload-PagedAdamW8bit", marks=pytest.mark.slow),
]


@pytest.mark.multirank
@pytest.mark.parametrize("stage,optim,offload", CASES)
def test_client_optimizer_trains_and_resumes_exactly(tmp_path, stage, optim, offload):
    out = tmp_path / "result.json"
    args = [str(stage), optim, str(tmp_path / "ckpt"), str(out), str(STEPS)] + (["offload"] if offload else [])
    check(run_torchrun(SCRIPT, *args, nproc=2, timeout=240))
    res = json.loads(out.read_text())
    assert res["inner"] == optim
    if stage:
        assert res["wrapped"] == ("DeepSpeedZeroOptimizer_Stage3" if stage == 3 else "DeepSpeedZeroOptimizer")
    full, resumed = res["full"], res["resumed"]
    assert len(full) == 2 * STEPS and resumed == full[STEPS:]          # exact, not approximate
    assert sum(full[-2:]) < sum(full[:2])                              # training lowers the loss
    assert res["tag"]["optimizer"] == optim
    eight = "8bit" in optim
    for state in res["state"]:
        assert state["exp_avg"] == ("torch.uint8" if eight else "torch.float32")
        assert state["step"] >= STEPS


@pytest.mark.parametrize("optim", ["PagedAdamW", "AdamW8bit"])
def test_fp16_without_zero_starts_adam_at_step_one(optim):
    """DeepSpeed's FP16_UnfusedOptimizer steps the optimizer once on zero gradients at setup; that step is undone
    (undo_fp16_warmup_step): no state before training, masters as the weights, the first update a full lr·sign(g)
    (it was ~0.74·lr, step 2's bias correction, after weight decay had shrunk the masters once)."""
    import subprocess
    import sys

    from tests.dist_utils import free_port
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "scripts" / "fp16_zero0_first_step.py"), optim,
                           str(free_port())], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["wrapper"] == "FP16_UnfusedOptimizer"
    assert res["steps_before"] == [] and res["master_equals_weight"]
    assert res["steps_after"] == [1]
    assert abs(res["first_update_over_lr"] - 1.0) < 0.02, res
