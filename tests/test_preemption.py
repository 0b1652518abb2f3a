"""Preemption (qlora_ds/preemption.py): one agreed stop signal across ranks, the preempted.json marker a requeue
wrapper tests, a signal during the held-out loss or a save stopping right there; the DeepSpeed monitor files cut back
on --resume (qlora_ds/monitor.py); finetune's parser taking no abbreviations. One process on the word-level fixture."""
from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import types

import pytest
import torch

from qlora_ds import checkpointing, monitor
from qlora_ds.preemption import PREEMPTED, Preempted, StopSignals, stop_signals

from .dist_utils import REPO, check, dist_env
from .finetune_fixtures import write_word_level_run
from .helpers import launch_script

FINETUNE = REPO / "launch" / "finetune.py"
DS = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "gradient_clipping": 0.3,
      "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}, "zero_optimization": {"stage": 2},
      "optimizer": {"type": "PagedAdamW", "params": {"lr": 2e-4, "betas": [0.9, 0.999], "eps": 1e-8}},
      "csv_monitor": {"enabled": True, "job_name": "job"}}
# finetune with a real SIGUSR1 to itself as the held-out loss or the checkpoint of step STEP starts (SIG_AT=phase:STEP)
DURING = """
import os, signal, sys
from tests.helpers import launch_script
ft = launch_script("finetune")
phase, step = os.environ["SIG_AT"].split(":")
def during(name):
    real = getattr(ft.Loop, name)
    def wrapped(self):
        if name == phase and self.step == int(step):
            os.kill(os.getpid(), signal.SIGUSR1)
        real(self)
    return wrapped
ft.Loop.checkpoint, ft.Loop.held_out = during("checkpoint"), during("held_out")
sys.exit(ft.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def word(tmp_path_factory):
    root = tmp_path_factory.mktemp("preempt_run")
    (root / "ds.json").write_text(json.dumps(DS))
    return {**write_word_level_run(str(root)), "root": root, "ds": str(root / "ds.json")}


def _args(word, out, *extra):
    return ["--model", word["model"], "--dataset", word["data"], "--output-dir", str(out), "--ds-config", word["ds"],
            "--max-len", "32", "--lora-r", "4", "--max-steps", "4", "--sample-prompt=", *extra]


def _finetune(*args, sig_at=None):
    code = ["-c", DURING] if sig_at else [str(FINETUNE)]
    env = dist_env(**({"SIG_AT": sig_at} if sig_at else {}))
    return subprocess.run([sys.executable, *code, *args], env=env, capture_output=True, text=True, timeout=300,
                          cwd=REPO)


def _tags(out):
    return sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step"))


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def during_save(word):
    """SIGUSR1 during the save of step 2 (of 4; held-out loss and save every 2 steps, csv_monitor on): (output dir,
    the stopped run, its checkpoint tags, its newest complete one and its marker, the --resume that finishes it)."""
    out = word["root"] / "during_save"
    args = _args(word, out, "--eval-every", "2", "--save-every", "2")
    stopped = _finetune(*args, sig_at="checkpoint:2")
    marker = json.loads((out / PREEMPTED).read_text()) if (out / PREEMPTED).exists() else None
    tags, complete = _tags(out), checkpointing.latest_complete(str(out / "checkpoints"))
    resumed = _finetune(*args, "--resume")
    return out, stopped, tags, complete, marker, resumed


def test_signal_during_a_save_stops_after_it_and_leaves_the_marker(during_save):
    """The save of step 2 is complete: the run stops there, with exactly that checkpoint and preempted.json naming
    it. It used to train step 3 and save it too (one more step and save of the grace period)."""
    _, stopped, tags, complete, marker, _ = during_save
    assert stopped.returncode == 138, stopped.stderr[-3000:]
    assert "stopped by SIGUSR1 at step 2, its checkpoint saved" in stopped.stderr
    assert tags == ["step0000002"] and complete == "step0000002"
    assert {k: v for k, v in marker.items() if k != "time"} == {
        "signal": "SIGUSR1", "exit_code": 138, "step": 2, "checkpoint": "checkpoints/step0000002"}


def test_a_resumed_run_that_finishes_removes_the_marker(during_save):
    out, *_, resumed = during_save
    check(resumed)
    assert not (out / PREEMPTED).exists()
    assert [r["step"] for r in _rows(out) if "loss" in r] == [1, 2, 3, 4]
    assert (out / "adapter" / "adapter_model.safetensors").exists()


def test_monitor_csv_has_one_header_and_each_step_once_after_a_resume(during_save):
    """DeepSpeed's csv_monitor appends and wrote a second `step,train_loss` header mid-file on every resume; the
    resumed run now continues the file (x = samples: 4 a step) with the values metrics.jsonl has."""
    out = during_save[0]
    rows = _rows(out)
    expected = {"train_loss": [(4 * r["step"], r["loss"]) for r in rows if "loss" in r],
                "eval_loss": [(4 * r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]}
    assert [x for x, _ in expected["eval_loss"]] == [0, 8, 16]
    for name, points in expected.items():
        with open(out / "monitor" / "job" / f"Train_Samples_{name}.csv", newline="") as fh:
            header, *body = list(csv.reader(fh))
        assert header == ["step", name]
        assert [(int(x), float(v)) for x, v in body] == points


def test_signal_during_the_held_out_loss_saves_that_step_and_stops(word):
    """A signal during step 2's held-out loss (saves every 100 steps): step 2 is saved and the run stops there; it
    used to train and save step 3."""
    out = word["root"] / "during_eval"
    stopped = _finetune(*_args(word, out, "--eval-every", "2", "--save-every", "100"), sig_at="held_out:2")
    assert stopped.returncode == 138, stopped.stderr[-3000:]
    assert _tags(out) == ["step0000002"]
    assert [r["step"] for r in _rows(out) if "loss" in r] == [1, 2]
    assert json.loads((out / PREEMPTED).read_text())["step"] == 2


@pytest.fixture
def handlers():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for s, handler in before.items():
        signal.signal(s, handler)


def test_marker_written_by_rank_0_on_preemption_and_removed_when_training_starts_again(tmp_path, handlers):
    for rank in (1, 0):
        with pytest.raises(Preempted):
            with stop_signals(rank, output_dir=str(tmp_path)):
                raise Preempted(signal.SIGTERM, 6)
        assert (tmp_path / PREEMPTED).exists() == (rank == 0)
    marker = json.loads((tmp_path / PREEMPTED).read_text())
    assert (marker["signal"], marker["exit_code"], marker["step"]) == ("SIGTERM", 143, 6)
    assert marker["checkpoint"] == "checkpoints/step0000006" and marker["time"].endswith("Z")
    with stop_signals(1, output_dir=str(tmp_path)):
        assert (tmp_path / PREEMPTED).exists()           # only rank 0 touches it
    with stop_signals(0, output_dir=str(tmp_path)):
        assert not (tmp_path / PREEMPTED).exists()       # this run trains again
    with pytest.raises(RuntimeError):
        with stop_signals(0, output_dir=str(tmp_path)):
            raise RuntimeError("a rank failed")           # a failure is no preemption: nothing to requeue on
    assert not (tmp_path / PREEMPTED).exists()


@pytest.mark.parametrize("got, expected", [
    ([10, 10, 10, 15, 0, 0, 0, 0], signal.SIGUSR1),     # the mean signal number used to round to SIGSEGV (11)
    ([10, 15, 0, 0], signal.SIGUSR1),                   # ... and to SIGUSR2 (12)
    ([15] * 4095 + [10], signal.SIGUSR1),               # one SIGUSR1 among many SIGTERMs
    ([15, 0, 15], signal.SIGTERM),
    ([0, 10], signal.SIGUSR1),
    ([0, 0, 0], 0),
])
def test_every_rank_stops_with_one_signal_whatever_each_got(got, expected):
    """Slurm's --signal=USR1 may reach some ranks and scancel's SIGTERM others first: every rank, signalled or not,
    agrees on SIGUSR1 when any rank got it, so the job exits with one code."""
    ranks = []
    for signum in got:
        stop = StopSignals(())
        stop.signum = signum
        ranks.append(stop)
    votes = torch.tensor([stop.vote(1) for stop in ranks], dtype=torch.float64)
    means = (votes.sum(0) / len(ranks)).tolist()                # what qlora_ds.distributed.all_mean gives each
    assert {stop.agreed(means) for stop in ranks} == {expected}


class _Writer:
    """A SummaryWriter's surface that monitor.cut_back uses."""

    def __init__(self, log_dir, purge_step=None):
        self.log_dir, self.purge_step, self.closed = log_dir, purge_step, False

    def close(self):
        self.closed = True


def _read(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return fh.read()


def _monitored(log_dir, samples):
    csv_mon = types.SimpleNamespace(log_dir=str(log_dir), filenames=[])
    tb = types.SimpleNamespace(summary_writer=_Writer(str(log_dir)))
    return types.SimpleNamespace(global_samples=samples, monitor=types.SimpleNamespace(csv_monitor=csv_mon,
                                                                                      tb_monitor=tb))


CRASHED = "step,train_loss\r\n4,3.5\r\n8,3.25\r\n12,3.0\r\nstep,train_loss\r\n12,3.0\r\n16,2.75\r\n20,2."


def test_cut_back_keeps_the_points_up_to_the_checkpoint(tmp_path):
    """After a crash past the checkpoint at 8 samples and a resume that crashed too (a header mid-file, 12 twice, a
    torn last row): the first header and x <= 8 are kept, DeepSpeed is told the header is there, and TensorBoard's
    writer is reopened to purge from x = 9."""
    run = tmp_path / "run"
    job = run / "monitor" / "job"
    job.mkdir(parents=True)
    (job / "Train_Samples_train_loss.csv").write_text(CRASHED, newline="")
    (job / "Train_Samples_lr.csv").write_text("step,lr\r\n12,0.0002\r\n", newline="")
    engine = _monitored(job, samples=8)
    old = engine.monitor.tb_monitor.summary_writer
    monitor.cut_back(engine, str(run), resume_step=2)
    assert _read(job / "Train_Samples_train_loss.csv") == "step,train_loss\r\n4,3.5\r\n8,3.25\r\n"
    assert not (job / "Train_Samples_lr.csv").exists()          # no row left: DeepSpeed starts it with its header
    assert engine.monitor.csv_monitor.filenames == ["Train_Samples_train_loss"]
    new = engine.monitor.tb_monitor.summary_writer
    assert old.closed and (new.log_dir, new.purge_step) == (str(job), 9)


def test_cut_back_without_a_checkpoint_and_outside_the_run(tmp_path):
    """A --resume that found no checkpoint starts at step 0 (its baseline held-out loss at x = 0 again): nothing is
    kept. Monitor files at an absolute output_path outside --output-dir are left alone; a run without --resume
    touches nothing."""
    run, elsewhere = tmp_path / "run", tmp_path / "shared" / "job"
    (run / "monitor" / "job").mkdir(parents=True)
    elsewhere.mkdir(parents=True)
    for folder in (run / "monitor" / "job", elsewhere):
        (folder / "Train_Samples_eval_loss.csv").write_text("step,eval_loss\r\n0,3.5\r\n", newline="")
    fresh = _monitored(run / "monitor" / "job", samples=0)
    monitor.cut_back(fresh, str(run), resume_step=None)
    assert (run / "monitor" / "job" / "Train_Samples_eval_loss.csv").exists()
    monitor.cut_back(fresh, str(run), resume_step=0)
    assert not (run / "monitor" / "job" / "Train_Samples_eval_loss.csv").exists()
    assert fresh.monitor.tb_monitor.summary_writer.purge_step == 0
    outside = _monitored(elsewhere, samples=0)
    monitor.cut_back(outside, str(run), resume_step=0)
    assert _read(elsewhere / "Train_Samples_eval_loss.csv") == "step,eval_loss\r\n0,3.5\r\n"
    assert outside.monitor.tb_monitor.summary_writer.purge_step is None


def test_finetune_takes_no_abbreviated_options(tmp_path, capsys):
    """`--epoch 2` with a recipe's max_steps: argparse took it for --epochs, but the "command line wins over the
    recipe" check looks for `--epochs` as spelled, so it was refused as "give one". Abbreviations are now unknown
    options, named as such; the full spellings win over the recipe."""
    ft = launch_script("finetune")
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"max_steps": 7, "model": "m", "dataset": "d", "output_dir": "o"}))
    for flag in ("--epochs", "--epochs=2"):
        args = ft.parse_args(["--recipe", str(recipe), *([flag, "2"] if "=" not in flag else [flag])])
        assert (args.epochs, args.max_steps) == (2.0, None)
    for abbreviated in ("--epoch", "--max-step", "--lora-al"):
        with pytest.raises(SystemExit):
            ft.parse_args(["--recipe", str(recipe), abbreviated, "2"])
        assert f"unrecognized arguments: {abbreviated} 2" in capsys.readouterr().err
