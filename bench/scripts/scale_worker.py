"""One scale measurement in this (fresh) process: load, or load + one LoRA training step.

usage: scale_worker.py {ours|bnb} {load|step} CKPT_DIR OUT_JSON [--dtype fp32] [--seq 256] [--steps 1]

``load``: from_pretrained in the checkpoint's dtype (bf16): wall time, RSS before (after the imports),
the RSS high-water mark of the load, RSS after it and the bytes of the loaded parameters and buffers.
``step``: load in the compute dtype, then ``--steps`` steps (batch 1 x ``--seq`` random tokens, LoRA r 16,
α 16, dropout 0 on all linears, non-reentrant gradient checkpointing, torch AdamW, clip 0.3); the peak is the
RSS high-water mark from after the load to the end of the steps. Beside each RSS figure ``<name>_rss_file`` (the
file-backed part: libraries, and the checkpoint transformers keeps mapped) and ``<name>_anon`` (the figure minus it:
``bench.common.peak_fields``). ``ours``: qlora_ds.from_pretrained;
``bnb``: transformers + BitsAndBytesConfig NF4 + double quant (+ PEFT for the step).
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import transformers  # noqa: F401  (imported before the "before" RSS, as by every user of either path)
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.common import peak_fields  # noqa: E402
from qlora_ds.memstats import reset_peak, rss  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load(impl: str, path: str, dtype: torch.dtype):
    if impl == "ours":
        from qlora_ds.inject import from_pretrained
        from qlora_ds.nn import QLoRAConfig
        return from_pretrained(path, QLoRAConfig(r=16, alpha=16, dropout=0.0, compute_dtype=dtype), torch_dtype=dtype)
    from transformers import BitsAndBytesConfig
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=q, device_map="cpu")


def warm_up(impl: str, path: str) -> None:
    """Imports both paths pay once per process, done before the timed load: the architecture's modeling
    module (transformers imports it lazily) and, for ours, the compiled quantization op."""
    from transformers import AutoConfig
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path, num_hidden_layers=1, hidden_size=64,
                                                                intermediate_size=64, num_attention_heads=2,
                                                                num_key_value_heads=1, vocab_size=64))
    if impl == "ours":
        from qlora_ds.quant.nf4 import quantize
        quantize(torch.zeros(64, 64, dtype=torch.bfloat16))


def prepare_training(impl: str, model):
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if impl == "bnb":
        from peft import LoraConfig, get_peft_model
        for p in model.parameters():
            p.requires_grad_(False)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, bias="none",
                                                 target_modules=TARGETS, task_type="CAUSAL_LM"))
    model.train()
    return model, [p for p in model.parameters() if p.requires_grad]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("impl", choices=("ours", "bnb"))
    ap.add_argument("what", choices=("load", "step"))
    ap.add_argument("ckpt")
    ap.add_argument("out")
    ap.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=1)
    a = ap.parse_args()
    dtype = DTYPES[a.dtype] if a.what == "step" else torch.bfloat16
    if a.impl == "bnb":
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
    res = {"loadavg_1m": round(os.getloadavg()[0], 2), "impl": a.impl, "what": a.what, "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads()}
    t0 = time.perf_counter()
    warm_up(a.impl, a.ckpt)
    res["warmup_s"] = time.perf_counter() - t0
    res.update(peak_fields("rss_before", rss()))
    reset_peak()
    t0 = time.perf_counter()
    model = load(a.impl, a.ckpt, dtype)
    res["load_s"] = time.perf_counter() - t0
    res.update(peak_fields("peak_load"), **peak_fields("rss_after_load", rss()))
    res["model_bytes"] = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    write(a.out, res)                       # the load's figures survive a step that runs past its timeout
    if a.what == "step":
        model, params = prepare_training(a.impl, model)
        res["trainable_params"] = sum(p.numel() for p in params)
        opt = torch.optim.AdamW(params, lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        vocab = model.get_input_embeddings().weight.shape[0]
        ids = torch.randint(0, vocab, (1, a.seq), generator=torch.Generator().manual_seed(0))
        reset_peak()
        res["step_s"], res["loss"] = [], []
        for _ in range(a.steps):
            t0 = time.perf_counter()
            loss = model(input_ids=ids, labels=ids, attention_mask=torch.ones_like(ids)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 0.3)
            opt.step()
            opt.zero_grad(set_to_none=True)
            res["step_s"].append(time.perf_counter() - t0)
            res["loss"].append(loss.item())
            del loss
        res.update(peak_fields("peak_step"))
    res["done"] = True
    write(a.out, res)


def write(path: str, res: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(res, f)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
