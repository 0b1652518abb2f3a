"""scripts/gpu_check.sh --dry-run: every step of the prepared GPU proof runs on CPU at tiny shapes (one process),
so the script cannot rot before a GPU is lent. ~30 s of CPU on a quiet 2-core box."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ["install", "env", "build_quant", "build_paged_optim", "tests", "headline", "headline_33b", "headline_13b",
         "headline_7b", "paging", "bench_quant", "bench_layer", "fp16", "bench_train_135m", "bench_train_1b"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_results")
    env = {**os.environ, "OUT": str(out), "GPU_CHECK_BUDGET": "900", "OMP_NUM_THREADS": "1",
           "PYTHON": sys.executable, "QLORA_DS_WHEELS": str(out / "no_wheels")}
    proc = subprocess.run(["bash", os.path.join(REPO, "scripts", "gpu_check.sh"), "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    return out, proc


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_every_step_runs_or_says_why_not(dry_run):
    out, proc = dry_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = {s["step"]: s for s in _jsonl(out / "steps.jsonl")}
    assert list(steps) == STEPS
    ran = {n for n, s in steps.items() if s["rc"] != "skipped"}
    assert ran == {"env", "build_quant", "tests", "headline", "bench_quant", "bench_layer", "fp16", "bench_train_135m"}
    failed = {n: s for n, s in steps.items() if n in ran and s["rc"] != 0}
    assert not failed, (failed, (out / "log.txt").read_text()[-4000:])
    assert all(s["note"] for n, s in steps.items() if n not in ran)           # a skip says why
    # what comes back from the device tool: at most 8 plain files, no folders
    assert len(os.listdir(out)) <= 8 and all((out / f).is_file() for f in os.listdir(out))


def test_headline_rows_set_measured_beside_planned(dry_run):
    out, _ = dry_run
    rows = [r for r in _jsonl(out / "rows.jsonl") if r["bench"] == "headline"]
    assert [r["shape"].split("-shaped")[0] for r in rows] == ["llama-65b", "llama-33b", "llama-13b", "llama-7b"]
    for r in rows:
        assert r["ok"] and r["layers"] == 2 and r["hidden"] == 64 and r["r"] == 64 and r["seq"] == 32
        assert r["measured_peak_bytes"] > 0 and r["planned_compared_bytes"] > 0 and r["lora_params"] > 0
        assert r["device"] == "cpu" and r["commit"] and r["versions"]["torch"]
    env = json.loads((out / "env.json").read_text())
    assert env["versions"]["torch"] and env["cpu_isa"] and env["commit"]
    summary = (out / "summary.md").read_text()
    assert "## Headline" in summary and "llama-65b-shaped" in summary and "## bench layer" in summary
    benches = {r["bench"] for r in _jsonl(out / "rows.jsonl")}
    assert {"headline", "quant", "layer", "train", "fp16"} <= benches
    fp16 = [r for r in _jsonl(out / "rows.jsonl") if r["bench"] == "fp16"]
    assert [(r["stage"], r["ok"]) for r in fp16] == [(0, True)] and fp16[0]["restored"]["scale"] == 128.0


def test_gpu_mode_without_wheels_records_the_fix(tmp_path):
    """Outside the dry run a missing wheels folder is a recorded step failure naming the fix, not a crash
    (checked on the runner alone: no GPU steps start here)."""
    spec = importlib.util.spec_from_file_location("gpu_check_runner", os.path.join(REPO, "scripts", "gpu", "check.py"))
    check = sys.modules[spec.name] = importlib.util.module_from_spec(spec)     # its dataclass needs the entry
    spec.loader.exec_module(check)
    runner = check.Runner(str(tmp_path), budget=60, dry=False)
    check.install(runner, str(tmp_path / "none"))
    row = _jsonl(tmp_path / "steps.jsonl")[0]
    assert row["step"] == "install" and row["rc"] == 1 and "fetch_wheels.sh" in row["note"]
    names = [s.name for s in check.steps(str(tmp_path))]
    assert names == STEPS[1:]
    assert all(s.gpu for s in check.steps(str(tmp_path)))                  # every step has a GPU command
