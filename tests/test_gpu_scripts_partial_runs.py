"""CPU checks of the GPU check's failure paths: a step killed or crashed halfway must leave its finished rows and a
readable summary (scripts/gpu/summarize.py, bench train's per-variant rows, bench memory's training-step worker)."""
import importlib.util
import json
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(path):
    spec = importlib.util.spec_from_file_location("gpu_review_" + os.path.basename(path)[:-3], os.path.join(REPO, path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_summarize_survives_cut_short_files(tmp_path, capsys):
    """paging.json / env.json cut short by a killed step, an odd steps row: summary still printed, exit 0."""
    (tmp_path / "paging.json").write_text('{"device": "H100", "kernel": {')
    (tmp_path / "env.json").write_text('{"gpu": "H1')
    (tmp_path / "steps.jsonl").write_text(json.dumps({"step": "env", "rc": 0, "seconds": 1.0, "budget_s": 20,
                                                      "timed_out": False, "note": ""}) + "\n{\"step\": \"paging\", \n")
    (tmp_path / "rows.jsonl").write_text(json.dumps({"bench": "headline", "shape": "llama-65b", "ok": False,
                                                     "error": "killed"}) + "\n"
                                         + json.dumps({"bench": "fp16", "stage": 0, "ok": True, "checks": {}}) + "\n"
                                         + json.dumps({"bench": "fp16", "stage": 1, "ok": False,
                                                       "checks": {"scale_halved": False}}) + "\n")
    with open(tmp_path / "steps.jsonl", "a") as fh:
        fh.write(json.dumps({"step": "headline_33b", "rc": 124, "seconds": 60, "budget_s": 60, "timed_out": True,
                             "note": ""}) + "\n")
    summarize = _load("scripts/gpu/summarize.py")
    assert summarize.main([str(tmp_path), "--elapsed", "5"]) == 0
    out = capsys.readouterr().out
    assert "## Steps" in out and "env.json unreadable" in out and "paging.json: JSONDecodeError" in out
    assert "llama-65b" in out and "headline_33b: exit 124 (timed out)" in out
    assert "## fp16" in out and "scale_halved" in out


def test_bench_train_writes_each_variant_row_as_it_ends(tmp_path, monkeypatch):
    """The GPU check SIGKILLs a step past its budget: the variants already done must have their rows on disk."""
    import pytest

    from bench import train

    monkeypatch.setenv("QLORA_DS_BENCH_RESULTS", str(tmp_path))
    monkeypatch.setenv("QLORA_DS_BENCH_DEVICE", "cpu")
    done = {"variant": "ours-nf4dq", "step_s": 1.0, "step_s_min": 1.0, "steps": 1, "tokens_per_s": 100.0,
            "loss_last": 1.0, "rss_before_load": 1, "rss_after_load": 2, "peak_load": 3, "peak_step": 4 << 20,
            "peak_step_kind": "rss_hwm_since_reset", "peak_process": 5, "trainable_params": 6,
            "optimizer": "torch.AdamW", "threads": 1, "compute_dtype": "fp32"}
    calls = []

    def fake(variant, args, out):
        calls.append(variant)
        if len(calls) == 2:
            row = json.loads((tmp_path / "train.jsonl").read_text().splitlines()[0])
            assert row["variant"] == "ours-nf4dq" and row["ours_speedup"] == 1.0
            raise KeyboardInterrupt("killed at the step's budget")
        return dict(done)

    monkeypatch.setattr(train, "_run_variant", fake)
    with pytest.raises(KeyboardInterrupt):
        train.main(["--model", str(tmp_path), "--dtype", "fp32", "--steps", "1"])
    assert calls == ["ours-nf4dq", "bnb-peft"]


def test_bench_memory_train_step_args_have_dropout(tmp_path, monkeypatch):
    """bench memory hands bench train's _run_variant a namespace: it reads args.dropout (AttributeError before)."""
    from bench import memory, train

    monkeypatch.setenv("QLORA_DS_BENCH_RESULTS", str(tmp_path))
    monkeypatch.setenv("QLORA_DS_BENCH_DEVICE", "cpu")
    seen = {}

    def fake(variant, args, out):
        seen["dropout"] = args.dropout
        return {"variant": variant, "error": "not run in this test"}

    monkeypatch.setattr(train, "_run_variant", fake)
    assert memory.main(["--quick", "--no-zero", "--formats", "nf4+dq", "--dtype", "fp32"]) == 0
    assert seen == {"dropout": 0.0}


def test_paging_check_exits_1_naming_what_failed(tmp_path, monkeypatch, capsys):
    """tests/scripts/optim_gpu_paging.py (the GPU check's paging step) with the optimizer broken on purpose: exit 1,
    the failed checks in the JSON and on the last line (the step's note). Eviction freeing memory counts on the GPU
    only (the CPU's fake managed memory frees nothing)."""
    from qlora_ds.optim import adamw

    paging = _load("tests/scripts/optim_gpu_paging.py")
    monkeypatch.setattr(adamw._AdamWBase, "_update", lambda self, *a, **k: None)     # never updates anything
    assert paging.main([str(tmp_path / "paging.json"), "--device", "cpu"]) == 1
    res = json.loads((tmp_path / "paging.json").read_text())
    kernel = res["kernel"]
    assert kernel["moments_bit_identical_to_torch"] is False and "moments_bit_identical_to_torch" in res["failed"]
    assert "param_ulps_vs_torch<=1" in res["failed"] and "evict_freed_state" not in res["failed"]
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"paging: FAILED {', '.join(res['failed'])}"
    ok = {"kernel": {"moments_bit_identical_to_torch": True, "param_ulps_vs_torch": 1, "bit_identical_to_torch": False,
                     "state_dict_gpu_cpu_gpu_exact": True},
          "paging": {"spike_ok": True, "paged_equals_unpaged": True, "evict_freed_state": False}}
    assert paging.failed_checks(ok) == []           # DEVICE is "cpu" after main(... cpu): an ulp off torch's passes
    monkeypatch.setattr(paging, "DEVICE", "cuda")
    assert paging.failed_checks(ok) == ["bit_identical_to_torch", "evict_freed_state"]     # on the GPU it must not
