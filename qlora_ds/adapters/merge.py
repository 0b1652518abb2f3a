"""Merge trained adapters into their base, and export the merged model as a checkpoint.

``merge_model(model)`` replaces, in place, every quantized LoRA layer by its merged form:

* ``QLoRALinear``  -> ``nn.Linear`` holding deq(W) + (α/r)·B·A (summed in fp32, one rounding to the
  output dtype) — a transformers ``Conv1D`` (weight (in, out)) where the layer replaced one (GPT-2), so the
  merged model saves and reloads in its own architecture;
* ``QALoRALinear`` -> an adapter-free ``QALoRALinear``: integer codes unchanged, the adapter moved
  exactly into the (float) zero points (design notes §3).

``export_merged(model, out_dir, fmt)`` writes the merged model atomically:

* ``"bf16"``: a plain transformers checkpoint (``save_pretrained``, safetensors, no
  ``quantization_config``); INT-N layers are dequantized to bf16 ``nn.Linear``.
* ``"gptq"`` (QA-LoRA): per quantized linear ``qweight``/``qzeros``/``scales``/``g_idx`` in AutoGPTQ's
  layout (``checkpoint_format`` "gptq": zero-minus-one, int32 words), a ``quantization_config`` in
  config.json and a ``quantize_config.json`` as optimum / auto-gptq / transformers' ``GPTQConfig``
  read them. GPTQ zero points are integers, a merged QA-LoRA layer's are not: the GPTQ tensors carry
  the zeros *rounded* (each weight then moves by at most scale/2, more only where the rounded zero is
  clamped into [1, 2^bits], plus the fp16 rounding of the scale; the export report gives the error), and
  ``qlora_ds_intn.safetensors`` keeps the exact fp32 scales and zeros per layer.
  ``read_gptq_checkpoint(dir, exact=True)`` rebuilds an fp32 HF model from the codes plus those
  exact values (the merged model, bit for bit); ``exact=False`` reads only what a GPTQ loader reads.

Both formats write ``qlora_ds_merge.json`` (format, settings, report); a directory holding it may be
replaced by a later merge if it holds nothing but files an export writes (``export_file``), any other non-empty
directory is refused (a replaced directory loses everything in it).
"""
from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil

import torch
import torch.nn as nn

from ..errors import QLoRADSError
from ..inject.checkpoint import inside
from ..nn import QALoRALinear, QLoRALinear
from ..nn.config import QALoRAConfig, QLoRAConfig
from ..nn.dense import dense_module
from ..nn.quantized_experts import dequantize_experts_module, is_quantized_experts
from ..quant import intn
from ..atomic import atomic_directory
from .peft_format import CONFIG_NAME, SIDE_NAME

log = logging.getLogger(__name__)

MERGE_META = "qlora_ds_merge.json"
EXACT_NAME = "qlora_ds_intn.safetensors"
FORMATS = ("bf16", "gptq")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json", "generation_config.json")
EXPORT_FILES = ("model.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
                "quantize_config.json", EXACT_NAME, MERGE_META, *TOKENIZER_FILES)
_SHARD = re.compile(r"model-\d+-of-\d+\.safetensors")       # save_pretrained's shards of a large model


def export_file(name: str) -> bool:
    """Whether an export may write ``name`` (so a later merge may replace it)."""
    return name in EXPORT_FILES or bool(_SHARD.fullmatch(name))


# ------------------------------------------------------------------------------------------- merge
def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _dequantized_linear(layer: QALoRALinear, dtype: torch.dtype) -> nn.Module:
    return dense_module(layer.dequantized_weight(torch.float32), layer.bias, dtype, _was_conv1d(layer))


def _is_conv1d(module: nn.Module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:     # transformers is optional for plain torch models
        return False
    return isinstance(module, Conv1D)


def _was_conv1d(module: nn.Module) -> bool:
    """Whether the layer replaced a GPT-2 Conv1D (``inject`` records it on the layer)."""
    return bool(getattr(module, "conv1d", False))


def _activation_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's own floating-point parameters (embeddings, norms): the dtype of the
    activations a layer receives. None if every floating-point parameter belongs to a quantized layer."""
    quantized = {id(p) for m in model.modules() if isinstance(m, (QLoRALinear, QALoRALinear)) for p in m.parameters()}
    return next((p.dtype for p in model.parameters() if p.is_floating_point() and id(p) not in quantized), None)


@torch.no_grad()
def merge_model(model: nn.Module, dtype: torch.dtype | None = None,
                offload: torch.device | str | None = None) -> nn.Module:
    """Merge every QLoRALinear / QALoRALinear adapter in place (see module doc) and return ``model``.

    ``dtype``: dtype of the merged ``nn.Linear`` (or ``Conv1D``) of QLoRA layers (default: the dtype of the model's
    other floating-point parameters, i.e. of the activations the layer receives — a quantized layer
    casts its output back to that dtype, a plain ``nn.Linear`` does not — else each layer's compute
    dtype). Each layer is merged and swapped before the next, so peak extra memory is one layer.
    ``offload`` (e.g. "cpu"): each merged layer goes there as soon as it is built, so a model on a GPU never holds
    its merged (16-bit) linears there; None: they stay on the layer's device.
    Raises (leaving that layer and all later ones unmerged) if a merged weight is not finite.
    """
    layers = [(p, m) for p, m in model.named_modules()
              if isinstance(m, QLoRALinear) or (isinstance(m, QALoRALinear) and m.has_adapter)]
    if not layers:
        raise QLoRADSError("the model has no QLoRALinear/QALoRALinear layer with an adapter to merge; load the "
                           "base with qlora_ds.from_pretrained and the adapter with load_adapter first")
    dtype = dtype or _activation_dtype(model)
    for path, layer in layers:
        merged = layer.merge(dtype) if isinstance(layer, QLoRALinear) else layer.merge()
        _set_module(model, path, merged if offload is None else merged.to(offload))
    experts = [m for m in model.modules() if is_quantized_experts(m)]
    for module in experts:      # frozen 4-bit experts: written as they computed, dequantized
        dequantize_experts_module(module, dtype)
        if offload is not None:
            module.to(offload)
    log.info("merged %d adapter layers%s", len(layers),
             f"; {len(experts)} 4-bit MoE experts modules dequantized" if experts else "")
    return model


@torch.no_grad()
def quantize_gptq(model: nn.Module, calibration, paths, bits: int = 4, group_size: int = 32,
                  percdamp: float = 0.01) -> dict:
    """Deploy a merged QLoRA model as INT-N: GPTQ the ``nn.Linear`` layers at ``paths`` (the former
    QLoRALinear layers, merged by ``merge_model``) true-sequentially on ``calibration`` (token id tensors)
    and replace each by an adapter-free ``QALoRALinear`` holding the GPTQ codes/scales/zeros, so that
    ``export_merged(model, out, "gptq")`` and the INT-N kernels take it like a merged QA-LoRA model. Layers
    outside the decoder blocks (a targeted ``lm_head``) stay merged dense layers, as the QA-LoRA export writes
    them (see ``_outside_blocks``)."""
    from ..quant.gptq import gptq_quantize_model

    paths = set(paths)
    bad = [p for p in paths if not isinstance(m := model.get_submodule(p), nn.Linear) and not _is_conv1d(m)]
    if bad:
        raise QLoRADSError(f"{bad[0]} is not a plain nn.Linear/Conv1D; call merge_model first (GPTQ quantizes "
                           f"merged weights)")
    outside = _outside_blocks(sorted(paths))
    if len(outside) == len(paths):
        raise QLoRADSError(f"only layers outside the decoder blocks were given ({outside}); GPTQ loaders quantize "
                           f"block layers only: export with --format bf16")
    if outside:
        kept = str(model.get_submodule(outside[0]).weight.dtype).removeprefix("torch.")
        log.warning("GPTQ: %s kept as merged %s weights (GPTQ loaders quantize only the layers of the decoder "
                    "blocks)", ", ".join(outside), kept)
        paths -= set(outside)
    convs = {p for p in paths if _is_conv1d(model.get_submodule(p))}
    for path in convs:          # GPTQ works on (out, in) nn.Linear weights; each goes back to a Conv1D below
        conv = model.get_submodule(path)
        _set_module(model, path, dense_module(conv.weight.t(), conv.bias, conv.weight.dtype))
    done = {}
    try:
        done = gptq_quantize_model(model, calibration, bits=bits, group_size=group_size, percdamp=percdamp,
                                   select=lambda p, m: p in paths)
        for path, qt in done.items():
            lin = model.get_submodule(path)
            cfg = QALoRAConfig(bits=bits, group_size=group_size, r=1, dropout=0.0, compute_dtype=lin.weight.dtype)
            new = QALoRALinear.from_quantized(qt, lin.bias, cfg, adapter=False)
            new.conv1d = path in convs
            _set_module(model, path, new)
    finally:
        for path in convs - set(done):      # not quantized (an error): back to the model's own Conv1D
            lin = model.get_submodule(path)
            _set_module(model, path, dense_module(lin.weight, lin.bias, lin.weight.dtype, conv1d=True))
    log.info("GPTQ INT%d group %d: %d layers", bits, group_size, len(done))
    return {"gptq_bits": bits, "gptq_group_size": group_size, "gptq_percdamp": percdamp, "gptq_layers": len(done),
            "gptq_dense_layers": outside, "gptq_calibration_samples": len(calibration)}


# ------------------------------------------------------------------------------------ adapter config
def adapter_config_from_dir(directory: str, compute_dtype: torch.dtype = torch.bfloat16, fallback: dict | None = None):
    """The QLoRAConfig / QALoRAConfig an adapter was trained with, from its ``qlora_ds.json`` side file
    (per-layer kind, quant settings) and ``adapter_config.json`` (r, α, target modules). Layers are built at the
    file's ``r``; ``load_adapter`` rebuilds those its ``rank_pattern`` gives another rank.

    ``fallback`` (e.g. a run's ``run_config.json`` values: method, quant_type, double_quant, bits,
    group_size) is used for what a plain PEFT adapter without our side file does not say.
    """
    fallback = dict(fallback or {})
    try:
        with open(os.path.join(directory, CONFIG_NAME)) as f:
            peft_cfg = json.load(f)
    except (OSError, ValueError) as err:
        raise QLoRADSError(f"cannot read {os.path.join(directory, CONFIG_NAME)} ({err}); pass the directory of a "
                           f"PEFT-format adapter (a run's <out>/adapter)") from None
    side = {}
    side_path = os.path.join(directory, SIDE_NAME)
    if os.path.exists(side_path):
        with open(side_path) as f:
            side = json.load(f)
    infos = [i for i in side.get("layers", {}).values() if i.get("kind") != "qlora_experts"]   # experts: below
    kinds = {i.get("kind") for i in infos}
    if len(kinds) > 1:
        raise QLoRADSError(f"adapter {directory} mixes layer kinds {sorted(kinds)}; merge supports one kind per model")
    kind = kinds.pop() if kinds else ("qalora" if peft_cfg.get("use_qalora") else fallback.get("method"))
    if kind not in ("qlora", "qalora"):
        raise QLoRADSError(f"adapter {directory} has no {SIDE_NAME} saying how its base was quantized; pass "
                           f"--method qlora|qalora (and the quantization settings it was trained with)")
    first = infos[0] if infos else {}
    target = peft_cfg.get("target_modules")
    common = dict(r=int(peft_cfg.get("r", fallback.get("lora_r", 64))),
                  alpha=float(peft_cfg.get("lora_alpha", fallback.get("lora_alpha", 16))), dropout=0.0,
                  target_modules=tuple(target) if isinstance(target, list) and target else
                  (target if isinstance(target, str) else None), compute_dtype=compute_dtype)

    def pick(key, default):     # run_config.json stores unset options as null: a None falls through too
        value = first.get(key)
        value = fallback.get(key) if value is None else value
        return default if value is None else value

    if kind == "qalora":
        # files written before ``pool`` existed were trained with the mean; a plain PEFT file loads exactly
        # into either pool (see peft_format), so "mean" is only a choice of training dynamics there.
        # A plain PEFT QA-LoRA file states its group size (it has no field for the bits): it beats the fallback
        group = first.get("group_size") or (peft_cfg.get("qalora_group_size") if peft_cfg.get("use_qalora") else None)
        if pick("bits", None) is None:
            log.warning("adapter %s does not say how many bits its QA-LoRA base had (PEFT files have no field for "
                        "it): assuming 4; pass --bits if it was trained with 2 or 3", directory)
        return QALoRAConfig(bits=int(pick("bits", 4)), group_size=int(group or pick("group_size", 32)),
                            pool=str(pick("pool", "mean")), **common)
    # 4-bit MoE experts: recorded by qlora-ds since they exist; older files and plain PEFT ones (bitsandbytes leaves
    # experts in 16 bit) trained on 16-bit experts
    experts = side.get("quantize_experts") if side else fallback.get("quantize_experts")
    lora_experts = bool(peft_cfg.get("target_parameters"))
    if lora_experts and not experts:
        raise QLoRADSError(f"adapter {directory} has LoRA on MoE experts (target_parameters) trained on 16-bit experts "
                           f"(a plain PEFT file); qlora-ds adapts 4-bit experts only: pass --quantize-experts if they "
                           f"were 4-bit in training, else merge this adapter with PEFT")
    return QLoRAConfig(quant_type=pick("quant_type", "nf4"), blocksize=int(pick("blocksize", 64)),
                       double_quant=bool(pick("double_quant", True)), quantize_experts=bool(experts),
                       lora_experts=lora_experts, **common)


# ------------------------------------------------------------------------------------------- export
def check_out_dir(out_dir: str) -> tuple[str, ...]:
    """Refuse a non-empty directory that is not a previous merge, or a previous merge holding files no export writes
    (a README, evaluation results, a later run: replacing the directory would delete them). Returns the entries a
    new export may replace (``atomic_directory``'s ``allowed_existing``)."""
    if not os.path.exists(out_dir):
        return ()
    if not os.path.isdir(out_dir):
        raise QLoRADSError(f"{out_dir} exists and is not a directory; choose another --out")
    entries = sorted(os.listdir(out_dir))
    if entries and MERGE_META not in entries:
        raise QLoRADSError(f"{out_dir} is not empty and is not a previous merge (no {MERGE_META}); choose an "
                           f"empty or new --out directory")
    extra = [e for e in entries if not export_file(e)]
    if extra:
        raise QLoRADSError(f"{out_dir} is a previous merge but also holds {extra[:8]}, which a merge does not write "
                           f"and replacing the directory would delete; move them out of {out_dir}, or choose another "
                           f"--out")
    return tuple(entries)


def _copy_tokenizer(src: str | None, dst: str) -> list[str]:
    """Copy the tokenizer files of ``src`` into the export ``dst``; a symlink among them must resolve inside ``src``
    (or its Hugging Face cache's blobs): one to /proc/self/environ or the user's files would publish them."""
    copied = []
    if src and os.path.isdir(src):
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(src, name)):
                if not inside(src, name):
                    raise QLoRADSError(f"tokenizer file {os.path.join(src, name)} links outside {src} (to "
                                       f"{os.path.realpath(os.path.join(src, name))}); refusing to copy it into the "
                                       f"export. Replace the link with the file itself, or remove it")
                shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
                copied.append(name)
    return copied


def _clean_config(model: nn.Module):
    cfg = copy.deepcopy(model.config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    if getattr(cfg, "tie_word_embeddings", False) and _untied_head(model):
        cfg.tie_word_embeddings = False     # else loaders tie the merged/quantized LM head back to the embeddings
    return cfg


def _untied_head(model: nn.Module) -> bool:
    """Whether the output embeddings (LM head) no longer share the input embeddings' weight (a merged or
    quantized head)."""
    try:
        inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return False
    return inp is not None and out is not None and getattr(out, "weight", None) is not inp.weight


def export_merged(model: nn.Module, out_dir: str, fmt: str = "bf16", tokenizer_dir: str | None = None,
                  dtype: torch.dtype = torch.bfloat16, meta: dict | None = None,
                  offload: torch.device | str | None = None) -> dict:
    """Write a merged model (see module doc) to ``out_dir`` atomically; returns the export report.

    ``dtype``: the dtype of the written weights for "bf16" (default bf16) and of the non-quantized
    tensors (embeddings, norms, LM head) for "gptq". ``tokenizer_dir``: tokenizer files to copy
    (normally the base model's directory). "bf16" casts ``model`` in place; ``offload``: where its dequantized
    INT-N layers are built (None: on their own device). "gptq" moves each tensor it writes to the CPU as it is
    built (the device never holds a second copy of the model).
    """
    if fmt not in FORMATS:
        raise QLoRADSError(f"format {fmt!r} is not supported; use one of {FORMATS}")
    left = [p for p, m in model.named_modules() if isinstance(m, QLoRALinear)
            or (isinstance(m, QALoRALinear) and m.has_adapter and bool(m.lora_B.weight.any()))]
    if left:
        raise QLoRADSError(f"{len(left)} layers still carry an adapter (first {left[0]}); call merge_model first")
    replaceable = check_out_dir(out_dir)
    if fmt == "gptq":
        return _export_gptq(model, out_dir, tokenizer_dir, dtype, meta or {}, replaceable)
    for path, m in list(model.named_modules()):
        if isinstance(m, QALoRALinear):
            dense = _dequantized_linear(m, dtype)
            _set_module(model, path, dense if offload is None else dense.to(offload))
    model.to(dtype)
    cfg = _clean_config(model)
    cfg.dtype = dtype
    model.config = cfg
    report = {"format": "bf16" if dtype == torch.bfloat16 else str(dtype).removeprefix("torch."), **(meta or {})}
    with atomic_directory(out_dir, allowed_existing=replaceable) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        report["tokenizer_files"] = _copy_tokenizer(tokenizer_dir, tmp)
        with open(os.path.join(tmp, MERGE_META), "w") as f:
            json.dump(report, f, indent=2, sort_keys=True)
    return report


def gptq_quantization_config(bits: int, group_size: int, block: str | None, inner: list[str] | None) -> dict:
    """``quantization_config`` as transformers' GPTQConfig / optimum / auto-gptq read it."""
    cfg = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": False, "sym": False,
           "static_groups": False, "true_sequential": True, "damp_percent": 0.01, "checkpoint_format": "gptq",
           "use_exllama": False}
    if block:
        cfg["block_name_to_quantize"] = block
    if inner:
        cfg["modules_in_block_to_quantize"] = [inner]
    return cfg


def _split_block(path: str) -> tuple[str | None, str]:
    """('model.layers', 'self_attn.q_proj') for 'model.layers.3.self_attn.q_proj'; (None, path) outside blocks."""
    parts = path.split(".")
    i = next((k for k in range(len(parts)) if parts[k].isdigit()), None)
    return (None, path) if i is None else (".".join(parts[:i]), ".".join(parts[i + 1:]))


def _outside_blocks(qpaths: list[str]) -> list[str]:
    """The layers not in the model's repeated blocks (``lm_head``): GPTQ loaders (optimum's ``convert_model``, under
    transformers) replace only layers under the block prefix, so such a layer stored as qweight/qzeros would load
    as a missing weight (random, or the embedding when tied)."""
    blocks = [_split_block(p)[0] for p in qpaths]
    main = max(set(blocks) - {None}, key=blocks.count, default=None)
    return [p for p, b in zip(qpaths, blocks) if b != main]


def _block_layout(model: nn.Module, qpaths: list[str]) -> tuple[str | None, list[str] | None]:
    """(block prefix such as 'model.layers', module names inside a block to quantize or None for all)."""
    split = _split_block
    blocks = {split(p)[0] for p in qpaths}
    block = blocks.pop() if len(blocks) == 1 else None
    inner = sorted({split(p)[1] for p in qpaths})
    linear_inner = sorted({split(p)[1] for p, m in model.named_modules() if split(p)[0] == block
                           and (isinstance(m, (nn.Linear, QALoRALinear, QLoRALinear)) or _is_conv1d(m))})
    return block, (None if inner == linear_inner else inner)


def _export_gptq(model, out_dir, tokenizer_dir, dtype, meta, replaceable) -> dict:
    from safetensors.torch import save_file

    qlayers = {p: m for p, m in model.named_modules() if isinstance(m, QALoRALinear)}
    if not qlayers:
        raise QLoRADSError("GPTQ export needs QA-LoRA (INT-N) layers; this model has none — a QLoRA (NF4) model "
                           "exports as --format bf16")
    settings = {(m.bits, m.group_size) for m in qlayers.values()}
    if len(settings) > 1:
        raise QLoRADSError(f"layers use several (bits, group_size) {sorted(settings)}; one GPTQ config holds one")
    bits, group_size = settings.pop()
    dense = _outside_blocks(list(qlayers))
    if len(dense) == len(qlayers):
        raise QLoRADSError(f"only layers outside the decoder blocks are INT-N ({dense}); GPTQ loaders quantize block "
                           f"layers only: export with --format bf16")
    for path in dense:      # the merged INT-N values, written 16-bit (see _outside_blocks)
        _set_module(model, path, _dequantized_linear(qlayers.pop(path), dtype))
    if dense:
        log.warning("GPTQ export: %s written as %s weights (dequantized from INT-%d): GPTQ loaders quantize only the "
                    "layers of the decoder blocks", ", ".join(dense), str(dtype).removeprefix("torch."), bits)
    tensors, exact, reports = {}, {}, {}
    prefixes = tuple(p + "." for p in qlayers)
    for path, layer in qlayers.items():
        sd, rep = layer.to_gptq_state_dict(scales_dtype=torch.float16)
        if layer.bias is not None:      # from the layer, not sd's fp16 copy (would lose bits / overflow to inf)
            sd["bias"] = layer.bias.detach().to("cpu", dtype)
        for k, v in sd.items():
            tensors[f"{path}.{k}"] = v.to("cpu").contiguous()
        qt = layer.quantized_weight()
        exact[f"{path}.scales"] = qt.scales.to("cpu", copy=True).contiguous()
        exact[f"{path}.zeros"] = qt.zeros.to("cpu", copy=True).contiguous()
        reports[path] = rep
    for name, p in model.named_parameters():            # tied weights appear once (the first name)
        if not name.startswith(prefixes):
            tensors[name] = p.detach().to("cpu", dtype).contiguous()
    for name, b in model.named_buffers():
        owner, _, leaf = name.rpartition(".")
        mod = model.get_submodule(owner) if owner else model
        if not name.startswith(prefixes) and leaf not in mod._non_persistent_buffers_set:
            tensors[name] = b.detach().cpu().contiguous()
    block, inner = _block_layout(model, list(qlayers))
    qcfg = gptq_quantization_config(bits, group_size, block, inner)
    cfg = _clean_config(model)
    cfg.quantization_config = qcfg
    cfg.dtype = dtype
    report = {
        "format": "gptq", "bits": bits, "group_size": group_size, "layers": len(qlayers), "dense_layers": dense,
        **meta,
        "gptq_max_abs_weight_error": max(r["max_abs_error"] for r in reports.values()),
        "gptq_rel_fro_weight_error": max(r["rel_fro_error"] for r in reports.values()),
        "zeros_rounded": sum(r["zeros_rounded"] for r in reports.values()),
        "zeros_clamped": sum(r["zeros_clamped"] for r in reports.values()),
        "zeros_total": sum(m.quantized_weight().zeros.numel() for m in qlayers.values()),
    }
    with atomic_directory(out_dir, allowed_existing=replaceable) as tmp:
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        save_file(exact, os.path.join(tmp, EXACT_NAME), metadata={"format": "pt"})
        cfg.to_json_file(os.path.join(tmp, "config.json"))
        with open(os.path.join(tmp, "quantize_config.json"), "w") as f:
            json.dump({k: v for k, v in qcfg.items() if k != "use_exllama"}, f, indent=2)
        report["tokenizer_files"] = _copy_tokenizer(tokenizer_dir, tmp)
        with open(os.path.join(tmp, MERGE_META), "w") as f:
            json.dump(report, f, indent=2, sort_keys=True)
    return report


# -------------------------------------------------------------------------------------- GPTQ reader
def _int32_stream(words: torch.Tensor) -> torch.Tensor:
    """int32 words [rows, n] -> their little-endian bytes [rows, 4n] (GPTQ's bit stream)."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.tensor([0, 8, 16, 24], dtype=torch.int64)
    return ((w.unsqueeze(-1) >> shifts) & 0xFF).to(torch.uint8).reshape(words.shape[0], -1)


def decode_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, bits: int,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AutoGPTQ tensors -> (codes uint8 [out, in], integer zeros fp32 [out, groups], scales fp32 [out, groups])."""
    in_f, out_f = qweight.shape[0] * 32 // bits, qweight.shape[1]
    codes = intn.unpack(_int32_stream(qweight.t().contiguous()), bits, in_f)
    zeros = intn.unpack(_int32_stream(qzeros), bits, out_f).t().float() + 1      # zero-minus-one format
    return codes, zeros.contiguous(), scales.float().t().contiguous()


def read_gptq_checkpoint(directory: str, exact: bool = True, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A transformers model (plain ``nn.Linear``) whose quantized linears are dequantized from the
    GPTQ tensors in ``directory`` — our CPU stand-in for a GPTQ kernel. ``exact``: use the fp32
    scales/zeros of ``qlora_ds_intn.safetensors`` with the GPTQ codes (the exact merged model);
    otherwise the GPTQ scales and integer zeros only (what GPTQ loaders compute)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(directory)
    qcfg = getattr(config, "quantization_config", None) or {}
    qcfg = qcfg if isinstance(qcfg, dict) else qcfg.to_dict()
    if qcfg.get("quant_method") != "gptq" or qcfg.get("checkpoint_format", "gptq") != "gptq":
        raise QLoRADSError(f"{directory}/config.json has no GPTQ quantization_config (checkpoint_format 'gptq'); "
                           f"this reader only reads checkpoints written by export_merged(fmt='gptq')")
    if qcfg.get("desc_act"):
        raise QLoRADSError(f"{directory}: desc_act=True (act-order g_idx) is not supported by this reader")
    bits, group_size = int(qcfg["bits"]), int(qcfg["group_size"])
    del config.quantization_config
    sd = load_file(os.path.join(directory, "model.safetensors"))
    extra = {}
    if exact:
        path = os.path.join(directory, EXACT_NAME)
        if not os.path.exists(path):
            raise QLoRADSError(f"{path} is missing; read with exact=False to use the GPTQ tensors alone")
        extra = load_file(path)
    state = {}
    for key, t in sd.items():
        if key.endswith((".qzeros", ".scales", ".g_idx")):
            continue
        if not key.endswith(".qweight"):
            state[key] = t
            continue
        p = key[: -len(".qweight")]
        codes, zeros, scales = decode_gptq(t, sd[f"{p}.qzeros"], sd[f"{p}.scales"], bits)
        g_idx = sd.get(f"{p}.g_idx")
        if g_idx is not None and not torch.equal(g_idx.long(), torch.arange(codes.shape[1]) // group_size):
            raise QLoRADSError(f"{p}.g_idx is not the plain group order; act-order checkpoints are not supported")
        if exact:
            scales, zeros = extra[f"{p}.scales"], extra[f"{p}.zeros"]
        state[f"{p}.weight"] = intn.dequantize_parts(intn.pack(codes, bits), scales, zeros, bits, group_size,
                                                     codes.shape, dtype)
    try:
        from accelerate import init_empty_weights
        ctx = init_empty_weights(include_buffers=False)
    except ImportError:
        ctx = torch.device("meta")
    with ctx:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for key in [k for k in sd if k.endswith(".qweight")]:
        p = key[: -len(".qweight")]
        if _is_conv1d(model.get_submodule(p)):      # GPT-2: same GPTQ tensors, but the float weight is (in, out)
            state[f"{p}.weight"] = state[f"{p}.weight"].t().contiguous()
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise QLoRADSError(f"{directory}: tensors {unexpected[:3]} do not belong to a {config.model_type} model")
    head = model.get_output_embeddings()
    head_name = next((n for n, m in model.named_modules() if m is head), None) if head is not None else None
    if getattr(model.config, "tie_word_embeddings", False) and f"{head_name}.weight" in state:
        model.config.tie_word_embeddings = False     # an export from before tied heads were untied: keep its head
    model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise QLoRADSError(f"{directory} lacks tensors {still_meta[:3]}; the checkpoint is incomplete")
    if os.path.exists(os.path.join(directory, "generation_config.json")):   # e.g. an instruct model's end-of-turn eos
        model.generation_config = GenerationConfig.from_pretrained(directory)
    return model.eval()
