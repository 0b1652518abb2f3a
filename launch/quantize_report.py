"""Quantize every linear weight of a real packaged model (SmolLM2-135M) and report size and error.

    python launch/quantize_report.py [--quant-type nf4|fp4] [--no-double-quant] [--blocksize 64]
"""
from __future__ import annotations

import argparse
import logging
import time

import torch

from qlora_ds import ops
from qlora_ds.packaged import iter_gguf_linear_weights, smollm2_gguf_path
from qlora_ds.quant import bits_per_param, dequantize, quantize

log = logging.getLogger("quantize_report")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4"])
    p.add_argument("--blocksize", type=int, default=64)
    p.add_argument("--no-double-quant", dest="double_quant", action="store_false")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = smollm2_gguf_path()
    log.info("model: %s  backend: %s", path, ops.backend("cpu"))
    n_params = stored = 0
    sq_err = sq_ref = 0.0
    start = time.perf_counter()
    for name, weight in iter_gguf_linear_weights(path):
        w = weight.to(torch.bfloat16)
        qt = quantize(w, args.quant_type, args.blocksize, args.double_quant)
        err = dequantize(qt, torch.float32) - w.float()
        n_params += w.numel()
        stored += qt.storage_bytes()
        sq_err += err.pow(2).sum().item()
        sq_ref += w.float().pow(2).sum().item()
    seconds = time.perf_counter() - start
    log.info("linear weights: %.1f M params, bf16 %.1f MB -> %s%s %.1f MB (%.3f bits/param)",
             n_params / 1e6, 2 * n_params / 1e6, args.quant_type, "+DQ" if args.double_quant else "",
             stored / 1e6, 8 * stored / n_params)
    log.info("relative RMS reconstruction error: %.4f   time: %.1f s", (sq_err / sq_ref) ** 0.5, seconds)


if __name__ == "__main__":
    main()
