"""How much memory this process holds: resident set size and its high-water mark (CPU), peak allocated
bytes (CUDA). Used by launch/finetune.py to set its measured peak beside the planner's prediction, and
by bench/."""
from __future__ import annotations

import resource

import torch


def _status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss() -> int:
    """Current resident set size in bytes (ru_maxrss where /proc is missing)."""
    return _status("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss() -> int:
    """RSS high-water mark since the last reset_peak (or process start): VmHWM, else ru_maxrss."""
    return _status("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak() -> bool:
    """Reset the RSS high-water mark (Linux: clear_refs 5) and CUDA's peak statistics."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cuda_peak() -> int | None:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


def device_peak(device: torch.device | str) -> int:
    """The peak the planner predicts for ``device``: CUDA max allocated, else the process's RSS peak."""
    return torch.cuda.max_memory_allocated(device) if torch.device(device).type == "cuda" else peak_rss()


def this_peak() -> int:
    """``device_peak`` of the device this process trains on (the GPU where there is one)."""
    return device_peak("cuda" if torch.cuda.is_available() else "cpu")
