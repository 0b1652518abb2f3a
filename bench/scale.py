"""Cost curves from 0.1B to 7B shapes: load and one training step, ours vs transformers + bitsandbytes.

    python -m bench scale --quick                     # llama-0.1b + qwen2-0.5b, seq 128 (test suite)
    python -m bench scale                             # both families up to 3B, + llama-7b (ours)
    python -m bench scale --sizes llama-7b --what load --impls ours,bnb --timeout 1800

1. Checkpoints: random-weight bf16 safetensors of real architectures' shapes (``SHAPES``: the published
   config.json numbers), sharded like the hub's (several shards + model.safetensors.index.json +
   config.json), written tensor by tensor (never more than one tensor in memory) into a cache outside the
   clone (``$QLORA_DS_SCALE_CACHE``, default ~/.cache/qlora_ds/scale); no tokenizer.
2. Every measurement is a fresh subprocess (``bench/scripts/scale_worker.py``) with its own peak RSS:
   load (bf16, wall time, peak, resident after) and one training step (batch 1 x seq 256, LoRA r 16 on all
   linears, gradient checkpointing, the compute dtype of this machine), ours and transformers + bnb NF4+DQ
   (+ PEFT). ZeRO-3 on 2 ranks: ``bench/scripts/zero3_load.py`` (per-rank load peak, packed bytes held).
   A measurement that passes ``--timeout`` is recorded as "timeout".
3. Beside each measurement the planner's prediction (``qlora_ds.plan.host``), from the config alone.
Rows go to bench/results/scale.jsonl; ``--plot`` redraws bench/results/scale.png from those rows and ``--report``
prints their tables, one machine at a time (``machine_of``: CPU model, ISA and threads, or the GPU): a ratio ours/bnb
is only formed between rows of one machine. Peak ratios use the anonymous peak (``<peak>_anon``: the RSS high-water
mark minus the file-backed pages, i.e. without the checkpoint transformers keeps mapped) where both rows have it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

from bench.common import REPO, RowWriter, anon_or_plain, describe_machine, format_table, results_dir
from qlora_ds.errors import QLoRADSError

MiB = 1 << 20
GiB = 1 << 30


def _llama(h, i, layers, heads, kv, vocab, tie, theta=10000.0, pos=2048, source=""):
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h, "intermediate_size": i,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
            "tie_word_embeddings": tie, "rope_theta": theta, "max_position_embeddings": pos, "rms_norm_eps": 1e-5,
            "hidden_act": "silu", "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2, "_source": source}


def _qwen2(h, i, layers, heads, kv, vocab, tie, source=""):
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": h, "intermediate_size": i,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
            "tie_word_embeddings": tie, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6, "hidden_act": "silu", "torch_dtype": "bfloat16", "use_sliding_window": False,
            "bos_token_id": 151643, "eos_token_id": 151643, "_source": source}


# Shapes from each model's published config.json (random weights).
SHAPES = {
    "llama-0.1b": _llama(576, 1536, 30, 9, 3, 49152, True, 100000.0, source="SmolLM2-135M"),
    "llama-0.4b": _llama(960, 2560, 32, 15, 5, 49152, True, 100000.0, source="SmolLM2-360M"),
    "llama-1.7b": _llama(2048, 8192, 24, 32, 32, 49152, True, 130000.0, source="SmolLM2-1.7B"),
    "llama-3b": _llama(3200, 8640, 26, 32, 32, 32000, False, source="OpenLLaMA-3B"),
    "llama-7b": _llama(4096, 11008, 32, 32, 32, 32000, False, source="LLaMA-7B"),
    "qwen2-0.5b": _qwen2(896, 4864, 24, 14, 2, 151936, True, source="Qwen2.5-0.5B"),
    "qwen2-1.5b": _qwen2(1536, 8960, 28, 12, 2, 151936, True, source="Qwen2.5-1.5B"),
    "qwen2-3b": _qwen2(2048, 11008, 36, 16, 2, 151936, True, source="Qwen2.5-3B"),
    "qwen2-7b": _qwen2(3584, 18944, 28, 28, 4, 152064, False, source="Qwen2.5-7B"),
}
QUICK = ("llama-0.1b", "qwen2-0.5b")
FULL = ("llama-0.1b", "llama-0.4b", "llama-1.7b", "llama-3b", "qwen2-0.5b", "qwen2-1.5b", "qwen2-3b", "llama-7b")
BNB_MAX_PARAMS = 4e9        # default sweep: transformers + bnb up to 3B shapes (7B: ask with --sizes/--impls)


# ------------------------------------------------------------------------------------------- checkpoints
def tensors(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor, in the order the hub's checkpoints list them."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    bias = cfg["model_type"] == "qwen2"
    out = [("model.embed_tokens.weight", (v, h))]
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out += [(p + "input_layernorm.weight", (h,))]
        for name, o in (("q_proj", h), ("k_proj", kv), ("v_proj", kv)):
            out.append((p + f"self_attn.{name}.weight", (o, h)))
            if bias:
                out.append((p + f"self_attn.{name}.bias", (o,)))
        out += [(p + "self_attn.o_proj.weight", (h, h)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i))]
    out.append(("model.norm.weight", (h,)))
    if not cfg["tie_word_embeddings"]:
        out.append(("lm_head.weight", (v, h)))
    return out


def n_params(cfg: dict) -> int:
    return sum(_numel(s) for _, s in tensors(cfg))


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


_POOL_CHUNK, _POOL_SLACK = 1 << 24, 1 << 20
_pools: dict[int, torch.Tensor] = {}


def _value(name: str, shape, seed: int) -> torch.Tensor:
    """N(0, 0.02) weights (ones for norms). Drawing 7e9 normals costs ~10 min on this CPU, so each tensor is
    tiled from one pool of 17M normals at per-tensor, per-chunk random offsets: every quantization block
    still sees normal values, and tensors differ."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    if seed not in _pools:
        g = torch.Generator().manual_seed(seed)
        _pools[seed] = torch.empty(_POOL_CHUNK + _POOL_SLACK, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=g)
    pool = _pools[seed]
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    out = torch.empty(shape, dtype=torch.bfloat16)
    flat = out.view(-1)
    starts = torch.randint(0, _POOL_SLACK, (-(-flat.numel() // _POOL_CHUNK),), generator=g).tolist()
    for k, st in enumerate(starts):
        piece = flat[k * _POOL_CHUNK:(k + 1) * _POOL_CHUNK]
        piece.copy_(pool[st:st + piece.numel()])
    return out


def _write_shard(file: Path, entries, seed: int) -> None:
    """A safetensors file written one tensor at a time (its header first, from the shapes alone)."""
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in entries:
        n = _numel(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = file.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name, shape in entries:
            f.write(_value(name, shape, seed).view(torch.uint8).numpy().data)
    os.replace(tmp, file)


def cache_root() -> Path:
    return Path(os.environ.get("QLORA_DS_SCALE_CACHE") or Path.home() / ".cache" / "qlora_ds" / "scale")


def checkpoint(name: str, root: Path | None = None, seed: int = 0) -> Path:
    """The cached checkpoint directory of ``SHAPES[name]`` (written when missing)."""
    return write_checkpoint(SHAPES[name], (root or cache_root()) / name, seed)


def write_checkpoint(cfg: dict, d: Path, seed: int = 0, max_shard_bytes: int = 2 * GiB) -> Path:
    """A random bf16 checkpoint of ``cfg`` in ``d``: at least 3 shards (at most ``max_shard_bytes`` each),
    the index and config.json. The index is written last, so a directory with an index is complete."""
    d = Path(d)
    index = d / "model.safetensors.index.json"
    if index.exists():
        return d
    d.mkdir(parents=True, exist_ok=True)
    entries = tensors(cfg)
    total = sum(_numel(s) * 2 for _, s in entries)
    limit = min(max_shard_bytes, -(-total // 3))
    shards, cur, size = [], [], 0
    for e in entries:
        n = _numel(e[1]) * 2
        if cur and size + n > limit:
            shards.append(cur)
            cur, size = [], 0
        cur.append(e)
        size += n
    shards.append(cur)
    weight_map = {}
    for k, entries_k in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_shard(d / fname, entries_k, seed)
        weight_map.update({n: fname for n, _ in entries_k})
    config = {k: v for k, v in cfg.items() if not k.startswith("_")}
    (d / "config.json").write_text(json.dumps(config, indent=2))
    tmp = index.with_suffix(".tmp")
    tmp.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    os.replace(tmp, index)
    return d


# ------------------------------------------------------------------------------------------- measurements
def _env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))


def measure(impl: str, what: str, path: Path, tmp: str, dtype: str, seq: int, steps: int, timeout: float) -> dict:
    out = os.path.join(tmp, f"{impl}-{what}-{path.name}.json")
    cmd = [sys.executable, str(REPO / "bench" / "scripts" / "scale_worker.py"), impl, what, str(path), out,
           "--dtype", dtype, "--seq", str(seq), "--steps", str(steps)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        partial = json.load(open(out)) if os.path.exists(out) else {}
        return {**partial, "impl": impl, "what": what, "status": "timeout", "timeout_s": timeout}
    if proc.returncode != 0 or not os.path.exists(out):
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        return {"impl": impl, "what": what, "status": "error",
                "error": f"exit {proc.returncode}: {tail[-1] if tail else ''}"[:300]}
    with open(out) as f:
        res = json.load(f)
    return {**res, "status": "ok", "wall_s": time.perf_counter() - t0}


def measure_zero3(path: Path, tmp: str, timeout: float) -> dict:
    from bench.memory import run_zero3
    try:
        z = run_zero3(str(path), 2, tmp, timeout)
    except subprocess.TimeoutExpired:
        return {"impl": "ours", "what": "zero3_load", "status": "timeout", "timeout_s": timeout}
    if "error" in z:
        return {"impl": "ours", "what": "zero3_load", "status": "error", "error": z["error"]}
    return {"impl": "ours", "what": "zero3_load", "status": "ok", **z}


def plan_for(name: str, row: dict, dtype: str, seq: int) -> dict:
    """The planner's prediction for one measurement row (bytes), from the config alone."""
    from qlora_ds.plan.host import predict
    cfg = {k: v for k, v in SHAPES[name].items() if not k.startswith("_")}
    if row["what"] == "zero3_load":
        return {"planned_peak_load": predict(cfg, "load", world=2, zero_stage=3).peak}
    if row["impl"] != "ours":
        return {}
    if row["what"] == "load":
        return {"planned_peak_load": predict(cfg, "load", dtype="bf16").peak}
    return {"planned_peak_load": predict(cfg, "load", dtype=dtype).peak,
            "planned_peak_step": predict(cfg, "step", dtype=dtype, seq_len=seq,
                                         fused_cpu_linear=bool(row.get("fused_linear"))).peak}


# ------------------------------------------------------------------------------------------- report
def _mib(x) -> str:
    return "-" if x is None else f"{x / MiB:.0f}"


def with_plan(r: dict) -> dict:
    """The row with the current planner's prediction beside it (recomputed, so a planner change shows)."""
    if r.get("status") != "ok":
        return r
    try:
        return {**r, **plan_for(r["model"], r, r["compute_dtype"], r["seq"])}
    except ImportError:
        return r


def machine_of(r: dict) -> str:
    """The machine a row ran on: the GPU's name on CUDA, else the CPU model, its ISA and the threads (rows from
    before ``cpu_name`` / ``cpu_isa`` were recorded: ``device_name``, and the AVX2 box's ISA)."""
    if r.get("device") == "cuda":
        return f"{r.get('device_name', '?')} (cuda)"
    return f"{r.get('cpu_name') or r.get('device_name', '?')} ({r.get('cpu_isa') or 'avx2'}) x{r.get('threads', '?')}"


def by_machine(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows grouped by ``machine_of``, the machine with the newest row first."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(machine_of(r), []).append(r)
    return dict(sorted(groups.items(), key=lambda kv: max(r.get("timestamp", "") for r in kv[1]), reverse=True))


def pick_machine(rows: list[dict], machine: str | None = None) -> str | None:
    """The machine of the newest row, or the one whose ``machine_of`` label contains ``machine`` (case-insensitive)."""
    labels = list(by_machine(rows))
    if machine is None:
        return labels[0] if labels else None
    hits = [m for m in labels if m == machine] or [m for m in labels if machine.lower() in m.lower()]
    if len(hits) != 1:
        raise QLoRADSError(f"--machine {machine!r} matches {len(hits)} of the machines in the rows "
                           f"({'; '.join(labels) or 'none'}): give a part of one label that no other contains")
    return hits[0]


def _box(r: dict) -> str:
    """Which CPU a row ran on (rows before ``cpu_isa`` was recorded are from the AVX2 box) and its threads."""
    return f"{r.get('cpu_isa') or 'avx2'} x{r.get('threads', '?')}, load {r.get('loadavg_1m', '?')}"


def table(rows: list[dict]) -> str:
    out = []
    for r in map(with_plan, rows):
        ok = r.get("status") == "ok"
        if r["what"] == "zero3_load":
            ranks = r.get("ranks") or []
            held = max((k["quantized_local"] / k["quantized_full"] for k in ranks), default=None)
            out.append([r["model"], f"{r['params'] / 1e9:.2f}", "ours", "zero3 x2 load", "-",
                        _mib(max((k["peak_load"] for k in ranks), default=None)) if ok else r["status"],
                        _mib(r.get("planned_peak_load")), "-", "-",
                        f"held {held:.3f}; {_box(r)}" if held else _box(r)])
            continue
        peak = r.get("peak_step" if r["what"] == "step" else "peak_load")
        planned = r.get("planned_peak_step" if r["what"] == "step" else "planned_peak_load")
        t = (r["step_s"][-1] if r["what"] == "step" else r["load_s"]) if ok else None
        out.append([r["model"], f"{r['params'] / 1e9:.2f}", r["impl"], f"{r['what']} {r.get('dtype', '')}",
                    "-" if t is None else f"{t:.1f}", _mib(peak) if ok else r["status"], _mib(planned),
                    f"{planned / peak:.3f}" if ok and planned else "-",
                    _mib(r.get("rss_after_load")) if ok else "-", _box(r)])
    return format_table(["model", "B params", "impl", "what", "s", "peak RSS MiB", "planned MiB", "planned/measured",
                         "RSS after load MiB", "note"], out)


def largest_bf16_tensor(name: str) -> int:
    return 2 * max(_numel(s) for _, s in tensors(SHAPES[name]))


def goals(rows: list[dict]) -> str:
    """Per machine and model: the issue's load goals (peak above the pre-load RSS <= loaded model + 2 x the largest
    bf16 tensor + 300 MiB; load time <= 0.5 x transformers + bnb), ZeRO-3 share, ours vs bnb step. A ratio ours/bnb
    is only formed between rows of one machine (``machine_of``); peak ratios use the anonymous peaks where both rows
    have them, else the plain ones, marked ``*`` (they count the checkpoint transformers keeps mapped)."""
    by = {(machine_of(r), r["model"], r["impl"], r["what"]): r for r in rows if r.get("status") == "ok"}
    machines = list(by_machine(rows))
    out, plain = [], False
    pairs = [(b, m) for b in machines
             for m in sorted({r["model"] for r in rows if machine_of(r) == b}, key=lambda m: n_params(SHAPES[m]))]
    for box, m in pairs:
        get = lambda impl, what: by.get((box, m, impl, what))  # noqa: E731
        ol, bl, z = get("ours", "load"), get("bnb", "load"), get("ours", "zero3_load")
        os_, bs = get("ours", "step"), get("bnb", "step")
        cell = ["-"] * 6
        bound = ol["model_bytes"] + 2 * largest_bf16_tensor(m) + 300 * MiB if ol else None
        if ol:
            used = ol["peak_load"] - ol["rss_before"]
            cell[0] = f"{used / MiB:.0f} <= {bound / MiB:.0f} {'yes' if used <= bound else 'NO'}"
        if ol and bl:
            cell[1] = f"{ol['load_s'] / bl['load_s']:.2f}"
            (po, ao), (pb, ab) = anon_or_plain(ol, "peak_load"), anon_or_plain(bl, "peak_load")
            anon = ao and ab and ol.get("rss_before_anon") is not None and bl.get("rss_before_anon") is not None
            base = "rss_before_anon" if anon else "rss_before"
            po, pb = (po, pb) if anon else (ol["peak_load"], bl["peak_load"])
            cell[2] = f"{(po - ol[base]) / (pb - bl[base]):.2f}" + ("" if anon else "*")
            plain |= not anon
        if z:
            share = max(k["quantized_local"] / k["quantized_full"] for k in z["ranks"])
            cell[3] = f"{share:.3f} {'yes' if share <= 0.525 else 'NO'}"
            rank_peak = max(k["peak_load"] - k["rss_before"] for k in z["ranks"])     # bounded like one rank's load
            cell[4] = f"{rank_peak / MiB:.0f}" + (f" <= {bound / MiB:.0f} {'yes' if rank_peak <= bound else 'NO'}"
                                                 if bound else "")
        if os_ and bs:
            (po, ao), (pb, ab) = anon_or_plain(os_, "peak_step"), anon_or_plain(bs, "peak_step")
            anon = ao and ab
            po, pb = (po, pb) if anon else (os_["peak_step"], bs["peak_step"])
            cell[5] = f"{os_['step_s'][-1] / bs['step_s'][-1]:.2f} / {po / pb:.2f}" + ("" if anon else "*")
            plain |= not anon
        out.append(([box] if len(machines) > 1 else []) + [m, SHAPES[m]["_source"], f"{n_params(SHAPES[m]) / 1e9:.2f}",
                                                           *cell])
    text = format_table((["machine"] if len(machines) > 1 else []) + [
        "model", "shape of", "B params", "load peak - pre-load MiB <= bound", "load time ours/bnb",
        "load peak ours/bnb (above pre-load)", "ZeRO-3 x2 packed share held <= 0.525",
        "ZeRO-3 rank load peak - pre-load MiB <= bound", "step time / peak ours/bnb"], out)
    if plain:
        text += ("\n* plain RSS peaks (rows without RssFile): bnb's include the bf16 checkpoint transformers keeps "
                 "mapped (file-backed pages), so the ratio understates ours/bnb")
    return text


def planner_table(rows: list[dict]) -> str:
    from qlora_ds.plan.host import CALIBRATION_MODEL
    out = []
    for r in sorted(map(with_plan, rows), key=lambda r: (n_params(SHAPES[r["model"]]), r["what"])):
        if r["impl"] != "ours" or r.get("status") != "ok":
            continue
        if r["what"] == "zero3_load":
            pairs = [("ZeRO-3 x2 load, rank max", max(k["peak_load"] for k in r["ranks"]), r["planned_peak_load"])]
        elif r["what"] == "load":
            pairs = [("load bf16", r["peak_load"], r["planned_peak_load"])]
        else:
            pairs = [(f"load {r['compute_dtype']} (step process)", r["peak_load"], r["planned_peak_load"]),
                     (f"step {r['compute_dtype']} seq {r['seq']}", r["peak_step"], r["planned_peak_step"])]
        for what, meas, plan in pairs:
            out.append([r["model"], "calibration" if r["model"] == CALIBRATION_MODEL else "validation", what,
                        f"{meas / MiB:.0f}", f"{plan / MiB:.0f}", f"{plan / meas:.3f}"])
    return format_table(["model", "role", "peak RSS of", "measured MiB", "planned MiB", "planned/measured"], out)


def plot(rows: list[dict], png: Path, machine: str | None = None) -> str:
    """Draw one machine's rows (``pick_machine``: the newest row's by default); returns a note of what was drawn and
    what was left out (rows of other machines)."""
    box = pick_machine(rows, machine)
    left = {m: len(rs) for m, rs in by_machine(rows).items() if m != box}
    rows = [with_plan(r) for r in rows if machine_of(r) == box]
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    series = {}
    for r in rows:
        if r.get("status") != "ok" or r["what"] == "zero3_load":
            continue
        fam = r["model"].split("-")[0]
        key = (r["what"], r["impl"], fam)
        y_t = r["step_s"][-1] if r["what"] == "step" else r["load_s"]
        y_m = r["peak_step"] if r["what"] == "step" else r["peak_load"]
        series.setdefault(key, []).append((r["params"] / 1e9, y_t, y_m / GiB, r.get("planned_peak_step" if
                                           r["what"] == "step" else "planned_peak_load")))
    for (what, impl, fam), pts in sorted(series.items()):
        pts.sort()
        x = [p[0] for p in pts]
        style = dict(marker="o" if impl == "ours" else "s", linestyle="-" if fam == "llama" else "--")
        lab = f"{impl} {fam}"
        ax_t = axes[0] if what == "load" else axes[1]
        ax_t.plot(x, [p[1] for p in pts], label=lab, **style)
        axes[2].plot(x, [p[2] for p in pts], label=f"{what} {lab}", **style)
        if impl == "ours" and all(p[3] for p in pts):
            axes[2].plot(x, [p[3] / GiB for p in pts], linestyle=":", color="gray", linewidth=1)
    for ax, title, yl in ((axes[0], "load wall time", "s"), (axes[1], "one training step (seq 256)", "s"),
                          (axes[2], "peak RSS (dotted: planner)", "GiB")):
        ax.set_title(title)
        ax.set_xlabel("parameters (B)")
        ax.set_ylabel(yl)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks([0.1, 0.2, 0.5, 1, 2, 5, 10], ["0.1", "0.2", "0.5", "1", "2", "5", "10"])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    m = max(rows, key=lambda r: r.get("timestamp", "")) if rows else {}
    fig.suptitle(f"{m.get('device_name', '?')} ({m.get('cpu_isa') or 'avx2'}), {m.get('cpu_count', '?')} CPUs, "
                 f"{m.get('threads', '?')} thread(s), load avg {m.get('loadavg_1m', '?')}, "
                 f"compute {m.get('compute_dtype', '?')}; ours = qlora_ds, bnb = transformers + bitsandbytes NF4+DQ")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, png)
    others = "; ".join(f"{k} ({n} rows)" for k, n in left.items())
    return f"{png}: {box}, {len(rows)} rows" + (f"; left out (other machines, --machine to draw one): {others}"
                                                if others else "")


def report(rows: list[dict], machine: str | None = None) -> str:
    """The tables of each machine's rows in turn (newest machine first), or of one (``--machine``)."""
    groups = by_machine(rows)
    if machine is not None:
        box = pick_machine(rows, machine)
        groups = {box: groups[box]}
    return "\n\n".join(f"## machine: {box} ({len(rs)} rows, newest {max(r.get('timestamp', '?') for r in rs)})\n\n"
                       + "\n\n".join((table(rs), goals(rs), planner_table(rs))) for box, rs in groups.items())


def load_rows(path: Path) -> list[dict]:
    """The latest row per (machine, model, impl, what) from scale.jsonl (``machine_of``: a newer row from another
    machine does not replace a machine's own)."""
    latest = {}
    if path.exists():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            latest[(machine_of(r), r["model"], r["impl"], r["what"])] = r
    return list(latest.values())


# ------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bench scale", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}; ours load + step, bnb load")
    ap.add_argument("--sizes", default=None, help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--family", choices=("llama", "qwen2"), default=None)
    ap.add_argument("--impls", default="ours,bnb")
    ap.add_argument("--what", default="load,step,zero3", help="comma list of load, step, zero3")
    ap.add_argument("--dtype", default="auto", help="compute dtype of the step (auto: qlora_ds.hardware's choice)")
    ap.add_argument("--seq", type=int, default=None, help="step sequence length (default 256; 128 with --quick)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per measurement; past it: 'timeout'")
    ap.add_argument("--plot", action="store_true", help="only redraw bench/results/scale.png from scale.jsonl")
    ap.add_argument("--report", action="store_true",
                    help="only print the tables of the latest rows in scale.jsonl, per machine")
    ap.add_argument("--machine", default=None,
                    help="--report/--plot: only the machine whose label (CPU model (ISA) xthreads) contains this")
    args = ap.parse_args(argv)
    out_dir = results_dir()
    name = "scale-quick" if args.quick else "scale"
    if args.plot or args.report:
        rows = load_rows(out_dir / f"{name}.jsonl")
        try:
            if args.plot:
                print(plot(rows, out_dir / f"{name}.png", args.machine))
            if args.report:
                print(report(rows, args.machine))
        except QLoRADSError as e:
            ap.error(str(e))
        return 0
    from qlora_ds.hardware import resolve_dtype
    dt = resolve_dtype(args.dtype, torch.device("cpu"))
    dtype = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dt]
    sizes = args.sizes.split(",") if args.sizes else list(QUICK if args.quick else FULL)
    if args.family:
        sizes = [s for s in sizes if s.startswith(args.family)]
    bad = [s for s in sizes if s not in SHAPES]
    if bad:
        ap.error(f"unknown sizes {bad}; choose from {', '.join(SHAPES)}")
    if args.seq is None:
        args.seq = 128 if args.quick else 256
    impls = args.impls.split(",")
    whats = args.what.split(",")
    if args.quick and args.what == ap.get_default("what"):
        whats = ["load", "step"]
    print(describe_machine("cpu") + f"; step compute dtype {dtype}", flush=True)
    writer = RowWriter(name, "cpu")
    rows, t_all = [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        for size in sizes:
            t0 = time.perf_counter()
            path = checkpoint(size)
            params = n_params(SHAPES[size])
            print(f"{size}: {params / 1e9:.2f} B params, checkpoint ready in {time.perf_counter() - t0:.0f} s "
                  f"({path})", flush=True)
            jobs = []
            for what in ("load", "step"):
                for impl in impls:
                    if what not in whats:
                        continue
                    if impl == "bnb" and (args.quick and (what == "step" or size != QUICK[0]) or
                                          not args.sizes and params > BNB_MAX_PARAMS):
                        continue
                    jobs.append((impl, what))
            if "zero3" in whats and "ours" in impls:
                jobs.append(("ours", "zero3_load"))
            for impl, what in jobs:
                if what == "zero3_load":
                    r = measure_zero3(path, tmp, args.timeout)
                else:
                    r = measure(impl, what, path, tmp, dtype, args.seq, 1, args.timeout)
                r.update(model=size, params=params, source=SHAPES[size]["_source"], seq=args.seq,
                         compute_dtype=dtype, batch=1, lora_r=16, grad_ckpt=True)
                writer.write(**r)
                rows.append(writer.rows[-1])
                print(table([rows[-1]]).splitlines()[-1], flush=True)
    print(f"\n{name}: {len(rows)} measurements in {time.perf_counter() - t_all:.0f} s")
    print(table(rows), goals(rows), planner_table(rows), sep="\n\n")
    if not args.quick:
        print(plot(load_rows(writer.path), out_dir / "scale.png", machine_of(rows[-1]) if rows else None))
    print(f"rows appended to {writer.path}")
    return 0 if all(r["status"] != "error" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
