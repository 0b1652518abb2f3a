"""A small single-process LoRA training loop shared by ``bench train`` and ``bench quality``.

One model (SmolLM2-135M, or a tiny Llama for ``--quick``), one method variant, a step budget →
losses, tokens/s, peak memory and a held-out loss. Methods:

- ``ours-nf4dq`` / ``ours-fp4``: ``qlora_ds.from_pretrained`` with a QLoRAConfig (NF4 + double quant;
  FP4 without double quant, as the paper's "FP4" row);
- ``ours-qalora{2,3,4}``: ``from_pretrained`` with a QALoRAConfig (INT-N, group 32);
- ``bnb-peft``: transformers ``BitsAndBytesConfig`` NF4 + DQ + PEFT LoRA (what users pick instead);
- ``bf16-peft``: PEFT LoRA on the 16-bit model (the name is historical: its base is loaded in the
  compute dtype, so in fp32 on a CPU without native bf16).

All use the same r, α, LoRA dropout (``build(dropout=...)``, 0 unless asked), LoRA on every linear layer but the LM head, non-reentrant
gradient checkpointing, the same optimizer, max grad norm 0.3 and compute dtype (``build(dtype=...)``;
``observed_compute_dtype`` reads back the one a built model really uses). Device: CUDA when available.
"""
from __future__ import annotations

import math
import os
import sys
import time

import torch

from qlora_ds.memstats import cuda_peak, peak_rss, reset_peak, rss  # noqa: F401  (bench's workers use tl.rss …)
from qlora_ds.packaged import chatterbot_pairs, default_model_dir, export_smollm2

IGNORE = -100
METHODS = ("ours-nf4dq", "ours-fp4", "ours-qalora4", "ours-qalora3", "ours-qalora2", "bnb-peft", "bf16-peft")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ------------------------------------------------------------------------------------------- models
def tokenizer_source() -> str:
    """A directory with SmolLM2's tokenizer: the exported checkpoint if present, else the GGUF's folder."""
    d = default_model_dir()
    if os.path.exists(os.path.join(d, "tokenizer.json")):
        return d
    from qlora_ds.packaged import smollm2_gguf_path
    return smollm2_gguf_path()


def load_tokenizer(path: str):
    from transformers import AutoTokenizer
    if path.endswith(".gguf"):
        return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    return AutoTokenizer.from_pretrained(path)


def tiny_checkpoint(folder: str, hidden: int = 64, layers: int = 2, seed: int = 0) -> str:
    """A random tiny Llama (SmolLM2's tokenizer and chat template) as a bf16 safetensors checkpoint."""
    if os.path.exists(os.path.join(folder, "model.safetensors")):
        return folder
    from transformers import LlamaConfig, LlamaForCausalLM
    tok = load_tokenizer(tokenizer_source())
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


# Random-weight shapes for machines without the packaged model/tokenizer (the lent GPU box): the batches are random
# token ids anyway, so a step's time and memory need only the shape. "llama-1b" is TinyLlama-1.1B's layout.
RANDOM_SHAPES = {"tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, vocab_size=512),
                 "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                      num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                      tie_word_embeddings=True),
                 "llama-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                  num_attention_heads=32, num_key_value_heads=4, vocab_size=32000)}


def random_checkpoint(folder: str, shape: str, seed: int = 0) -> str:
    """A LlamaForCausalLM of ``shape`` (RANDOM_SHAPES) with random bf16 weights as safetensors; no tokenizer."""
    if shape not in RANDOM_SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(RANDOM_SHAPES)}")
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(max_position_embeddings=2048, **{"tie_word_embeddings": False, **RANDOM_SHAPES[shape]})
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):    # random init is 10x faster there
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()            # the variants run in their own processes: give the memory back
    return folder


def model_path(quick: bool, tmp: str | None = None, given: str | None = None) -> str:
    if given:
        return given
    if quick:
        return tiny_checkpoint(os.path.join(tmp or os.path.join(os.path.expanduser("~"), ".cache", "qlora_ds"),
                                            "bench-tiny-llama"))
    return export_smollm2(default_model_dir())


def _enable_ckpt(model) -> None:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def build(method: str, path: str, r: int = 16, alpha: float = 16, grad_ckpt: bool = True,
          device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16, dropout: float = 0.0,
          quantize_experts: bool = True, lora_experts: bool = False):
    """(model in train mode on ``device``, its trainable parameters) for one method variant computing in ``dtype``
    (the quantized layers' compute dtype and the dtype of everything left unquantized). ``quantize_experts``: ours
    with NF4 + DQ stores a MoE model's fused experts in 4 bit (bnb + PEFT leaves them in 16 bit). ``lora_experts``:
    LoRA on those fused experts too (ours: ``QLoRAConfig.lora_experts``; PEFT: ``target_parameters``)."""
    device = torch.device(device)
    if method.startswith("ours-"):
        from qlora_ds.inject import from_pretrained
        from qlora_ds.nn import QALoRAConfig, QLoRAConfig
        kind = method[len("ours-"):]
        if kind == "nf4dq":
            cfg = QLoRAConfig(quant_type="nf4", double_quant=True, r=r, alpha=alpha, dropout=dropout, compute_dtype=dtype,
                              quantize_experts=quantize_experts, lora_experts=lora_experts)
        elif kind == "fp4":
            cfg = QLoRAConfig(quant_type="fp4", double_quant=False, r=r, alpha=alpha, dropout=dropout, compute_dtype=dtype)
        elif kind.startswith("qalora"):
            cfg = QALoRAConfig(bits=int(kind[len("qalora"):]), group_size=32, r=r, alpha=alpha, dropout=dropout,
                               compute_dtype=dtype)
        else:
            raise ValueError(f"unknown method {method!r}")
        model = from_pretrained(path, cfg, torch_dtype=dtype).to(device)
    elif method in ("bnb-peft", "bf16-peft"):
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM
        kw = {"dtype": dtype}
        if method == "bnb-peft":
            from transformers import BitsAndBytesConfig
            kw["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype)
            kw["device_map"] = {"": device.index or 0} if device.type == "cuda" else "cpu"
        base = AutoModelForCausalLM.from_pretrained(path, **kw)
        if method == "bf16-peft":
            base = base.to(device)
        for p in base.parameters():
            p.requires_grad_(False)
        if grad_ckpt:
            _enable_ckpt(base)
        fused = sorted({n for n, p in base.named_parameters() if p.dim() == 3 and ".experts." in n}) if lora_experts \
            else None
        model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                                                target_modules=LORA_TARGETS, task_type="CAUSAL_LM",
                                                target_parameters=fused))
        grad_ckpt = False   # already on the base model
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    if grad_ckpt:
        _enable_ckpt(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params


def observed_compute_dtype(model) -> torch.dtype | None:
    """The dtype a built model's LoRA-wrapped linears really compute in: the ``compute_dtype`` of our quantized
    layers and of bitsandbytes' ``Linear4bit``, else the frozen weight dtype of the first target linear (PEFT on
    a dense model). None when there is no such layer."""
    for m in model.modules():
        cd = getattr(m, "compute_dtype", None)
        if isinstance(cd, torch.dtype):
            return cd
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LORA_TARGETS + ["base_layer"]:
            return m.weight.dtype
    return None


def make_optimizer(params, lr: float, which: str = "torch"):
    """(optimizer, its name): ``paged`` → qlora_ds.optim.PagedAdamW (32-bit), falling back to torch AdamW."""
    kw = dict(lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    if which == "paged":
        try:
            from qlora_ds.optim import PagedAdamW
            return PagedAdamW(params, **kw), "qlora_ds.PagedAdamW"
        except Exception as err:   # being finished elsewhere; say so and use torch's
            print(f"PagedAdamW unavailable ({type(err).__name__}: {err}); using torch.optim.AdamW", file=sys.stderr)
    return torch.optim.AdamW(params, **kw), "torch.AdamW"


# --------------------------------------------------------------------------------------------- data
def chat_examples(tokenizer, seq_len: int, n_heldout: int, limit: int | None = None):
    """(train, held-out) tokenized chatterbot pairs (response-only labels); the split is fixed (seed
    1234) and independent of the training seed, so every variant sees the same held-out set."""
    from qlora_ds.data import tokenize_records
    pairs = chatterbot_pairs()
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(1234)).tolist()
    if limit:
        order = order[:limit]
    records = [{"messages": [{"role": "user", "content": pairs[i]["instruction"]},
                             {"role": "assistant", "content": pairs[i]["response"]}]} for i in order]
    examples = tokenize_records(records, tokenizer, max_len=seq_len)
    return examples[n_heldout:], examples[:n_heldout]


def batches(examples, batch_size: int, seed: int, pad_id: int):
    """An endless iterator of collated group-by-length batches (the recipe's sampler)."""
    from qlora_ds.data import GroupByLengthBatches, collate
    sampler = GroupByLengthBatches([e["input_ids"].numel() for e in examples], batch_size, seed=seed)
    epoch = 0
    while True:
        for idx in sampler.epoch(epoch):
            yield collate([examples[i] for i in idx], pad_id)
        epoch += 1


def random_batch(vocab: int, batch: int, seq: int, seed: int = 0) -> dict:
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


# ------------------------------------------------------------------------------------------ loops
def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def train_step(model, params, opt, batch: dict, max_grad_norm: float = 0.3) -> float:
    loss = model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def train(model, params, opt, batch_iter, steps: int, device, max_grad_norm: float = 0.3) -> dict:
    """Run ``steps`` optimizer steps; losses, per-step seconds and label tokens (response tokens)."""
    losses, times, tokens = [], [], 0
    for _ in range(steps):
        batch = _to(next(batch_iter), device)
        _sync(device)
        t0 = time.perf_counter()
        losses.append(train_step(model, params, opt, batch, max_grad_norm))
        _sync(device)
        times.append(time.perf_counter() - t0)
        tokens += int(batch["attention_mask"].sum())
        if not math.isfinite(losses[-1]):
            raise RuntimeError(f"loss became {losses[-1]} at step {len(losses)}")
    return {"losses": losses, "step_s": times, "tokens": tokens}


@torch.no_grad()
def heldout_loss(model, examples, batch_size: int, pad_id: int, device) -> float:
    """Mean cross-entropy per response token over ``examples`` (token-weighted, eval mode)."""
    from qlora_ds.data import collate
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for s in range(0, len(examples), batch_size):
        b = _to(collate(examples[s:s + batch_size], pad_id), device)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
        labels = b["labels"][:, 1:]
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                               ignore_index=IGNORE, reduction="sum")
        total += ce.item()
        count += int((labels != IGNORE).sum())
    model.train(was_training)
    return total / max(count, 1)
