"""launch/finetune.py --resume: what it refuses, what it keeps from the first run; the logged lr and tokens_per_s.
One process on the word-level fixture (seconds per run)."""
from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest
import torch
from safetensors.torch import load_file

from qlora_ds.errors import QLoRADSError

from .dist_utils import REPO, check, dist_env
from .finetune_fixtures import write_word_level_run
from .helpers import launch_script

FINETUNE = REPO / "launch" / "finetune.py"
DS = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "gradient_clipping": 0.3,
      "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}, "zero_optimization": {"stage": 2},
      "optimizer": {"type": "PagedAdamW", "params": {"lr": 2e-4, "betas": [0.9, 0.999], "eps": 1e-8}}}


def _finetune_module():
    return launch_script("finetune")


@pytest.fixture(scope="module")
def word(tmp_path_factory):
    root = tmp_path_factory.mktemp("word_run")
    (root / "ds.json").write_text(json.dumps(DS))
    return {**write_word_level_run(str(root)), "root": root, "ds": str(root / "ds.json")}


def _args(word, out, *extra, ds=None):
    return ["--model", word["model"], "--dataset", word["data"], "--output-dir", str(out), "--ds-config",
            ds or word["ds"], "--max-len", "32", "--lora-r", "4", "--eval-every", "2", "--save-every", "2",
            "--sample-prompt=", *extra]


def _finetune(*args):
    return subprocess.run([sys.executable, str(FINETUNE), *args], env=dist_env(), capture_output=True, text=True,
                          timeout=300, cwd=REPO)


def _steps(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def grown(word):
    """A straight 8-step run with a 2-step warmup (ratio 0.25), and a 2-step run with the same warmup (ratio 1.0)
    resumed to 8 steps."""
    straight, split = word["root"] / "straight", word["root"] / "split"
    prompt = ["--sample-prompt", "What is AI?"]
    check(_finetune(*_args(word, straight, "--max-steps", "8", "--warmup-ratio", "0.25", *prompt)))
    check(_finetune(*_args(word, split, "--max-steps", "2", "--warmup-ratio", "1.0", *prompt)))
    check(_finetune(*_args(word, split, "--max-steps", "8", "--warmup-ratio", "1.0", "--resume", *prompt)))
    return straight, split


def test_resume_with_more_steps_keeps_the_first_runs_warmup(grown):
    """--max-steps may grow on resume; the warmup (ceil(ratio × max steps)) stays the first run's 2 steps. It was
    recomputed from the new --max-steps (8 warmup steps): the lr fell back after the resume and warmed up again."""
    straight, split = grown
    a, b = _steps(straight), _steps(split)
    assert [r["step"] for r in b] == list(range(1, 9))
    assert [r["loss"] for r in a] == [r["loss"] for r in b] and [r["lr"] for r in a] == [r["lr"] for r in b]
    wa = load_file(straight / "adapter" / "adapter_model.safetensors")
    wb = load_file(split / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert json.loads((split / "run_config.json").read_text())["warmup_steps"] == 2


def test_logged_lr_is_the_lr_the_step_used(grown):
    """A 2-step warmup: step 1 trains at half the lr. The row logged the lr of the next step (read after DeepSpeed
    stepped the scheduler): 2e-4 for step 1."""
    assert [r["lr"] for r in _steps(grown[0])] == pytest.approx([1e-4] + [2e-4] * 7)


def test_resumed_summary_keeps_the_before_sample(grown):
    """The "before" sample is kept in the output dir when generated; a resumed run's summary used to say null."""
    straight, split = grown
    a, b = (json.loads((out / "summary.json").read_text()) for out in grown)
    assert b["before"] and b["before"] == a["before"] and b["after"] == a["after"]
    assert json.loads((split / "sample_before.json").read_text()) == {"prompt": "What is AI?", "before": b["before"]}


def test_best_held_out_checkpoint_is_kept_and_named(word):
    """--keep-checkpoints 1 keeps the last checkpoint and also the best held-out loss's; summary.json names that
    step, its loss and its adapter."""
    out, ds = word["root"] / "best", word["root"] / "ds_lr0.json"
    # lr 0: every held-out loss is the same, so the first one (step 2) stays the best and must outlive its pruning
    ds.write_text(json.dumps({**DS, "optimizer": {"type": "PagedAdamW", "params": {"lr": 0.0}}}))
    check(_finetune(*_args(word, out, "--max-steps", "6", "--keep-checkpoints", "1", ds=str(ds))))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r and r["step"] > 0}
    best_step = min(evals, key=evals.get)
    best = json.loads((out / "summary.json").read_text())["best_eval"]
    assert best == {"step": best_step, "eval_loss": evals[best_step],
                    "adapter": f"checkpoints/step{best_step:07d}/adapter"}
    kept = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step"))
    assert best_step == 2 and kept == ["step0000002", "step0000006"]
    assert (out / best["adapter"] / "adapter_model.safetensors").exists()


def test_resume_refuses_an_edited_ds_config(word):
    """The ds_config is recorded by path: an edited file (micro batch 2 → 1, accumulation 2 → 4: the same global
    batch) used to resume, and the sampler, indexed by the saved micro step, repeated and skipped examples."""
    out, edited = word["root"] / "edited", word["root"] / "edited.json"
    edited.write_text(json.dumps(DS))
    check(_finetune(*_args(word, out, "--max-steps", "1", "--save-every", "1", ds=str(edited))))
    edited.write_text(json.dumps({**DS, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 4}))
    proc = _finetune(*_args(word, out, "--max-steps", "2", "--resume", ds=str(edited)))
    assert proc.returncode != 0 and [r["step"] for r in _steps(out)] == [1]
    text = proc.stdout + proc.stderr
    assert "micro_batch_per_rank 2 -> 1 (--micro-batch / ds_config train_micro_batch_size_per_gpu)" in text
    assert "grad_accum 2 -> 4" in text and "start a new --output-dir" in text


def test_resume_compares_the_resolved_settings(word, tmp_path):
    """The world size and the ds_config's clipping, ZeRO stage and optimizer are compared as resolved; a
    run_config.json from before they were recorded still resumes."""
    ft = _finetune_module()
    out = tmp_path / "run"
    args = ft.parse_args(_args(word, out))
    resolved = ft.resolved_settings(ft.resolve_ds_config(args, 1, "cpu"), 1)
    assert ft.check_output_dir(args, 0, resolved) is None
    out.mkdir()
    from qlora_ds.run_dir import write_run_config
    write_run_config(args, resolved, 1)
    resume = ft.parse_args(_args(word, out, "--resume"))
    ft.resolve_ds_config(resume, 1, "cpu")          # folds the optimizer section into the arguments, as setup_run
    assert ft.check_output_dir(resume, 0, resolved) is None
    for changed, match in (({"world_size": 2}, r"world_size 1 -> 2 \(the number of ranks launched\)"),
                           ({"gradient_clipping": 1.0}, r"gradient_clipping 0.3 -> 1.0"),
                           ({"zero_stage": 3}, r"zero_stage 2 -> 3"),
                           ({"optimizer": {"type": "PagedAdamW", "params": {}}}, "optimizer")):
        with pytest.raises(QLoRADSError, match=rf"different batch/optimizer setup \({match}"):
            ft.check_output_dir(resume, 0, {**resolved, **changed})
    old = {k: v for k, v in json.loads((out / "run_config.json").read_text()).items()
           if k not in ("resolved", "warmup_steps")}
    (out / "run_config.json").write_text(json.dumps(old))
    assert ft.check_output_dir(resume, 0, {**resolved, "world_size": 2}) is None
    assert ft.warmup_steps(ft.parse_args(_args(word, out, "--max-steps", "9", "--warmup-ratio", "0.5")),
                                      resumed=True) == 50       # its first run's: 0.5 × the recorded 100 steps


def test_resume_accepts_the_deepspeed_flag_and_a_recipe_spelled_out(word, tmp_path):
    """--deepspeed is a no-op, and a recipe only sets defaults (compared one by one as the arguments they set)."""
    ft = _finetune_module()
    out, recipe = tmp_path / "run", tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"lora_alpha": 32, "warmup_ratio": 0.1}))
    out.mkdir()
    (out / "run_config.json").write_text(json.dumps(vars(ft.parse_args(_args(word, out, "--recipe", str(recipe))))))
    spelled = ["--resume", "--deepspeed", "--lora-alpha", "32", "--warmup-ratio", "0.1"]
    assert ft.check_output_dir(ft.parse_args(_args(word, out, *spelled)), 0) is None
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"lora_alpha": 8, "warmup_ratio": 0.1}))
    with pytest.raises(QLoRADSError, match=r"different settings \(\['lora_alpha'\]\)"):
        ft.check_output_dir(ft.parse_args(_args(word, out, "--resume", "--recipe", str(other))), 0)


def test_tokens_per_s_leaves_out_held_out_and_checkpoints(monkeypatch, tmp_path):
    """On a clock that only the fakes move: 10 s of training after a 100 s baseline held-out loss, then 20 s after
    a 50 s checkpoint and another held-out: 1000 tokens each time are 100 and 50 tokens/s. The held-out and
    checkpoint seconds used to count as training time (1000 / 110 s for the first row)."""
    from qlora_ds import checkpointing
    from qlora_ds.eval import sharded

    ft = _finetune_module()
    clock = [0.0]

    def spend(seconds, result=None):
        def fake(*args, **kwargs):
            clock[0] += seconds
            return result
        return fake

    monkeypatch.setattr(ft, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(sharded, "sharded_heldout_loss", spend(100.0, (2.0, set())))
    monkeypatch.setattr(checkpointing, "save", spend(50.0))
    rows = []
    args = types.SimpleNamespace(pad_to_multiple_of=1, max_len=8, chunked_loss=True, keep_checkpoints=1)
    run = types.SimpleNamespace(args=args, rank=0, world=1, micro=1, out=str(tmp_path))
    engine = types.SimpleNamespace(skipped_steps=0, fp16_enabled=lambda: False, get_global_grad_norm=lambda: 1.5)
    metrics = types.SimpleNamespace(log=lambda **row: rows.append(row))
    data = ft.Data(train=[], eval_shard=[], eval_total=1, batches=None)
    loop = ft.Loop(run, engine, None, types.SimpleNamespace(pad_token_id=0), data, metrics, 0, 0)
    loop.bar = types.SimpleNamespace(set_postfix=lambda **kw: None, write=lambda text: None)
    loop.held_out()
    for step, (train_s, between) in enumerate([(10.0, ()), (20.0, (loop.checkpoint, loop.held_out))], 1):
        for work in between:
            work()
        clock[0] += train_s
        loop.step, loop.tokens, loop.lr = step, 1000, 1e-4
        loop.log_step(1.0)
    assert [r["tokens_per_s"] for r in rows if "tokens_per_s" in r] == [100.0, 50.0]
    assert loop.seconds == {"held_out": 200.0, "checkpoints": 50.0}


def test_resume_takes_the_run_however_its_paths_are_spelled(word, tmp_path, monkeypatch):
    """--output-dir runs/x/ (tab completion), ./runs/x or its absolute path is the same run, and --model / --dataset
    / --ds-config are compared by the file they name: each used to be refused as "different settings". The run
    records them absolute, so evaluate/generate --run work from any directory; a run that recorded them relative
    still resumes from the directory it ran in. --nan-policy skip may be added on resume (its stop error says so)."""
    import os
    import shutil

    from qlora_ds.run_dir import write_run_config

    ft = _finetune_module()
    monkeypatch.chdir(tmp_path)
    os.symlink(os.path.dirname(word["model"]), "fixture")
    model, data = (os.path.join("fixture", os.path.basename(word[k])) for k in ("model", "data"))
    first = ft.parse_args(["--model", model, "--dataset", data, "--output-dir", "run", "--ds-config", word["ds"]])
    os.mkdir("run")
    write_run_config(first, None, 1)
    recorded = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert (recorded["model"], recorded["dataset"], recorded["output_dir"]) == (
        str(tmp_path / model), str(tmp_path / data), str(tmp_path / "run"))
    assert recorded["ds_config"] == word["ds"] and recorded["init_adapter"] is None
    for out, model_as, extra in (("run/", model + "/", []), ("./run", word["model"], ["--nan-policy", "skip"]),
                                 (str(tmp_path / "run"), os.path.realpath(word["model"]), [])):
        resume = ft.parse_args(["--model", model_as, "--dataset", word["data"], "--output-dir", out,
                                "--ds-config", word["ds"], "--resume", *extra])
        assert ft.check_output_dir(resume, 0) is None
    shutil.copytree("run", "moved")                        # a run directory moved (or copied) to another disk
    assert ft.check_output_dir(ft.parse_args(["--model", model, "--dataset", data, "--output-dir", "moved",
                                              "--ds-config", word["ds"], "--resume"]), 0) is None
    other = ft.parse_args(["--model", word["ds"], "--dataset", data, "--output-dir", "run/", "--ds-config",
                           word["ds"], "--resume"])
    with pytest.raises(QLoRADSError, match=r"different settings \(\['model'\]\)"):
        ft.check_output_dir(other, 0)
    # a run_config.json from before paths were recorded absolute: resumable from the directory it ran in
    (tmp_path / "run" / "run_config.json").write_text(json.dumps({**recorded, "model": model, "dataset": data}))
    assert ft.check_output_dir(ft.parse_args(["--model", word["model"], "--dataset", data, "--output-dir", "run",
                                              "--ds-config", word["ds"], "--resume"]), 0) is None


def test_resume_with_max_steps_below_the_checkpoint_is_refused(word, tmp_path, monkeypatch):
    """A run checkpointed at step 6 resumed with --max-steps 4: the loop did not run and the run exported step 6's
    adapter as its own (summary steps 6). Refused before the model loads, and with --epochs once the steps are
    known (restore)."""
    from qlora_ds import checkpointing, run_dir

    monkeypatch.setenv("QLORA_DS_SECRET_DIR", str(tmp_path / "secrets"))
    ft = _finetune_module()
    out = tmp_path / "run"
    tag = out / "checkpoints" / "step0000006"
    tag.mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"not loaded here")
    checkpointing.write_manifest(str(tag), 6)
    run_dir.write_run_config(ft.parse_args(_args(word, out, "--max-steps", "6")), None, 1)
    for steps in ("6", "9"):
        assert ft.check_output_dir(ft.parse_args(_args(word, out, "--resume", "--max-steps", steps)), 0) == tag.name
    with pytest.raises(QLoRADSError, match=r"--resume --max-steps 4: the checkpoint of .* is at step 6, past the "
                                           r"end; continue with --max-steps 6 or more"):
        ft.check_output_dir(ft.parse_args(_args(word, out, "--resume", "--max-steps", "4")), 0)
    epochs = ft.parse_args(_args(word, out, "--resume", "--epochs", "1"))
    assert ft.check_output_dir(epochs, 0) == tag.name              # the steps of --epochs follow from the data
    epochs.max_steps = 5
    monkeypatch.setattr(checkpointing, "load", lambda engine, ckpt_dir, name: {"step": 6, "micro_step": 24})
    with pytest.raises(QLoRADSError, match=r"--resume --epochs 1.0 \(5 steps\): .* at step 6, past the end"):
        run_dir.restore(epochs, None, tag.name, 0)


def test_stop_signals_note_the_first_signal_and_agree_across_ranks():
    """SIGTERM / SIGUSR1 are noted, not fatal; a repeat (the deepspeed launcher passes on the SIGTERM each rank got)
    is ignored; SIGINT keeps its default. A rank that got none stops with the signal the others got."""
    import os
    import signal

    from qlora_ds.preemption import Preempted, StopSignals, stop_signals

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    stop = StopSignals()
    try:
        assert stop.vote(1) == [0.0, 0.0] and stop.agreed([0.0, 0.0]) == 0
        assert signal.getsignal(signal.SIGINT) is before[signal.SIGINT]
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)                  # a repeat: still alive, still SIGUSR1
        assert stop.signum == signal.SIGUSR1 and stop.vote(2) == [10.0, 1.0]
        assert stop.agreed([5.0, 0.5]) == signal.SIGUSR1      # 2 ranks, this one signalled
    finally:
        stop.restore()
    assert {s: signal.getsignal(s) for s in before} == before
    assert StopSignals(()).agreed([7.5, 0.5]) == signal.SIGTERM   # 2 ranks, the other one got SIGTERM
    assert Preempted(signal.SIGTERM, 3).exit_code == 143
    stopped = []
    for raised, handlers_kept in ((Preempted(signal.SIGTERM, 3), True), (RuntimeError("a rank failed"), False)):
        with pytest.raises(type(raised)):
            with stop_signals(rank=1, on_stop=lambda: stopped.append(True)):
                raise raised
        assert (signal.getsignal(signal.SIGTERM) is not before[signal.SIGTERM]) == handlers_kept
        signal.signal(signal.SIGTERM, before[signal.SIGTERM])
        signal.signal(signal.SIGUSR1, before[signal.SIGUSR1])
    assert stopped == [True]                              # process group torn down only on the graceful stop


def test_sigusr1_saves_the_step_reached_and_resume_equals_uninterrupted(word, grown):
    """A real SIGUSR1 from outside (Slurm's --signal) once training began: the run finishes its step, saves its
    checkpoint (signed, complete) and exits 138; --resume then ends as the straight run. It used to die at once,
    losing every step since the last --save-every checkpoint."""
    import signal
    import time

    from qlora_ds import checkpointing

    straight, out = grown[0], word["root"] / "usr1"
    args = _args(word, out, "--max-steps", "8", "--warmup-ratio", "0.25", "--save-every", "100", "--sample-prompt",
                 "What is AI?")
    log = word["root"] / "usr1.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, str(FINETUNE), *args], env=dist_env(), stdout=fh,
                                stderr=subprocess.STDOUT, cwd=REPO)
    try:
        deadline = time.monotonic() + 300
        metrics = out / "metrics.jsonl"           # its first row: the baseline held-out loss, in the loop
        while not metrics.exists() or not metrics.read_text().endswith("\n"):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.02)
        proc.send_signal(signal.SIGUSR1)
        proc.wait(timeout=120)
    finally:
        proc.kill()
    text = log.read_text()
    assert proc.returncode == 138, text[-3000:]
    stopped = _steps(out)[-1]["step"]
    assert 1 <= stopped < 8 and f"stopped by SIGUSR1 at step {stopped}, its checkpoint saved" in text
    assert checkpointing.latest_complete(str(out / "checkpoints")) == checkpointing.tag_of(stopped)
    assert not (out / "adapter").exists()
    check(_finetune(*args, "--resume"))
    a, b = _steps(straight), _steps(out)
    assert [r["step"] for r in b] == list(range(1, 9))
    assert [r["loss"] for r in a] == [r["loss"] for r in b] and [r["lr"] for r in a] == [r["lr"] for r in b]
    wa = load_file(straight / "adapter" / "adapter_model.safetensors")
    wb = load_file(out / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
