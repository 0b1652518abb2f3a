"""Smoke tests of ``python -m bench train|quality --quick``: they run and write rows (no speed asserted)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytest.importorskip("peft")
pytest.importorskip("transformers")


def _run(name: str, results: Path, *extra: str) -> list[dict]:
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    proc = subprocess.run([sys.executable, "-m", "bench", name, "--quick", "--results-dir", str(results), *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    path = results / f"{name}.jsonl"
    assert path.exists(), f"no rows written to {path}"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert rows and all(r["bench"] == name and "commit" in r and "device" in r for r in rows)
    return rows


def test_bench_train_quick(tmp_path):
    """Every variant computes in the asked dtype (fp32 here: auto would be bf16 on an AMX box) and says so."""
    rows = _run("train", tmp_path, "--dtype", "fp32")
    ours = [r for r in rows if r["variant"] == "ours-nf4dq"]
    assert ours and ours[0]["tokens_per_s"] > 0 and ours[0]["peak_step"] > 0
    assert {r["variant"] for r in rows} == {"ours-nf4dq", "bnb-peft", "bf16-peft"}
    for r in rows:
        assert r["compute_dtype"] == "fp32" and "dtype_mismatch" not in r, r
        assert r["cpu_isa"] in ("amx", "avx512_bf16", "avx512", "avx2", "other") and r["kernel_isa"]
        # beside each RSS peak its file-backed part (bnb: the mapped checkpoint) and the anonymous rest
        for name in ("peak_step", "peak_load", "rss_before_load"):
            assert 0 < r[f"{name}_rss_file"] < r[name] and r[f"{name}_anon"] == r[name] - r[f"{name}_rss_file"], r
    bnb = next(r for r in rows if r["variant"] == "bnb-peft")
    assert bnb["ours_peak_step_anon_ratio"] == ours[0]["peak_step_anon"] / bnb["peak_step_anon"]


def test_bench_quality_quick(tmp_path):
    rows = _run("quality", tmp_path, "--variants", "bf16-lora,qlora-nf4dq,qalora-int2")
    evals = {r["eval"] for r in rows}
    assert {"bf16-lora", "qlora-nf4dq", "qlora-nf4dq merged RTN-INT2", "qalora-int2 merged"} <= evals
    assert all(r["heldout_loss"] > 0 for r in rows)
