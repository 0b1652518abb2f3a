"""The C heap's share of a long-sequence step: one process, SmolLM2-135M's shape (random weights, ``--layers`` deep),
NF4 + DQ, LoRA r 16, chunked loss, non-reentrant checkpointing, bf16 where native; ``--steps`` steps (2); prints the
RSS high-water mark above the loaded model, the step times and how many decoder layers carry the release hook, after a
first line naming the machine; the JSON line carries the machine fields and commit (``bench.common.machine``).
``tests/test_heap.py`` runs it too. Run it twice, with ``QLORA_DS_HEAP_RELEASE=0`` and
without (bench/RESULTS.md, "Heap release"):

    python bench/scripts/heap_ab.py --seq 2048 --layers 30
    QLORA_DS_HEAP_RELEASE=0 python bench/scripts/heap_ab.py --seq 2048 --layers 30
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.common import describe_machine, machine  # noqa: E402
from bench.scale import _llama, write_checkpoint  # noqa: E402
from qlora_ds.hardware import resolve_dtype  # noqa: E402
from qlora_ds.heap import HOOK_ATTR, decoder_layers  # noqa: E402
from qlora_ds.inject import from_pretrained  # noqa: E402
from qlora_ds.loss import causal_lm_loss  # noqa: E402
from qlora_ds.memstats import peak_rss, rss  # noqa: E402
from qlora_ds.nn import QLoRAConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--checkpoint", default=None, help="load this checkpoint (written by bench.scale.write_checkpoint)"
                                                       " instead of writing one: the process's heap starts clean")
    args = ap.parse_args()
    print(f"# {describe_machine('cpu')}", flush=True)
    cfg = {k: v for k, v in _llama(576, 1536, args.layers, 9, 3, args.vocab, True, 100000.0).items()
           if not k.startswith("_")}
    dtype = resolve_dtype("auto")
    qcfg = QLoRAConfig(r=16, alpha=16, dropout=0.0, compute_dtype=dtype)
    if args.checkpoint:
        model = from_pretrained(args.checkpoint, qcfg, torch_dtype=dtype)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            path = write_checkpoint(cfg, Path(tmp) / "ckpt")
            model = from_pretrained(str(path), qcfg, torch_dtype=dtype)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, args.vocab, (1, args.seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    loaded = rss()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        causal_lm_loss(model, batch, chunked=True).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(round(time.perf_counter() - t0, 2))
    print(json.dumps({"seq": args.seq, "layers": args.layers, "dtype": str(dtype),
                      "heap_release": os.environ.get("QLORA_DS_HEAP_RELEASE", "1"),
                      "over_loaded_mib": round((peak_rss() - loaded) / 2**20), "step_s": times,
                      "hooked": sum(getattr(m, HOOK_ATTR, None) is not None for m in decoder_layers(model)),
                      **machine("cpu")}))


if __name__ == "__main__":
    main()
