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


def _scale_row(box: str, model: str, impl: str, what: str, ts: str, **fields) -> dict:
    cpu, isa = {"amd": ("AMD EPYC", "avx512_bf16"), "intel": ("Intel(R) Xeon(R) Processor", "amx")}[box]
    return {"model": model, "impl": impl, "what": what, "status": "ok", "timestamp": ts, "device": "cpu",
            "device_name": cpu, "cpu_name": cpu, "cpu_isa": isa, "threads": 1, "params": 1.3e8, "seq": 256,
            "compute_dtype": "bf16", "dtype": "bfloat16", "step_s": [fields.pop("s")], "peak_load": 500 << 20,
            "rss_before": 100 << 20, "rss_after_load": 480 << 20, **fields}


def test_bench_scale_report_pairs_rows_of_one_machine_only(tmp_path, capsys):
    """ours/bnb ratios of `bench scale --report` come from rows of one machine (CPU model, ISA, threads): a newer
    ours row from another box neither replaces a box's own nor is divided by that box's bnb row; peaks compare on
    the anonymous figure (RSS minus the mapped checkpoint) where both rows have it."""
    from bench import scale
    MiB = 1 << 20
    rows = [_scale_row("amd", "llama-0.1b", "ours", "step", "2026-12-03T10:00:00", s=10.0, peak_step=700 * MiB),
            _scale_row("amd", "llama-0.1b", "bnb", "step", "2026-12-03T11:00:00", s=20.0, peak_step=1400 * MiB),
            _scale_row("intel", "llama-0.1b", "ours", "step", "2026-12-05T10:00:00", s=1.0, peak_step=690 * MiB),
            _scale_row("amd", "llama-0.4b", "ours", "step", "2026-12-03T12:00:00", s=3.0, peak_step=600 * MiB,
                       peak_step_anon=500 * MiB),
            _scale_row("amd", "llama-0.4b", "bnb", "step", "2026-12-03T13:00:00", s=4.0, peak_step=2000 * MiB,
                       peak_step_anon=1000 * MiB)]
    (tmp_path / "scale.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = scale.load_rows(tmp_path / "scale.jsonl")
    assert len(loaded) == 5                                   # the Intel row does not replace the AMD box's own
    goals = scale.goals(loaded).splitlines()
    amd = [ln for ln in goals if "AMD EPYC" in ln]
    intel = [ln for ln in goals if "Intel" in ln]
    assert "0.50 / 0.50*" in amd[0] and "0.75 / 0.50 " in amd[1], goals      # 10/20, 700/1400 (plain); 3/4, 500/1000
    assert "0.05" not in "\n".join(goals) and intel[0].rstrip(" |").endswith("-"), goals   # no 1 s / 20 s
    text = scale.report(loaded)
    assert text.count("## machine: ") == 2 and text.index("Intel") < text.index("AMD EPYC")   # newest machine first
    only = scale.report(loaded, "epyc")
    assert "## machine: AMD EPYC (avx512_bf16) x1 (4 rows" in only and "Intel" not in only
    import pytest
    from qlora_ds.errors import QLoRADSError
    with pytest.raises(QLoRADSError, match="matches 0 of the machines"):
        scale.report(loaded, "h100")
    pytest.importorskip("matplotlib")
    note = scale.plot(loaded, tmp_path / "scale.png", "epyc")
    assert note.startswith(f"{tmp_path / 'scale.png'}: AMD EPYC (avx512_bf16) x1, 4 rows; left out") and "Intel" in note


def test_peak_fields_take_the_mapped_file_out(tmp_path):
    """bench.common.peak_fields: pages of a mapped file read after the peak reset count in VmHWM and RssFile, not in
    the anonymous figure (transformers + bnb keep the checkpoint mapped this way)."""
    import mmap
    from bench.common import peak_fields
    from qlora_ds.memstats import reset_peak
    size = 64 << 20
    path = tmp_path / "blob"
    path.write_bytes(b"\1" * size)
    reset_peak()
    before = peak_fields("p")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        assert sum(m[i] for i in range(0, size, 4096)) == size // 4096      # touch every page
        after = peak_fields("p")
    assert after["p_rss_file"] - before["p_rss_file"] > 0.9 * size
    assert after["p_anon"] == after["p"] - after["p_rss_file"]
    assert abs(after["p_anon"] - before["p_anon"]) < 0.25 * size             # the anonymous peak did not grow


def test_describe_machine_names_the_cpu_on_a_gpu_run(monkeypatch):
    """The printed header names the CPU model and ISA on every run, and the GPU beside it on CUDA."""
    import torch
    from bench import common
    from qlora_ds import hardware
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(common, "kernel_isa", lambda device: "cuda")     # no CUDA op build on a CPU-only torch
    line = common.describe_machine("cuda")
    assert f"cpu: {hardware.cpu_name()} ({hardware.cpu_isa()})" in line and "gpu: NVIDIA H100 80GB HBM3" in line
    assert f"cpu: {hardware.cpu_name()} ({hardware.cpu_isa()})" in common.describe_machine("cpu")


def test_fused_linear_ab_arms_take_the_paths_they_are_named_after(monkeypatch, capsys, cpu_op):
    """bench/scripts/fused_linear_ab.py at 1 row: the few-rows kernel, tried first, is off in both arms, so the
    "fused" arm runs the AMX kernel forward and the other one dequantizes."""
    import importlib.util
    import pytest
    from qlora_ds.nn import functional as fn
    from qlora_ds.ops import fused_linear, small_rows
    if not fused_linear.available():
        pytest.skip("no AMX fused linear on this CPU")
    calls = {"small": 0, "fused": 0}

    def count(name, f):
        def g(*a, **k):
            calls[name] += 1
            return f(*a, **k)
        return g
    monkeypatch.setattr(fn.small_rows, "linear_4bit", count("small", small_rows.linear_4bit))
    monkeypatch.setattr(fn.fused_linear, "linear_4bit", count("fused", fused_linear.linear_4bit))
    for name in ("MAX_ROWS", "MAX_ROWS_LARGE"):               # the script lifts them: put them back afterwards
        monkeypatch.setattr(fused_linear, name, getattr(fused_linear, name))
    spec = importlib.util.spec_from_file_location("fused_linear_ab", REPO / "bench" / "scripts" / "fused_linear_ab.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(sys, "argv", ["fused_linear_ab.py", "--rows", "1", "--shapes", "1024x1024", "--rounds", "1"])
    was_small, was_fused = small_rows._switch.on, fused_linear._switch.on
    try:
        script.main()
    finally:
        small_rows.set_enabled(was_small)
        fused_linear.set_enabled(was_fused)
    assert calls["small"] == 0 and calls["fused"] > 0, calls
    assert "| 1024x1024 | 1 |" in capsys.readouterr().out
