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
