"""Shared pieces of the benchmarks: a timer, the machine/version record and the JSONL row writer, and a
plain-text table printer.

Every row written records its shape, dtype, device, thread count, versions and git commit (style item
10), so that a file of rows can be read without knowing which machine or checkout produced it.
"""
from __future__ import annotations

import datetime as _dt
import functools
import importlib.metadata
import json
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from qlora_ds import hardware

REPO = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS_DIR = Path(__file__).resolve().parent / "results"
VERSIONED = ("torch", "bitsandbytes", "torchao", "qlora-ds")


def results_dir(override: str | os.PathLike | None = None) -> Path:
    """``--results-dir`` if given, else ``$QLORA_DS_BENCH_RESULTS``, else ``bench/results``."""
    return Path(override or os.environ.get("QLORA_DS_BENCH_RESULTS") or DEFAULT_RESULTS_DIR)


def default_device() -> torch.device:
    """``$QLORA_DS_BENCH_DEVICE`` (``python -m bench … --device``) if set, else the GPU if there is one."""
    return torch.device(os.environ.get("QLORA_DS_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device | str, *, warmup: int = 1, repeats: int = 5,
            max_s: float = 2.0) -> tuple[dict, object]:
    """Median wall time of ``fn`` in ms after ``warmup`` untimed calls, and the last call's result.

    Times up to ``repeats`` calls but stops once the timed calls have taken ``max_s`` seconds (at least
    one call is always timed), so slow reference implementations cost a bounded time. The device is
    synchronised before and after each timed call. Each result is dropped before the next call (as a
    caller that discards it would), except the last one, which is returned so that a slow quantizer
    need not run again to produce the tensor the dequantize timing uses.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples: list[float] = []
    spent = 0.0
    while True:
        t0 = time.perf_counter()
        result = fn()
        synchronize(device)
        dt = time.perf_counter() - t0
        samples.append(dt)
        spent += dt
        if len(samples) >= max(1, repeats) or spent >= max_s:
            break
        del result
    timing = {"ms": 1e3 * statistics.median(samples), "ms_min": 1e3 * min(samples), "reps": len(samples),
              "warmup": warmup}
    return timing, result


def time_interleaved(fns: dict[str, Callable[[], object]], device: torch.device | str, *, warmup: int = 1,
                     repeats: int = 5, max_s: float = 2.0) -> tuple[dict[str, dict], dict[str, list[float]]]:
    """``time_fn`` for several variants at once, run in rounds: each round calls every variant once, in an order
    reversed every other round, so a slow spell of a shared machine (other jobs, clock changes) falls on all of
    them alike. Returns each variant's timing dict and its per-round seconds; a ratio between two variants is
    then the median of their per-round ratios (``paired_ratio``), not a ratio of medians taken minutes apart.
    Stops after ``repeats`` rounds or once the rounds have taken ``max_s`` seconds per variant."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    names = list(fns)
    samples: dict[str, list[float]] = {n: [] for n in names}
    spent = 0.0
    while True:
        order = names if len(samples[names[0]]) % 2 == 0 else names[::-1]
        for n in order:
            t0 = time.perf_counter()
            fns[n]()
            synchronize(device)
            dt = time.perf_counter() - t0
            samples[n].append(dt)
            spent += dt
        if len(samples[names[0]]) >= max(1, repeats) or spent >= max_s * len(names):
            break
    timings = {n: {"ms": 1e3 * statistics.median(v), "ms_min": 1e3 * min(v), "reps": len(v), "warmup": warmup}
               for n, v in samples.items()}
    return timings, samples


def paired_ratio(samples: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of a's time / b's time (``time_interleaved``'s samples)."""
    return statistics.median(x / y for x, y in zip(samples[a], samples[b]))


def cpu_model() -> str:
    return hardware.cpu_name()


def kernel_isa(device: torch.device | str) -> str:
    """The path our quant ops take for tensors on ``device``: the compiled CPU op's SIMD path ('avx512', 'avx2',
    'scalar'), 'cuda', or 'torch' (the pure-torch reference)."""
    device = torch.device(device)
    try:
        from qlora_ds import ops

        mod = ops.load_backend(device.type)
    except Exception:  # noqa: BLE001 - a row must still be written
        return "unknown"
    if mod is ops.reference:
        return "torch"
    return mod.cpu_isa() if device.type == "cpu" and hasattr(mod, "cpu_isa") else device.type


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=None)
def git_commit() -> str:
    """Short HEAD commit, with ``+dirty`` when the working tree has uncommitted changes; ``$QLORA_DS_COMMIT`` where
    there is no git checkout (the lent GPU machine gets a copy of the tree: scripts/gpu_check.sh sets it)."""
    if os.environ.get("QLORA_DS_COMMIT"):
        return os.environ["QLORA_DS_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def fused_linear_on(device: torch.device | str) -> bool:
    """Whether bf16 QLoRA layers on ``device`` take the fused dequantize + AMX GEMM path (qlora_ds.ops.fused_linear)."""
    if torch.device(device).type != "cpu":
        return False
    try:
        from qlora_ds.ops import fused_linear

        return fused_linear.available()
    except Exception:  # noqa: BLE001 - a row must still be written
        return False


def machine(device: torch.device | str) -> dict:
    """What every row records about where and with what it ran."""
    return {
        "device": torch.device(device).type,
        "device_name": device_name(device),
        "cpu_name": hardware.cpu_name(),
        "cpu_isa": hardware.cpu_isa(),                # widest SIMD of the host CPU: amx | avx512_bf16 | avx512 | avx2
        "kernel_isa": kernel_isa(device),              # the path our quant kernels actually took
        "fused_linear": fused_linear_on(device),       # bf16 layers dequantize inside an AMX GEMM (no bf16 weight)
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "loadavg_1m": round(os.getloadavg()[0], 2),   # other processes on the machine make timings noisy
        "versions": {d: _version(d) for d in VERSIONED},
        "commit": git_commit(),
    }


class RowWriter:
    """Appends one JSON object per line to ``<dir>/<name>.jsonl``; each row carries ``machine()`` and a
    run id / timestamp shared by all rows of one run."""

    def __init__(self, name: str, device: torch.device | str, directory: str | os.PathLike | None = None,
                 compute_dtype: torch.dtype | str | None = None):
        self.path = results_dir(directory) / f"{name}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        now = _dt.datetime.now(_dt.timezone.utc)
        self.common = {"bench": name, "timestamp": now.isoformat(timespec="seconds"), **machine(device)}
        if compute_dtype is not None:  # a row's own compute_dtype field (write(compute_dtype=...)) overrides it
            self.common["compute_dtype"] = (hardware.dtype_name(compute_dtype)
                                            if isinstance(compute_dtype, torch.dtype) else str(compute_dtype))
        self.rows: list[dict] = []

    def write(self, **fields) -> dict:
        """Append one row; fields that are None are left out (rows stay small)."""
        row = {**self.common, **{k: v for k, v in fields.items() if v is not None}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row, separators=(",", ":")) + "\n")
        self.rows.append(row)
        return row


def format_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A fixed-width text table (also valid Markdown)."""
    cells = [[str(h) for h in header]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def describe_machine(device: torch.device | str) -> str:
    """One line: the CPU model and ISA always (the host side of every run), the GPU on CUDA, threads, versions."""
    m = machine(device)
    vers = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v) or "?"
    missing = [k for k, v in m["versions"].items() if not v]
    gpu = f"gpu: {m['device_name']}, " if m["device"] == "cuda" else ""
    return (f"cpu: {m['cpu_name']} ({m['cpu_isa']}), {m['cpu_count']} CPUs, {gpu}device {m['device']}, "
            f"quant kernels: {m['kernel_isa']}{' + fused AMX linear' if m['fused_linear'] else ''}, "
            f"torch threads {m['threads']}, "
            f"load average {m['loadavg_1m']}; "
            f"{vers}" + (f" (not installed: {', '.join(missing)})" if missing else "") + f"; commit {m['commit']}")


def _proc_status(*fields: str) -> dict[str, int | None]:
    """Bytes of the given /proc/self/status fields (None where absent: no /proc, or an old kernel)."""
    out: dict[str, int | None] = dict.fromkeys(fields)
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in out:
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


def rss_file() -> int | None:
    """Resident file-backed bytes of this process now (RssFile): shared libraries and mapped files, e.g. the
    safetensors shards transformers keeps mapped after loading. Clean, reclaimable pages, but counted in VmRSS/VmHWM."""
    return _proc_status("RssFile")["RssFile"]


def peak_fields(name: str, peak: int | None = None) -> dict:
    """``{name: peak, name_rss_file: RssFile now, name_anon: peak - RssFile}``: the RSS high-water mark (``peak``, or
    VmHWM now) beside its anonymous part. Call it at the end of the measured span: file-backed pages (a mapped
    checkpoint) stay resident from where they were touched, so ``VmHWM - RssFile`` estimates the anonymous peak, the
    figure to compare between loaders that map the checkpoint (transformers + bnb) and loaders that read it (ours)."""
    st = _proc_status("VmHWM", "RssFile")
    peak = st["VmHWM"] if peak is None else peak
    out = {name: peak, f"{name}_rss_file": st["RssFile"]}
    if peak is not None and st["RssFile"] is not None:
        out[f"{name}_anon"] = peak - st["RssFile"]
    return out


def anon_or_plain(row: dict, name: str) -> tuple[int | None, bool]:
    """``row[name + "_anon"]`` and True where the row has it, else ``row[name]`` and False (rows from before
    RssFile was recorded: their peak includes mapped files)."""
    if row.get(f"{name}_anon") is not None:
        return row[f"{name}_anon"], True
    return row.get(name), False
