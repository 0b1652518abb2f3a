"""One chunked-loss training step of a checkpoint (bf16 compute where native, else fp32), printing as JSON the
RSS high-water mark above the loaded model and the host planner's figure for it. Run in a fresh process: the
high-water mark is the process's. Usage: heap_step.py CHECKPOINT SEQ"""
import json
import sys

import torch

from qlora_ds.hardware import resolve_dtype
from qlora_ds.heap import decoder_layers
from qlora_ds.inject import from_pretrained
from qlora_ds.loss import causal_lm_loss
from qlora_ds.memstats import peak_rss, rss
from qlora_ds.nn import QLoRAConfig
from qlora_ds.plan import host


def main(path: str, seq: int) -> None:
    dtype = resolve_dtype("auto")
    model = from_pretrained(path, QLoRAConfig(r=16, alpha=16, dropout=0.0, compute_dtype=dtype), torch_dtype=dtype)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    loaded = rss()
    causal_lm_loss(model, batch, chunked=True).backward()
    opt.step()
    est = host.estimate_first_step(model.config.to_dict(), {torch.float32: "fp32"}.get(dtype, "bf16"), seq,
                                   chunked_loss=True)
    hooked = sum(1 for m in decoder_layers(model) if getattr(m, "_qlora_ds_heap_release", None) is not None)
    print(json.dumps({"measured": peak_rss() - loaded, "planned": est.over_loaded(), "hooked": hooked}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
