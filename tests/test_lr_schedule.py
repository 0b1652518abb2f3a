"""The lr schedule of a finetune: warmup then constant / linear / cosine (ours), or the ds_config's scheduler
section built by DeepSpeed with its "auto" values filled; both given is an error."""
from __future__ import annotations

import json
import math
import re
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


def test_epochs_set_the_steps_and_the_schedule_from_the_data(word):
    """--epochs 1.5: the steps follow from the loaded data (micro batches per epoch / accumulation), and the warmup
    and the linear decay are computed from them, as --max-steps would set them."""
    out = word["root"] / "epochs"
    proc = _finetune(*_args(word, out, "--epochs", "1.5", "--warmup-ratio", "0.25", "--lr-scheduler", "linear"))
    check(proc)
    n_train = int(re.search(r"(\d+) train examples", proc.stderr).group(1))
    steps = math.ceil(1.5 * (n_train // DS["train_micro_batch_size_per_gpu"]) / DS["gradient_accumulation_steps"])
    assert steps > 4
    warmup = math.ceil(0.25 * steps)
    expected = [2e-4 * lr_factor("linear", warmup, steps)(s) for s in range(steps)]
    assert [r["lr"] for r in _steps(out)] == pytest.approx(expected)
    recorded = json.loads((out / "run_config.json").read_text())
    assert (recorded["epochs"], recorded["max_steps"], recorded["warmup_steps"]) == (1.5, steps, warmup)
    both = _finetune(*_args(word, word["root"] / "both", "--epochs", "1", "--max-steps", "3"))
    assert both.returncode != 0 and "--epochs 1.0 and --max-steps 3: give one" in both.stderr


def test_the_command_lines_epochs_or_steps_win_over_a_recipes(tmp_path):
    from .test_finetune_resume import _finetune_module
    parse = _finetune_module().parse_args
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"max_steps": 1875, "lr": 1e-4}))
    base = ["--model", "m", "--dataset", "d", "--output-dir", str(tmp_path / "o"), "--recipe", str(recipe)]
    got = parse([*base, "--epochs", "2"])
    assert (got.epochs, got.max_steps, got.lr) == (2.0, None, 1e-4)
    assert parse(base).max_steps == 1875 and parse([*base, "--max-steps=9"]).max_steps == 9
    recipe.write_text(json.dumps({"epochs": 3}))
    got = parse([*base, "--max-steps", "7"])
    assert (got.epochs, got.max_steps) == (None, 7)
    assert (parse(base).epochs, parse(base).max_steps) == (3.0, None)
    assert parse(base[:6]).max_steps == 100


@pytest.mark.parametrize("kind", ["WarmupDecayLR", "WarmupCosineLR", "WarmupLR"])
def test_resumed_ds_config_schedule_equals_an_uninterrupted_one(kind):
    """A ds_config scheduler section: DeepSpeed's schedulers restore only their iteration. A 4-step run resumed
    with --max-steps 8 (warmup 2) trained its first resumed step at the 4-step schedule's lr, and every resume
    logged lr 0.0 for that step (get_last_lr() kept the value set when the scheduler was built). The lr the step
    trains at and the one logged must be an uninterrupted 8-step run's."""
    import torch
    from deepspeed.runtime import lr_schedules

    from qlora_ds.lr_schedule import resync_after_resume

    def build(total):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=2e-4)
        params = {"warmup_num_steps": 2, "warmup_type": "linear"}
        if kind != "WarmupLR":
            params["total_num_steps"] = total
        if kind != "WarmupCosineLR":
            params.update(warmup_min_lr=0.0, warmup_max_lr=2e-4)
        return opt, getattr(lr_schedules, kind)(opt, **params)

    def steps(opt, sched, n):            # as DeepSpeed's engine.step: the optimizer, then the scheduler
        for _ in range(n):
            opt.step()
            sched.step()

    straight = build(8)
    steps(*straight, 4)
    first = build(4)
    steps(*first, 4)
    resumed = build(8)
    resumed[0].load_state_dict(first[0].state_dict())        # engine.load_checkpoint: optimizer, then scheduler
    resumed[1].load_state_dict(first[1].state_dict())
    resync_after_resume(resumed[1])
    want = straight[0].param_groups[0]["lr"]
    assert want > 0 and straight[1].get_last_lr() == [want]
    assert resumed[0].param_groups[0]["lr"] == pytest.approx(want) and resumed[1].get_last_lr() == pytest.approx([want])
    steps(*straight, 3)
    steps(*resumed, 3)
    assert resumed[1].get_last_lr() == pytest.approx(straight[1].get_last_lr())


def test_ds_config_schedule_resumed_with_more_steps_equals_an_uninterrupted_run(word):
    """End to end (WarmupDecayLR, warmup 2): 4 steps resumed with --max-steps 6 trains and logs as 6 straight steps.
    Step 5 trained at the 4-step schedule's lr (1e-4, not 1.5e-4) and was logged at lr 0.0."""
    import torch
    from safetensors.torch import load_file

    ds = {**DS, "scheduler": {"type": "WarmupDecayLR", "params": {
        "warmup_num_steps": "auto", "total_num_steps": "auto", "warmup_max_lr": "auto", "warmup_min_lr": "auto",
        "warmup_type": "linear"}}}
    path = word["root"] / "ds_sched_resume.json"
    path.write_text(json.dumps(ds))
    straight, split = word["root"] / "ds_sched_straight", word["root"] / "ds_sched_split"
    check(_finetune(*_args(word, straight, "--max-steps", "6", "--warmup-ratio", "0.25", ds=str(path))))
    check(_finetune(*_args(word, split, "--max-steps", "4", "--warmup-ratio", "0.5", ds=str(path))))
    check(_finetune(*_args(word, split, "--max-steps", "6", "--warmup-ratio", "0.5", "--resume", ds=str(path))))
    a, b = _steps(straight), _steps(split)
    assert [r["lr"] for r in b] == pytest.approx([0.0, 0.0, 1e-4, 2e-4, 1.5e-4, 1e-4], abs=1e-12)
    assert [r["lr"] for r in a] == [r["lr"] for r in b] and [r["loss"] for r in a] == [r["loss"] for r in b]
    wa, wb = (load_file(out / "adapter" / "adapter_model.safetensors") for out in (straight, split))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("key", ["overwrite", "resume", "local_rank", "deepspeed"])
def test_a_recipe_cannot_carry_what_one_command_does(tmp_path, key):
    """A downloaded recipe with "overwrite": true deleted the previous run in --output-dir without the user asking."""
    from .test_finetune_resume import _finetune_module
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"lr": 1e-4, key: 0 if key == "local_rank" else True}))
    with pytest.raises(QLoRADSError, match=rf"sets \['{key}'\].*pass --{key.replace('_', '-')} on the command line"):
        _finetune_module().parse_args(["--model", "m", "--dataset", "d", "--output-dir", str(tmp_path / "o"),
                                       "--recipe", str(recipe)])
