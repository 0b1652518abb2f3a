"""Streaming quantized loading of Hugging Face checkpoints, and our own pre-quantized format.

``from_pretrained(path, config, ds_config=None, torch_dtype="auto")``: ``torch_dtype`` is the dtype of everything that
is not quantized (embeddings, norms, the LM head, biases) and the layers' compute dtype when the config says "auto";
"auto" for both means the dtype the training device computes best (``qlora_ds.hardware.resolve_dtype``), one choice
for the whole model. ``quantize_from`` (default: ``torch_dtype``) is the dtype 16/32-bit target weights are rounded
to before they are quantized, as transformers + bitsandbytes do with the load dtype: the INT-N/NF4 base of an fp16 or
fp32 checkpoint depends on it, so inference in another dtype passes the one the adapter was trained with.

1. the skeleton is built from ``AutoConfig`` with parameters on the meta device (buffers real);
2. the policy's target linears are replaced by QLoRALinear / QALoRALinear (still meta);
3. every key, shape and quantization setting is checked against the checkpoint *headers* on every
   rank — a bad checkpoint fails here, before any data is read or any training starts;
4. module by module, the tensors are read one at a time (plain reads, no memory map), target weights quantized
   on the fly (or taken as stored: bitsandbytes/transformers 4-bit keys, or our own format) and
   assigned; tied parameters stay one object. MoE experts fused as 3-D parameters are read fused or built from
   per-expert tensors as transformers builds them, then quantized (``QLoRAConfig.quantize_experts``):
   ``experts_loading``.

ZeRO-3 (``zero_optimization.stage == 3``): after each module is filled its parameters are handed to
``deepspeed.zero.Init(module=…)``, which broadcasts them from rank 0 and keeps 1/N per rank. Only
rank 0 reads and quantizes; the other ranks allocate the (known) shapes empty and receive the bytes.
So per rank the peak is one module's tensors plus 1/N of the model, the checkpoint's data is read once in all
(by global rank 0; every rank reads the headers, so every node needs the files), and quantization is not
repeated. (The alternatives: every rank quantizes and copies its own slice — no traffic, but N× the
quantization work and a dependence on ZeRO's private partition layout; ``GatheredParameters(modifier_rank=0)``
per module — an all-gather plus a broadcast each.)
ZeRO 0/1/2: every rank loads the whole 4-bit model; with ``device`` (finetune passes the rank's GPU) each module
goes there as soon as it is filled, so host memory holds one module, not the model (65B: ~33 GiB otherwise).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from typing import Callable

import torch
import torch.nn as nn

from ..ds_config import read_ds_config
from ..errors import QLoRADSError
from ..hardware import ds_compute_dtype, resolve_dtype
from ..heap import install_heap_release, release_free_heap
from ..nn.config import AUTO, QALoRAConfig, QLoRAConfig
from .checkpoint import BNB_STATE, DTYPES, Checkpoint
from .experts_loading import (ExpertSources, fill_quantized_experts, filled_leaves, plan_quantized_experts,
                              quantized_experts)
from .policies import Policy
from .replace import inject, is_linear_like, is_lora_name, is_quantized_layer, lora_parameters, quantize_for
from .zero import gathered

log = logging.getLogger(__name__)

QUANT_META_NAME = "qlora_ds_quant.json"
QUANT_FORMAT = "qlora-ds.quantized"
QUANT_VERSION = 1
_SAVED_FILES = ("model.safetensors", "config.json", QUANT_META_NAME)


# ---------------------------------------------------------------------------- config helpers
def zero_stage(ds_config) -> int:
    """ZeRO stage of a ds_config given as a dict, a JSON path, or None (→ 0)."""
    if ds_config is None:
        return 0
    ds_config = read_ds_config(ds_config)
    return int((ds_config.get("zero_optimization") or {}).get("stage", 0))


def quant_settings(config) -> dict:
    if isinstance(config, QLoRAConfig):
        return {"layer": "qlora", "quant_type": config.quant_type, "blocksize": config.blocksize,
                "double_quant": config.double_quant, "nested_blocksize": config.nested_blocksize}
    if isinstance(config, QALoRAConfig):
        return {"layer": "qalora", "bits": config.bits, "group_size": config.group_size}
    raise QLoRADSError(f"config must be a QLoRAConfig or QALoRAConfig, got {type(config).__name__}")


def _read_quant_meta(path: str, config) -> dict | None:
    meta_path = os.path.join(path, QUANT_META_NAME)
    if not os.path.isfile(meta_path):
        return None
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as err:
        raise QLoRADSError(f"{meta_path} does not parse ({err}); re-save the model with qlora_ds.save_quantized") \
            from None
    if meta.get("format") != QUANT_FORMAT:
        raise QLoRADSError(f"{meta_path}: format {meta.get('format')!r} is not {QUANT_FORMAT!r}; remove the file "
                           f"or re-save with qlora_ds.save_quantized")
    if meta.get("version") != QUANT_VERSION:
        raise QLoRADSError(f"{meta_path}: quantized-checkpoint version {meta.get('version')!r} is not supported by "
                           f"this qlora-ds (reads version {QUANT_VERSION}); re-save it with this version's "
                           f"save_quantized or load the original 16-bit checkpoint")
    want = quant_settings(config)
    diff = {k: (meta.get(k), v) for k, v in want.items() if meta.get(k) != v}
    if diff:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
        raise QLoRADSError(f"quantized checkpoint {path!r} disagrees with the config ({detail}); pass a config "
                           f"with the checkpoint's settings or quantize the original 16-bit checkpoint again")
    return meta


def _skeleton(hf_config, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM
    try:
        from accelerate import init_empty_weights
        ctx = init_empty_weights(include_buffers=False)   # parameters on meta, buffers (rotary…) real
    except ImportError:
        ctx = torch.device("meta")
    try:   # under a Trainer's ZeRO-3 config transformers would enter zero.Init itself (on meta: it fails); we do
        from transformers.modeling_utils import set_zero3_state as ours_partitions
    except ImportError:
        ours_partitions = contextlib.nullcontext
    with ctx, ours_partitions():
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    if hasattr(model, "tie_weights"):
        model.tie_weights()                         # on meta, transformers 5 leaves tied weights untied
    return model


def _renamer(model: nn.Module) -> Callable[[str], str]:
    """Checkpoint key -> module name, as transformers 5 loads: the key renamings of its conversion mapping,
    then the base-model prefix added to keys saved from the bare base model (the hub's gpt2 and bloom files hold
    ``h.0.…`` and ``wte.weight``, not ``transformer.h.0.…``). A key goes under the prefix when its first name is a
    submodule of the base model and not of the whole model, so ``lm_head.*`` stays as it is. A key that starts with
    the prefix loses it when only the rest names a tensor of the model (Llama4ForCausalLM, prefix
    ``language_model``, reads the multimodal model's ``language_model.model.…`` and
    ``language_model.lm_head.…``)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
        # subclasses included: Qwen3.5's PrefixChange takes the hub files' "model.language_model." to "model."
        renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)
                     and getattr(t, "scope_prefix", None) is None and hasattr(t, "rename_source_key")]
    except Exception:                               # older/newer transformers: names are taken as they are
        renamings = []
    prefix = getattr(model, "base_model_prefix", "") or ""
    base = getattr(model, prefix, None) if prefix else None
    inner = (set(dict(base.named_children())) - set(dict(model.named_children()))
             if isinstance(base, nn.Module) and base is not model else set())
    names = set(model.state_dict(keep_vars=True)) if prefix else set()

    def rename(key: str) -> str:
        for t in renamings:                         # transformers' own matching (name boundaries, groups)
            key = t.rename_source_key(key)[0]
        # saved by a model that holds this one under the prefix (Llama-4's hub files: language_model.model.…)
        if key.startswith(f"{prefix}.") and key not in names and key[len(prefix) + 1:] in names:
            return key[len(prefix) + 1:]
        return f"{prefix}.{key}" if key.split(".", 1)[0] in inner else key
    return rename


# ---------------------------------------------------------------------------- validation (headers only)
def _alias_groups(model: nn.Module) -> dict[int, list[str]]:
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return groups


def _bnb_meta(ckpt: Checkpoint, key: str) -> tuple[str, dict]:
    state = [k for k in ckpt.keys() if k.startswith(f"{key}{BNB_STATE}")]
    if len(state) != 1:
        return "", {}
    raw = ckpt.get(state[0])
    try:
        return state[0], json.loads(bytes(raw.to(torch.uint8).tolist()).decode())
    except (UnicodeDecodeError, ValueError) as err:
        raise QLoRADSError(f"{state[0]}: bitsandbytes quant_state JSON does not parse ({err}); the checkpoint is "
                           f"corrupt — re-export it") from None


def _plan_layer(ckpt: Checkpoint, path: str, layer: nn.Module, conv1d: bool, config, own: dict | None,
                key: str) -> str:
    """How the layer at ``path`` (its weight read from ``key``) is filled: 'own' | 'bnb' | 'float'; raises on
    anything inconsistent."""
    out_f, in_f = tuple(layer.weight_shape)
    if own is not None:
        for name, p in layer.named_parameters(recurse=False):
            k = f"{path}.{name}"
            if k not in ckpt:
                raise QLoRADSError(f"quantized checkpoint lacks {k!r}; it was saved from a model with other "
                                   f"target modules — use the same target_modules as when it was saved")
            if ckpt.shape[k] != tuple(p.shape):
                raise QLoRADSError(f"{k}: checkpoint shape {ckpt.shape[k]} but the model built from config.json "
                                   f"expects {tuple(p.shape)}; the config and the weights do not belong together")
        return "own"
    if key not in ckpt:
        raise QLoRADSError(f"checkpoint lacks {key!r} for target layer {path}; the checkpoint does not match its "
                           f"config.json (wrong model type or a partial save)")
    state_key, meta = _bnb_meta(ckpt, key)
    if state_key:
        if not isinstance(config, QLoRAConfig):
            raise QLoRADSError(f"{key} is stored 4-bit by bitsandbytes; QA-LoRA needs INT-N weights — load the "
                               f"16-bit checkpoint instead, or use a QLoRAConfig")
        got = (meta.get("quant_type"), meta.get("blocksize"), f"{key}.nested_absmax" in ckpt)
        want = (config.quant_type, config.blocksize, config.double_quant)
        if got != want:
            raise QLoRADSError(f"{key}: checkpoint is quantized with (quant_type, blocksize, double_quant)={got} but "
                               f"the config says {want}; pass QLoRAConfig(quant_type={got[0]!r}, blocksize={got[1]}, "
                               f"double_quant={got[2]}) or load the original 16-bit checkpoint")
        if tuple(meta.get("shape", ())) != (out_f, in_f):
            raise QLoRADSError(f"{key}: checkpoint weight shape {tuple(meta.get('shape', ()))} but the model built "
                               f"from config.json expects {(out_f, in_f)}; the config and the weights do not match")
        return "bnb"
    stored = ckpt.dtype_name(key)
    if not getattr(DTYPES.get(stored), "is_floating_point", False):
        raise QLoRADSError(f"{key} is stored as {stored}, not as a 16/32-bit weight: the checkpoint holds another "
                           f"format's quantized codes (e.g. bitsandbytes 8-bit), which qlora-ds does not read; pass "
                           f"the original 16/32-bit checkpoint (or a bitsandbytes 4-bit one)")
    want = (in_f, out_f) if conv1d else (out_f, in_f)
    if ckpt.shape[key] != want:
        raise QLoRADSError(f"{key}: checkpoint shape {ckpt.shape[key]} but the model built from config.json expects "
                           f"{want}; the config and the weights do not belong together")
    if layer.bias is not None and ckpt.shape.get(f"{path}.bias") != (out_f,):
        raise QLoRADSError(f"{path}.bias: checkpoint has {ckpt.shape.get(f'{path}.bias')}, expected {(out_f,)}")
    return "float"


def _plan(model, ckpt, paths, conv1d, config, own, weight_key):
    """(how each target layer is filled, {id(param): checkpoint key or Converted} for the other parameters,
    {experts path: {weight: source}} for the quantized experts), all checked from the headers."""
    layers = {p: model.get_submodule(p) for p in paths}
    how = {p: _plan_layer(ckpt, p, layer, p in conv1d, config, own, weight_key[p]) for p, layer in layers.items()}
    if own is not None and sorted(own.get("modules", [])) != sorted(paths):
        raise QLoRADSError(f"quantized checkpoint was saved with {len(own.get('modules', []))} quantized layers but "
                           f"this config targets {len(paths)}; use the target_modules it was saved with")
    sources = ExpertSources(model, ckpt)
    experts = plan_quantized_experts(model, sources, own)
    filled_by_experts = {f"{p}.{leaf}" for p, m in quantized_experts(model).items() for leaf in filled_leaves(m)}
    source: dict[int, object] = {}
    missing = []
    prefixes = tuple(p + "." for p in paths)
    for pid, names in _alias_groups(model).items():
        names = [n for n in names if not n.startswith(prefixes) and n not in filled_by_experts]
        if not names:
            continue
        key = next((n for n in names if n in ckpt), None)
        param = model.get_parameter(names[0])
        if key is None and param.dim() == 3 and param.is_floating_point():   # 16-bit fused experts: per expert
            source[pid] = sources.source(names[0], tuple(param.shape))
            continue
        if key is None:
            missing.append(names[0])
            continue
        if ckpt.shape[key] != tuple(param.shape):
            raise QLoRADSError(f"{key}: checkpoint shape {ckpt.shape[key]} but the model built from config.json "
                               f"expects {tuple(param.shape)}; the config and the weights do not belong together")
        source[pid] = key
    if missing:
        raise QLoRADSError(f"checkpoint {ckpt.path!r} lacks {len(missing)} tensor(s), first {missing[:3]}; it is "
                           f"incomplete or from another model — re-save it with save_pretrained")
    bnb_stray = sorted({k.split(BNB_STATE)[0] for k in ckpt.keys() if BNB_STATE in k}
                       - {f"{p}.weight" for p in paths})
    if bnb_stray:
        raise QLoRADSError(f"checkpoint has 4-bit weights for {bnb_stray[:3]} which this config leaves in 16 bit; "
                           f"add them to target_modules or load the 16-bit checkpoint")
    return how, source, experts


# ---------------------------------------------------------------------------- filling
def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


def _fill_layer(layer, path, how, ckpt, conv1d, config, dtype, read: bool, key: str,
                device: torch.device) -> None:
    """``dtype``: what the float weights are rounded to before quantization (``from_pretrained``'s quantize_from);
    ``key``: the checkpoint key of the layer's float or bnb weight."""
    base = [n for n, p in layer.named_parameters(recurse=False)]
    if not read:                                    # ZeRO-3, rank > 0: shapes only, bytes come by broadcast
        for name in base:
            p = getattr(layer, name)
            setattr(layer, name, _frozen(torch.empty(p.shape, dtype=p.dtype)))
        layer.weight_dtype = dtype
    elif how == "own":
        for name in base:
            p = getattr(layer, name)
            setattr(layer, name, _frozen(ckpt.get(f"{path}.{name}").to(p.dtype)))
        layer.weight_dtype = dtype
    else:
        bias = ckpt.get(f"{path}.bias") if layer.bias is not None else None
        if how == "bnb":
            from ..quant.bnb_format import from_bnb_state_dict
            sd = {k: ckpt.get(k) for k in ckpt.keys() if k == key or k.startswith(key + ".")}
            qt = from_bnb_state_dict(sd, key)
        else:
            w = ckpt.get(key).to(dtype)
            try:
                qt = quantize_for(config, w.t().contiguous() if conv1d else w)
            except QLoRADSError as err:   # e.g. a NaN: say which of hundreds of tensors and shards holds it
                raise QLoRADSError(f"{ckpt.stored[key]} in {ckpt.file_of[key]} ({ckpt.path}): {err}") from None
            del w
        layer.set_quantized_weight(qt, bias)
    for sub in (layer.lora_A, layer.lora_B):
        sub.to_empty(device="cpu")
    layer.reset_lora_parameters()        # on the CPU: the same initial LoRA weights wherever the model goes
    layer.to(device)


def _zero3_partition(params: list[nn.Parameter], ds_config) -> None:
    """Hand already-filled parameters to ZeRO-3: broadcast from rank 0, keep this rank's 1/N."""
    import deepspeed
    holder = nn.Module()
    for i, p in enumerate(params):
        holder.register_parameter(f"p{i}", p)
    deepspeed.zero.Init(module=holder, config_dict_or_path=ds_config, mem_efficient_linear=False)


def _zero3_device() -> torch.device:
    """This rank's accelerator device (cuda:LOCAL_RANK on GPUs, the CPU under DeepSpeed's CPU accelerator)."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def _broadcast_buffers(buffers: list[tuple[nn.Module, str]]) -> None:
    """ZeRO-3: only rank 0 read the checkpoint and zero.Init moves parameters only, so send rank 0's
    persistent buffers to every rank (else ranks > 0 keep the skeleton's defaults). They stay on the accelerator
    device (see ``_buffers_to_device``)."""
    import deepspeed.comm as dist

    device = _zero3_device()    # NCCL needs device tensors, gloo takes CPU ones
    for module, name in buffers:
        t = module._buffers[name].to(device).contiguous()
        dist.broadcast(t, src=0)
        module._buffers[name] = t


def _buffers_to_device(model: nn.Module, device: torch.device) -> None:
    """ZeRO-3 (and a load onto ``device``): move every buffer (persistent or not: rotary ``inv_freq``, masks…) to
    ``device``. The skeleton is built on the CPU outside ``zero.Init``'s context, ``zero.Init(module=…)`` moves
    parameters only, and
    DeepSpeed's engine does not move a model whose parameters ZeRO-3 already holds (``_configure_distributed_model``:
    ``if not (self.dont_change_device or is_zero_init_model): self.module.to(self.device)``), so on a GPU they would
    stay on the CPU. A buffer shared by several modules stays one tensor."""
    moved: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for name, b in module._buffers.items():
            if b is None or b.device == device:
                continue
            if id(b) not in moved:
                moved[id(b)] = b.to(device)
            module._buffers[name] = moved[id(b)]


def model_dtypes(config, torch_dtype: torch.dtype | str | None = AUTO):
    """(config with a concrete compute dtype, the dtype of the unquantized tensors): an "auto" on either side
    follows the other; both "auto" -> what the training device computes best."""
    if torch_dtype is None or torch_dtype == AUTO:
        config = config.resolved()
        return config, config.compute_dtype
    torch_dtype = resolve_dtype(torch_dtype)
    if config.compute_dtype == AUTO:
        config = dataclasses.replace(config, compute_dtype=torch_dtype)
    return config, torch_dtype


def _check_quant_method(path: str, qcfg) -> None:
    """Only bitsandbytes 4-bit checkpoints are read as they are stored; another format's tensors (GPTQ's qweight…)
    would otherwise surface as a missing-weight error that blames the checkpoint, and LLM.int8's int8 codes (same
    quant_method, weight-shaped) would be quantized as if they were weights."""
    method = qcfg.get("quant_method") if isinstance(qcfg, dict) else getattr(qcfg, "quant_method", None)
    method = str(getattr(method, "value", method) or "").lower()
    if method == "gptq":
        raise QLoRADSError(f"{path!r} is a GPTQ checkpoint (e.g. a merged QA-LoRA export); qlora-ds quantizes from "
                           f"16/32-bit or bitsandbytes 4-bit checkpoints — train from the original base (with "
                           f"--init-adapter to continue from the adapter), or from a bf16 merge of it")
    if method and method != "bitsandbytes":
        raise QLoRADSError(f"{path!r} is quantized with {method!r}, which qlora-ds does not read; pass the original "
                           f"16/32-bit checkpoint (or a bitsandbytes 4-bit one)")

    def flag(name):
        return qcfg.get(name) if isinstance(qcfg, dict) else getattr(qcfg, name, None)
    if method == "bitsandbytes" and (flag("load_in_8bit") or flag("load_in_4bit") is False):
        raise QLoRADSError(f"{path!r} is a bitsandbytes 8-bit (LLM.int8) checkpoint; qlora-ds reads bitsandbytes 4-bit "
                           f"ones only (its int8 codes are not weights) — pass the original 16/32-bit checkpoint")


def _quantize_from(path: str, own: dict | None, asked, torch_dtype: torch.dtype) -> torch.dtype:
    """The dtype the weights are (or, in a ``save_quantized`` directory, were) rounded to before quantization."""
    recorded = (own or {}).get("weight_dtype")
    if recorded is None:                            # a 16/32-bit or bnb checkpoint (or a save without the field)
        return torch_dtype if asked is None else resolve_dtype(asked)
    recorded = getattr(torch, str(recorded), None)   # written as str(torch.bfloat16) less "torch."
    if not (isinstance(recorded, torch.dtype) and recorded.is_floating_point):
        raise QLoRADSError(f"{os.path.join(path, QUANT_META_NAME)}: weight_dtype {own['weight_dtype']!r} is not a "
                           f"float dtype; re-save the model with qlora_ds.save_quantized")
    if asked is not None and resolve_dtype(asked) != recorded:
        raise QLoRADSError(f"{path!r} holds codes quantized from {str(recorded).removeprefix('torch.')} "
                           f"({QUANT_META_NAME}); quantize_from={str(asked).removeprefix('torch.')} cannot change "
                           f"them — omit quantize_from, or quantize the original 16/32-bit checkpoint with it")
    return recorded


def from_pretrained(path: str, config, ds_config=None, torch_dtype: torch.dtype | str = AUTO,
                    policy: Policy | None = None, quantize_from: torch.dtype | str | None = None,
                    device: torch.device | str | None = None) -> nn.Module:
    """Load a Hugging Face causal LM with its target linears quantized and LoRA-wrapped (see module doc).

    ``path``: a directory with config.json and safetensors (16-bit; bitsandbytes 4-bit; or written by
    ``save_quantized``). ``quantize_from``: the dtype the weights are rounded to before quantization (None: the
    load dtype; a ``save_quantized`` directory's codes keep the dtype it recorded, and another one is an error); a
    layer's ``weight_dtype`` records it. ``device`` (below ZeRO-3; None: the CPU): where each module goes as soon as
    it is read and quantized (on the CPU, so the codes are the CPU's), so host memory never holds the whole model.
    The model is returned in eval mode; only the LoRA A/B tensors require grad.
    """
    from transformers import AutoConfig
    if not isinstance(config, (QLoRAConfig, QALoRAConfig)):
        raise QLoRADSError(f"config must be a QLoRAConfig or QALoRAConfig, got {type(config).__name__}")
    if not os.path.isdir(path):
        raise QLoRADSError(f"{path!r} is not a directory; pass a local checkpoint directory (no hub downloads)")
    config, torch_dtype = model_dtypes(config, torch_dtype)
    hf_config = AutoConfig.from_pretrained(path)
    if hasattr(hf_config, "quantization_config"):
        _check_quant_method(path, hf_config.quantization_config)
        del hf_config.quantization_config          # we do the quantization; build a plain skeleton
    ckpt = Checkpoint(path)
    own = _read_quant_meta(path, config)
    quantize_from = _quantize_from(path, own, quantize_from, torch_dtype)
    stage = zero_stage(ds_config)
    if stage == 3 and device is not None:
        raise QLoRADSError(f"device={device!r} with ZeRO-3: ZeRO-3 puts each rank's partition on its own device; "
                           f"leave device unset")
    device = torch.device("cpu" if device is None else device)
    if stage == 3:
        import deepspeed
        import deepspeed.comm as dist
        if not dist.is_initialized():       # a user's own script, or torch's group set up by HF's TrainingArguments
            from ..distributed import _without_shm_comm_op
            with _without_shm_comm_op():
                deepspeed.init_distributed()
        read = dist.get_rank() == 0
    else:
        read = True
    model = _skeleton(hf_config, torch_dtype)
    conv1d = {p for p, m in model.named_modules() if is_linear_like(m) and not isinstance(m, nn.Linear)}
    ckpt.rename(_renamer(model))
    aliases = {n: names for names in _alias_groups(model).values() for n in names}
    paths = inject(model, config, policy)
    # a targeted head tied to the embeddings (tie_word_embeddings) is saved only under the embedding's name: its
    # layer quantizes a copy of that weight, the embedding stays 16-bit (as inject() after transformers' load does)
    weight_key = {p: next((k for k in aliases.get(f"{p}.weight", ()) if k in ckpt), f"{p}.weight") for p in paths}
    how, source, experts = _plan(model, ckpt, paths, conv1d, config, own, weight_key)
    layer_set = set(paths)
    prefixes = tuple(p + "." for p in paths)
    done: dict[int, nn.Parameter] = {}
    loaded_buffers: list[tuple[nn.Module, str]] = []   # the same list on every rank (from the headers)
    try:
        for mpath, module in list(model.named_modules()):
            if mpath.startswith(prefixes):
                continue                            # LoRA submodules: filled with their layer
            if mpath in layer_set:
                _fill_layer(module, mpath, how[mpath], ckpt, mpath in conv1d, config, quantize_from, read,
                            weight_key[mpath], device)
                new_params = list(module.parameters())
            else:
                new_params = []
                skip = set(filled_leaves(module)) if mpath in experts else set()
                for name, p in list(module._parameters.items()):
                    if p is None or name in skip:
                        continue
                    if id(p) in done:               # a tied weight: the same Parameter object again
                        module._parameters[name] = done[id(p)]
                        continue
                    src = source[id(p)]
                    if not read:
                        t = torch.empty(p.shape, dtype=p.dtype)
                    else:       # a checkpoint key, or per-expert tensors fused as transformers does (Converted)
                        t = ckpt.get(src) if isinstance(src, str) else src.read(ckpt, torch_dtype)
                    if t.is_floating_point():
                        t = t.to(torch_dtype if p.dtype.is_floating_point else p.dtype)
                    new = _frozen(t.to(device))
                    done[id(p)] = new
                    module._parameters[name] = new
                    new_params.append(new)
                for name, b in module._buffers.items():
                    key = f"{mpath}.{name}" if mpath else name
                    if b is not None and name not in module._non_persistent_buffers_set and key in ckpt:
                        if tuple(ckpt.shape[key]) != tuple(b.shape):
                            raise QLoRADSError(f"checkpoint buffer {key} has shape {tuple(ckpt.shape[key])}, the "
                                               f"model's is {tuple(b.shape)}; the checkpoint does not match its "
                                               f"config.json")
                        if read:
                            module._buffers[name] = ckpt.get(key).to(device, b.dtype)
                        loaded_buffers.append((module, name))
                if mpath in experts:                # the 4-bit expert weights, quantized from quantize_from
                    new_params += fill_quantized_experts(module, mpath, experts[mpath], ckpt, quantize_from, read,
                                                         device)
            if stage == 3 and new_params:
                if ds_compute_dtype(ds_config) == torch.float16:
                    # ZeRO-3 takes its loss scaler from the trainable parameters' dtype: fp32 LoRA weights there mean
                    # a static scale of 1 (no dynamic fp16 loss scaling); its optimizer keeps the fp32 masters
                    for p in new_params:
                        if p.dtype == torch.float32:
                            p.data = p.data.half()
                _zero3_partition(new_params, ds_config)
            if mpath in layer_set or mpath in experts:
                release_free_heap()   # the 16-bit tensors just freed: RSS would grow a tensor per layer
    finally:
        ckpt.close()
    if stage == 3:
        _broadcast_buffers(loaded_buffers)
        _buffers_to_device(model, _zero3_device())
    elif device.type != "cpu":
        _buffers_to_device(model, device)        # the skeleton's own (rotary inv_freq, masks)
    model.requires_grad_(False)
    for param in lora_parameters(model).values():
        param.requires_grad_(True)
    model.qlora_ds_targets = tuple(paths)
    install_heap_release(model)
    return model.eval()


# ---------------------------------------------------------------------------- save
def save_quantized(model: nn.Module, directory: str) -> None:
    """Write the frozen quantized model (no adapters) atomically: ``model.safetensors`` with the layers'
    packed parameters (and 4-bit MoE experts' parts) as stored, ``config.json``, and ``qlora_ds_quant.json``
    (format, version, settings, the quantized layers and experts modules).
    Works under ZeRO-3 too (each module is gathered in turn on every rank; only rank 0 writes it, a tensor at a
    time, and every rank returns once the directory is complete, or raises if rank 0's write failed). Host memory
    beyond the model: one tensor (``qlora_ds.safetensors_writer``)."""
    layers = {p: m for p, m in model.named_modules() if is_quantized_layer(m)}
    if not layers:
        raise QLoRADSError("the model has no QLoRALinear/QALoRALinear layers; quantize it with "
                           "qlora_ds.from_pretrained or inject() before save_quantized")
    import torch.distributed as tdist

    from ..distributed import all_ranks_ok
    writer = not (tdist.is_available() and tdist.is_initialized()) or tdist.get_rank() == 0
    # (module path, [(name, parameter)], [(name, buffer)]): each parameter once (tied ones under their first name)
    groups, seen = [], set()
    for mpath, module in model.named_modules():
        if ".lora_A" in mpath or ".lora_B" in mpath:
            continue
        params = [(n, p) for n, p in module._parameters.items()
                  if p is not None and id(p) not in seen and not is_lora_name(n)]      # experts' LoRA: no base
        seen.update(id(p) for _, p in params)
        buffers = [(n, b) for n, b in module._buffers.items()
                   if b is not None and n not in module._non_persistent_buffers_set]
        if params or buffers:
            groups.append((mpath, params, buffers))
    key = lambda mpath, name: f"{mpath}.{name}" if mpath else name          # noqa: E731
    entries = [(key(mpath, n), t.dtype, tuple(getattr(t, "ds_shape", t.shape)))
               for mpath, params, buffers in groups for n, t in params + buffers]
    ran, error = False, None

    def stream(out) -> None:
        """Every rank gathers module by module (a collective); the writer writes each as it comes, then drops it:
        host memory holds one tensor at a time (a gathered or GPU model was copied whole to the host first)."""
        nonlocal ran
        ran, failed = True, None
        for mpath, params, buffers in groups:
            with gathered([p for _, p in params]):
                if out is not None and failed is None:      # after a failure keep gathering: no rank left waiting
                    try:
                        for n, t in params + buffers:
                            out.write(key(mpath, n), t)
                    except Exception as err:
                        failed = err
        if failed is not None:
            raise failed

    if writer:
        try:
            _write_quantized(model, directory, entries, next(iter(layers.values())), sorted(layers),
                             sorted(quantized_experts(model)), stream)
        except Exception as err:     # reported on every rank below: none left waiting for rank 0
            error = err
    if not ran:
        stream(None)
    if not all_ranks_ok(error is None):
        if error is not None:
            raise error
        raise QLoRADSError(f"save_quantized: writing {directory} failed on rank 0 (its error says why)")


def _write_quantized(model, directory: str, entries: list, first, modules: list[str], experts: list[str],
                     stream) -> None:
    from .. import __version__
    from ..atomic import atomic_directory
    from ..safetensors_writer import SafetensorsWriter
    meta = {"format": QUANT_FORMAT, "version": QUANT_VERSION, **quant_settings(first.config),
            "weight_dtype": str(first.weight_dtype).removeprefix("torch."), "modules": modules,
            "experts": experts,
            "qlora_ds_version": __version__}
    with atomic_directory(directory, allowed_existing=_SAVED_FILES) as tmp:
        with SafetensorsWriter(os.path.join(tmp, "model.safetensors"), entries, {"format": "pt"}) as out:
            stream(out)
        if getattr(model, "config", None) is not None:
            model.config.to_json_file(os.path.join(tmp, "config.json"))
        with open(os.path.join(tmp, QUANT_META_NAME), "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
