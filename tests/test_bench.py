"""Smoke test of the benchmark entry point: it runs and appends well-formed rows (speed is not tested)."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MACHINE_FIELDS = {"bench", "timestamp", "device", "device_name", "cpu_name", "cpu_isa", "kernel_isa", "fused_linear",
                  "cpu_count", "threads", "versions", "commit"}
ROW_FIELDS = {"shape", "dtype", "op", "impl", "ms", "ms_min", "reps", "gbps", "pct_copy"}


def test_bench_quant_quick_appends_rows(tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "QLORA_DS_BENCH_RESULTS": str(tmp_path)}
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/qlora_ds/torch_extensions"))
    proc = subprocess.run([sys.executable, "-m", "bench", "quant", "--quick", "--device", "cpu"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "goal quantize+DQ" in proc.stdout and "| impl[backend]" in proc.stdout

    rows = [json.loads(line) for line in (tmp_path / "quant.jsonl").read_text().splitlines()]
    ops = {(r["impl"], r.get("backend"), r["op"], r.get("format"), r.get("double_quant")) for r in rows}
    for row in rows:
        assert MACHINE_FIELDS | ROW_FIELDS <= row.keys(), sorted(MACHINE_FIELDS | ROW_FIELDS - row.keys())
        assert row["bench"] == "quant" and row["shape"] == [512, 512] and row["dtype"] == "bfloat16"
        assert row["device"] == "cpu" and row["threads"] >= 1 and row["versions"]["torch"]
        assert row["kernel_isa"] in ("avx512", "avx2", "scalar", "torch") and row["compute_dtype"] == "bf16"
        assert row["fused_linear"] is (row["cpu_isa"] == "amx" and row["kernel_isa"] == "avx512")
        assert row["ms"] > 0 and row["reps"] >= 1
    assert {("torch", None, "copy_", None, None), ("torch", None, "clone", None, None)} <= ops
    for fmt in ("nf4", "fp4"):
        for dq in (True, False):
            for op in ("quantize", "dequantize", "dequantize_out"):
                assert any(o[0] == "qlora_ds" and o[2:] == (op, fmt, dq) and o[1] in ("cpu", "torch") for o in ops)
            assert ("qlora_ds", "torch", "quantize", fmt, dq) in ops       # the reference backend is timed too
    for bits in (2, 3, 4):
        assert ("qlora_ds", "intn", "dequantize", f"int{bits}", None) in ops
    assert not any(r["impl"] == "bitsandbytes" for r in rows) or any(r.get("vs_bnb") for r in rows)


def test_bench_quality_variants_and_summary():
    """bench quality: variant names parse, and the summary keeps the lr run on most seeds with its mean ± std."""
    import pytest
    from bench import quality as q
    assert q.parse_variant("qalora-int3-sum") == ("qalora", 3, "sum")
    assert q.parse_variant("bf16-lora") == ("lora", None, None)
    with pytest.raises(ValueError, match="unknown variant"):
        q.parse_variant("qalora-int5")
    with pytest.raises(SystemExit):
        q.main(["--gptq-bits", "8", "--quick"])
    row = lambda lr, seed, loss, phase: {"eval": "qalora-int3-sum merged", "lr": lr, "seed": seed,  # noqa: E731
                                         "heldout_loss": loss, "phase": phase, "loss_before": 4.0}
    rows = [row(1e-4, 0, 1.0, "sweep"), row(3e-4, 0, 0.5, "sweep"), row(1e-4, 1, 2.0, "seeds"),
            row(1e-4, 2, 3.0, "seeds")]
    table, sweep, best = q.summarize(rows)
    assert best["qalora-int3-sum merged"] == (1e-4, [1.0, 2.0, 3.0])
    assert "2.0000 ± 1.0000" in table and "0.5000" in sweep and "1.0000" in sweep


def test_bench_layer_and_memory_record_compute_dtype(tmp_path, monkeypatch):
    """bench layer (default --dtype auto: resolve_dtype's choice) and bench memory (--dtype fp32) put the compute
    dtype and the CPU's ISA in every row, and memory really loads in fp32 (4-byte embeddings)."""
    import pytest
    pytest.importorskip("transformers")
    from bench import _train_loop as tl, layer, memory
    from qlora_ds.hardware import dtype_name, resolve_dtype
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("QLORA_DS_BENCH_RESULTS", str(tmp_path))
    monkeypatch.setenv("QLORA_DS_BENCH_DEVICE", "cpu")
    assert layer.main(["--quick", "--shape", "64x128", "--tokens", "16"]) == 0
    assert memory.main(["--quick", "--no-zero", "--no-train", "--formats", "nf4+dq", "--dtype", "fp32"]) == 0
    auto = dtype_name(resolve_dtype("auto", "cpu"))
    for name, want in (("layer", auto), ("memory", "fp32")):
        rows = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        assert rows and all(r["compute_dtype"] == want and r["cpu_isa"] and r["kernel_isa"] for r in rows), rows
    layer_row = json.loads((tmp_path / "layer.jsonl").read_text().splitlines()[0])
    assert layer_row["dtype"] == auto and "bnb_peft_error" not in layer_row      # the old key, for old readers
    mem = json.loads((tmp_path / "memory.jsonl").read_text().splitlines()[0])
    vocab = len(tl.load_tokenizer(tl.tokenizer_source()))     # tiny_checkpoint: hidden 64, 2 layers, tied embeddings
    assert mem["other_bytes"] == 4 * (vocab * 64 + 5 * 64)      # embeddings and the 5 norms in fp32, not bf16


def test_interleaved_timing_alternates_order_and_pairs_rounds():
    from bench.common import paired_ratio, time_interleaved
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    timings, samples = time_interleaved(fns, "cpu", warmup=1, repeats=4, max_s=60)
    assert calls[:3] == ["a", "b", "c"]                       # warm-up
    assert calls[3:] == ["a", "b", "c", "c", "b", "a"] * 2    # rounds, every other one reversed
    assert {n: t["reps"] for n, t in timings.items()} == {"a": 4, "b": 4, "c": 4}
    # the ratio is the median of per-round ratios: one slow round (a machine's busy spell) does not move it
    s = {"ours": [1.1, 2.2, 1.1, 11.0, 1.1], "dense": [1.0, 2.0, 1.0, 5.0, 1.0]}
    assert abs(paired_ratio(s, "ours", "dense") - 1.1) < 1e-12


def test_bench_decode_quick_generates_the_same_tokens_both_ways(tmp_path, monkeypatch, cpu_op):
    """bench decode --quick: linear rows for NF4 and INT4, and generate rows (NF4 and QA-LoRA) whose tokens are the
    same with the few-rows path on and off, with the adapters-off time recorded beside them."""
    import pytest
    pytest.importorskip("transformers")
    from bench import decode
    monkeypatch.setenv("QLORA_DS_BENCH_RESULTS", str(tmp_path))
    assert decode.main(["--quick", "--shape", "64x128", "--rows", "1,2", "--intn-bits", "4"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "decode.jsonl").read_text().splitlines()]
    gen = [r for r in rows if r.get("kind") == "generate"]
    assert len(gen) == 2 and len(rows) == 6, rows
    assert all(r["same_tokens"] and r["ms_per_token_on_no_adapter"] > 0 for r in gen), gen
