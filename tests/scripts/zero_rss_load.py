"""Measure peak RSS of qlora_ds.inject.from_pretrained (run in a fresh process).

usage: zero_rss_load.py CKPT_DIR WARMUP_DIR → prints one JSON line: baseline and peak RSS (bytes), quantized
bytes, and the checkpoint files still mapped into the process after the load.
Peak is VmHWM after resetting it (/proc/self/clear_refs = 5) just before the call. The baseline is
taken after loading a tiny checkpoint (WARMUP_DIR) once, so that imports (accelerate, transformers'
model code) and the one-time load of the quantization kernels are not counted as the loader's memory.
"""
import json
import sys

import torch

from qlora_ds.inject import from_pretrained, quantized_bytes_on_this_rank
from qlora_ds.memstats import peak_rss, reset_peak, rss
from qlora_ds.nn import QLoRAConfig

cfg = QLoRAConfig(r=8)
warm = from_pretrained(sys.argv[2], cfg, torch_dtype=torch.bfloat16)
del warm
reset_peak()
base = rss()
model = from_pretrained(sys.argv[1], cfg, torch_dtype=torch.bfloat16)
peak = peak_rss()
with open("/proc/self/maps") as f:
    mapped = sorted({line.split()[-1] for line in f if line.rstrip().endswith(".safetensors")})
print(json.dumps({"baseline": base, "peak": peak, "quantized": quantized_bytes_on_this_rank(model)[1],
                  "params": sum(p.numel() * p.element_size() for p in model.parameters()), "mapped": mapped}))
