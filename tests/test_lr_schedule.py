"""The lr schedule of a finetune: warmup then constant / linear / cosine (ours), or the ds_config's scheduler
section built by DeepSpeed with its "auto" values filled; both given is an error."""
from __future__ import annotations

import json
import math
import types

import pytest

from qlora_ds.errors import QLoRADSError
from qlora_ds.lr_schedule import fill_scheduler_section, lr_factor, schedule_name

from .dist_utils import check
from .test_finetune_resume import DS, _args, _finetune, _steps, word  # noqa: F401 - word is a fixture


def test_lr_factor_shapes():
    const, lin, cos = (lr_factor(k, warmup=2, total=10) for k in ("constant", "linear", "cosine"))
    assert [const(s) for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    assert [lin(s) for s in (0, 1, 2, 6, 10, 12)] == pytest.approx([0.5, 1.0, 1.0, 0.5, 0.0, 0.0])
    assert [cos(s) for s in (1, 2, 6, 10)] == pytest.approx([1.0, 1.0, 0.5, 0.0])
    assert cos(4) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    with pytest.raises(QLoRADSError, match="unknown lr schedule 'step'"):
        lr_factor("step", 1, 10)


def _args_ns(**kw):
    return types.SimpleNamespace(**{"lr_scheduler": None, "lr": 2e-4, "max_steps": 100, **kw})


def test_scheduler_section_autos_and_conflicts():
    args = _args_ns()
    assert schedule_name({}, args) == "constant" == args.lr_scheduler
    cfg = {"scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": "auto", "total_num_steps": "auto",
                                                             "warmup_max_lr": "auto", "warmup_min_lr": "auto"}}}
    args = _args_ns()
    assert schedule_name(cfg, args) == "ds_config:WarmupDecayLR"
    fill_scheduler_section(cfg, args, warmup=3)
    assert cfg["scheduler"]["params"] == {"warmup_num_steps": 3, "total_num_steps": 100, "warmup_max_lr": 2e-4,
                                          "warmup_min_lr": 0.0}
    with pytest.raises(QLoRADSError, match="--lr-scheduler cosine and the ds_config's scheduler section"):
        schedule_name(cfg, _args_ns(lr_scheduler="cosine"))
    with pytest.raises(QLoRADSError, match="warmup_max_lr=0.001 but the optimizer's lr is 0.0002"):
        fill_scheduler_section({"scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 1e-3}}}, _args_ns(), 1)
    with pytest.raises(QLoRADSError, match="\"auto\" is not supported for cycle_min_lr"):
        fill_scheduler_section({"scheduler": {"type": "OneCycle", "params": {"cycle_min_lr": "auto"}}}, _args_ns(), 1)
    with pytest.raises(QLoRADSError, match="must be an object"):
        schedule_name({"scheduler": "cosine"}, _args_ns())


def test_linear_schedule_end_to_end(word):
    out = word["root"] / "linear"
    check(_finetune(*_args(word, out, "--max-steps", "4", "--warmup-ratio", "0.25", "--lr-scheduler", "linear")))
    # the lr each step trained at: warmup 1 step (factor 1), then down by a third per step towards 0 at step 4
    assert [r["lr"] for r in _steps(out)] == pytest.approx([2e-4, 2e-4, 2e-4 * 2 / 3, 2e-4 / 3])
    assert json.loads((out / "run_config.json").read_text())["lr_scheduler"] == "linear"


def test_ds_config_scheduler_section_is_used(word):
    """A ds_config with DeepSpeed's WarmupDecayLR ("auto" values) trains under it, not under our constant default
    (DeepSpeed used to be handed our scheduler, which silently overrode the section)."""
    ds = {**DS, "scheduler": {"type": "WarmupDecayLR", "params": {
        "warmup_num_steps": "auto", "total_num_steps": "auto", "warmup_max_lr": "auto", "warmup_min_lr": "auto",
        "warmup_type": "linear"}}}
    path = word["root"] / "ds_sched.json"
    path.write_text(json.dumps(ds))
    out = word["root"] / "ds_sched"
    check(_finetune(*_args(word, out, "--max-steps", "6", "--warmup-ratio", "0.34", ds=str(path))))
    lrs = [r["lr"] for r in _steps(out)]
    # DeepSpeed's WarmupDecayLR as DeepSpeed steps it: 0 before its first step, then iteration i of 3 warmup
    # iterations at i/3 of the peak, the peak at iteration 3, then down by a third per iteration towards step 6
    assert lrs == pytest.approx([0.0, 0.0, 2e-4 / 3, 2e-4 * 2 / 3, 2e-4, 2e-4 * 2 / 3], abs=1e-9)
    assert json.loads((out / "run_config.json").read_text())["lr_scheduler"] == "ds_config:WarmupDecayLR"


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_resumed_schedule_with_more_steps_sets_the_new_lr(kind):
    """A run of 4 steps resumed with --max-steps 8: the loaded optimizer has the old schedule's lr (0 after its
    last decay step), the first resumed step must train at the new schedule's."""
    import torch

    from qlora_ds.lr_schedule import lr_factor, resync_after_resume

    def build(total):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(kind, 1, total))
    opt, sched = build(4)
    for _ in range(4):
        opt.step()
        sched.step()
    state = opt.state_dict(), sched.state_dict()
    opt2, sched2 = build(8)
    opt2.load_state_dict(state[0])
    sched2.load_state_dict(state[1])
    old, want = opt2.param_groups[0]["lr"], 1e-3 * lr_factor(kind, 1, 8)(4)
    resync_after_resume(sched2)
    assert opt2.param_groups[0]["lr"] == pytest.approx(want) and sched2.get_last_lr() == [opt2.param_groups[0]["lr"]]
    if kind != "constant":
        assert old == pytest.approx(0.0) and want > 1e-4           # without the resync: a step at lr 0
