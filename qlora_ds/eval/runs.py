"""Load what a run produced (or any base / adapter / merged checkpoint) for inference.

``resolve(run=…)`` reads ``<run>/run_config.json`` (written by ``launch/finetune.py``) for the base
model and takes ``<run>/adapter``; ``resolve(model=…, adapter=…)`` takes them as given; ``no_adapter``: the
quantized base the run (or adapter) trained on, without the adapter — the model before training. The layer
config is read from the adapter itself (``adapter_config_from_dir``), with the run's settings (or
the command line's) for what a plain PEFT adapter leaves out; a run without its final adapter yet has only
its settings.

``load(source, dtype, device)`` returns (model, tokenizer), the model on ``device`` (default: the local GPU
when there is one, else the CPU; ``qlora_ds.hardware.resolve_device``):

* base + adapter -> ``from_pretrained`` into QLoRA/QA-LoRA layers + ``load_adapter``, the base quantized from the
  dtype the adapter was trained on (``quantization_dtype``) whatever dtype this load computes in; ``base_only``:
  the same without ``load_adapter``, LoRA switched off (the quantized base, as before training);
* a checkpoint written by ``export_merged(fmt='gptq')`` -> ``read_gptq_checkpoint``: the exact merge (codes + the
  fp32 scales/zeros of qlora_ds_intn.safetensors) by default, ``gptq_view="kernel"`` what a GPTQ loader reads
  (integer zeros, fp16 scales);
* any other directory -> plain ``AutoModelForCausalLM.from_pretrained``.

A merge whose ``qlora_ds_merge.json`` records a failed verification (``launch/merge.py`` of an older version wrote
it in place) loads with a warning.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os

import torch

from ..errors import QLoRADSError
from ..hardware import DTYPE_NAMES
from ..run_dir import BEFORE_OPTION_EXISTED, RUN_CONFIG

log = logging.getLogger(__name__)


TOKENIZATION_OPTIONS = ("plain_bos", "text_windows", "weight0_untrained")     # finetune's, read from a run for its examples' tokens


def tokenization(source: "Source") -> dict:
    """``tokenize_records`` / ``prompt_ids`` keywords of the run behind ``source`` (today's defaults without one)."""
    return {k: bool(source.settings[k]) for k in TOKENIZATION_OPTIONS if k in source.settings}


@dataclasses.dataclass(frozen=True)
class Source:
    model: str                      # base (or merged) checkpoint directory
    adapter: str | None = None      # PEFT-format adapter directory, or None
    settings: dict = dataclasses.field(default_factory=dict)   # run/CLI settings (method, bits, …)
    base_only: bool = False         # the quantized base alone; ``adapter`` (None: ``settings``) only describes it


def resolve(run: str | None = None, model: str | None = None, adapter: str | None = None,
            no_adapter: bool = False, **settings) -> Source:
    """A ``Source`` from a run directory or an explicit model (+ adapter); ``settings`` that are None
    are dropped, the rest override the run's. ``no_adapter``: the quantized base that the run or adapter trained
    on, without the adapter (a run still in progress has its settings, not yet its adapter)."""
    settings = {k: v for k, v in settings.items() if v is not None}
    if no_adapter and not run and not adapter:
        raise QLoRADSError("--no-adapter drops the adapter of --run or --adapter (and keeps the quantized base it "
                           "trained on); with --model alone there is none: leave --no-adapter out")
    if run:
        path = os.path.join(run, RUN_CONFIG)
        try:
            with open(path, encoding="utf-8") as fh:
                run_cfg = json.load(fh)
        except (OSError, ValueError) as err:
            raise QLoRADSError(f"cannot read {path} ({err}); --run takes a finetune output directory "
                               f"(launch/finetune.py --output-dir)") from None
        model = model or run_cfg.get("model")
        adapter = adapter or os.path.join(run, "adapter")
        if no_adapter and not os.path.isdir(adapter):
            adapter = None                  # not saved yet: the run's settings describe its base
        elif not os.path.isdir(adapter):
            raise QLoRADSError(f"{adapter} does not exist: the run has not finished (no final adapter); wait for it "
                               f"or pass --adapter to a saved adapter")
        # a run from before an option ran with its old behaviour (finetune's resume rule, qlora_ds.run_dir)
        settings = {**{k: BEFORE_OPTION_EXISTED[k] for k in TOKENIZATION_OPTIONS}, **run_cfg, **settings}
    if not model:
        raise QLoRADSError("pass --run DIR or --model PATH")
    if not os.path.isdir(model):
        raise QLoRADSError(f"model {model!r} is not a directory; pass a local checkpoint directory")
    if adapter is not None and not os.path.isdir(adapter):
        raise QLoRADSError(f"adapter {adapter!r} is not a directory")
    return Source(model=model, adapter=adapter, settings=settings, base_only=no_adapter)


def layer_config(source: Source, compute_dtype: torch.dtype = torch.bfloat16):
    """The adapter's layer config; without an adapter (``base_only`` of an unfinished run), the run's settings'."""
    from ..adapters.merge import adapter_config_from_dir

    if source.adapter is None:
        return _settings_layer_config(source.settings, compute_dtype)
    return adapter_config_from_dir(source.adapter, compute_dtype=compute_dtype, fallback=source.settings)


def _settings_layer_config(settings: dict, compute_dtype: torch.dtype):
    """finetune's layer config from its arguments (run_config.json; finetune's defaults where one is unset)."""
    from ..nn.config import QALoRAConfig, QLoRAConfig

    def get(key, default):
        return default if settings.get(key) is None else settings[key]

    targets = settings.get("target_modules")
    common = dict(r=int(get("lora_r", 64)), alpha=float(get("lora_alpha", 16)), dropout=0.0,
                  target_modules=tuple(targets) if isinstance(targets, list) and targets else targets or None,
                  compute_dtype=compute_dtype)
    method = get("method", "qlora")
    if method == "qalora":
        return QALoRAConfig(bits=int(get("bits", 4)), group_size=int(get("group_size", 32)), **common)
    if method != "qlora":
        raise QLoRADSError(f"method {method!r} (run_config.json, or --method) is not qlora or qalora")
    return QLoRAConfig(quant_type=get("quant_type", "nf4"), double_quant=bool(get("double_quant", True)),
                       quantize_experts=bool(get("quantize_experts", BEFORE_OPTION_EXISTED["quantize_experts"])),
                       lora_experts=bool(get("lora_experts", False)), **common)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base_and_adapter(source: Source, compute_dtype: torch.dtype = torch.bfloat16,
                          torch_dtype: torch.dtype | None = None, device: torch.device | str | None = None):
    """The quantized base with the adapter loaded (QLoRALinear / QALoRALinear layers), eval mode, on
    ``device`` (None: where the loader put it, the CPU); ``source.base_only``: the quantized base alone (no adapter
    loaded, LoRA switched off). Loading reads and quantizes on the CPU one tensor at a time, and each module goes to
    ``device`` as soon as it is filled (the host never holds the whole model)."""
    from ..adapters import load_adapter, lora_layers
    from ..inject import from_pretrained

    config = layer_config(source, compute_dtype)
    load_dtype = torch_dtype or compute_dtype
    model = from_pretrained(source.model, config, torch_dtype=load_dtype,
                            quantize_from=quantization_dtype(source, load_dtype), device=device)
    _read_generation_config(model, source.model)
    if source.base_only:
        for layer in lora_layers(model).values():
            layer.disable_adapter = True            # fresh B = 0 adds nothing anyway; this skips its compute
        log.info("loaded %s quantized as %s, without an adapter (%s)", source.model, type(config).__name__,
                 f"the base of {source.adapter}" if source.adapter else "the run's settings")
        return _to_device(model.eval(), device)
    loaded = load_adapter(model, source.adapter)
    log.info("loaded %s + adapter %s (%d layers, %s)", source.model, source.adapter, len(loaded),
             type(config).__name__)
    return _to_device(model.eval(), device)


def quantization_dtype(source: Source, load_dtype: torch.dtype) -> torch.dtype | None:
    """The dtype the adapter's base weights were rounded to before they were quantized (an fp16/fp32 checkpoint's
    INT-N/NF4 base depends on it): the adapter's side file says it (``quantized_from``), else the run's (or
    ``--train-dtype``'s) ``dtype``. None (quantize from ``load_dtype``) where neither does, with a warning when
    the checkpoint's weights then round differently from a load in another dtype."""
    from ..adapters.peft_format import SIDE_NAME
    from ..inject.loading import QUANT_META_NAME

    side = os.path.join(source.adapter or "", SIDE_NAME)
    named = None
    if source.adapter and os.path.exists(side):
        with open(side, encoding="utf-8") as fh:
            named = json.load(fh).get("quantized_from")
    meta = os.path.join(source.model, QUANT_META_NAME)
    if os.path.isfile(meta):      # a save_quantized directory: its codes are what they are
        with open(meta, encoding="utf-8") as fh:
            own = str(json.load(fh).get("weight_dtype") or "").removeprefix("torch.")
        if named and own and str(named).removeprefix("torch.") != own:
            log.warning("adapter %s says its base was quantized from %s, but %s holds codes quantized from %s: it "
                        "was trained on another base; its logits here differ slightly", source.adapter, named,
                        source.model, own)
        return None
    named = named or source.settings.get("dtype")
    if named and named != "auto":
        names = {**DTYPE_NAMES, **{str(d).removeprefix("torch."): d for d in DTYPE_NAMES.values()}}
        if str(named) not in names:
            raise QLoRADSError(f"the dtype the adapter's base was quantized from, {named!r} ({SIDE_NAME} "
                               f"quantized_from, or the run's dtype), is not one of {sorted(names)}; fix the file or "
                               f"pass --train-dtype")
        return names[str(named)]
    ckpt = _float_dtype(source.model)
    if ckpt is not None and ckpt != load_dtype and not (ckpt == torch.bfloat16 and load_dtype == torch.float32):
        log.warning("adapter %s does not say which dtype its base was quantized from (a plain PEFT adapter): the %s "
                    "checkpoint's weights are rounded to %s before quantization here, which gives another base than "
                    "a training run that loaded them in another dtype; pass --run with the finetune run, or "
                    "--train-dtype with the --dtype it trained with", source.adapter,
                    str(ckpt).removeprefix("torch."), str(load_dtype).removeprefix("torch."))
    return None


def _float_dtype(directory: str) -> torch.dtype | None:
    """The dtype config.json gives the checkpoint's weights; None for a pre-quantized one (its base is stored)."""
    try:
        with open(os.path.join(directory, "config.json"), encoding="utf-8") as fh:
            cfg = json.load(fh)
    except (OSError, ValueError):
        return None
    name = cfg.get("dtype") or cfg.get("torch_dtype")
    if cfg.get("quantization_config") or name not in ("bfloat16", "float16", "float32"):
        return None
    return getattr(torch, name)


def _read_generation_config(model, directory: str) -> None:
    """The checkpoint's generation_config.json (often the only place an instruct model lists its end-of-turn token
    among the eos ids), which a model built from config.json alone does not read."""
    if os.path.exists(os.path.join(directory, "generation_config.json")):
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(directory)


def _to_device(model, device):
    if device is not None:
        model.to(torch.device(device))
    return model


GPTQ_VIEWS = ("exact", "kernel")


def merge_meta(source: Source) -> dict | None:
    """The ``qlora_ds_merge.json`` of a merged checkpoint (None for anything else)."""
    from ..adapters.merge import MERGE_META

    path = os.path.join(source.model, MERGE_META)
    if source.adapter or source.base_only or not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError) as err:
        raise QLoRADSError(f"cannot read {path} ({err}); merge again with launch/merge.py") from None


def scored_gptq_view(source: Source, view: str | None) -> str | None:
    """The view of a GPTQ export that ``load`` scores (``view`` or "exact"); None for any other model."""
    meta = merge_meta(source)
    if meta is None or meta.get("format") != "gptq":
        if view is not None:
            raise QLoRADSError(f"--gptq-view is for a --format gptq export (its qlora_ds_merge.json says so); "
                               f"{source.model} is not one: leave --gptq-view out")
        return None
    if view not in (None, *GPTQ_VIEWS):
        raise QLoRADSError(f"gptq view {view!r} is not one of {GPTQ_VIEWS}")
    return view or "exact"


def load(source: Source, dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = "auto",
         gptq_view: str | None = None):
    """(model, tokenizer) for generation / evaluation (see module doc); ``device`` ``"auto"``: the local GPU
    when there is one, else the CPU; None: leave the model where it was loaded (the CPU). ``gptq_view``: which
    view of a GPTQ export (``GPTQ_VIEWS``; default "exact")."""
    from transformers import AutoModelForCausalLM

    from ..adapters.merge import EXACT_NAME, read_gptq_checkpoint
    from ..hardware import resolve_device

    device = resolve_device(device) if isinstance(device, str) else device
    view = scored_gptq_view(source, gptq_view)      # a bad --gptq-view fails before the tokenizer loads
    tokenizer = load_tokenizer(source.model)
    if source.adapter or source.base_only:
        return load_base_and_adapter(source, compute_dtype=dtype, device=device), tokenizer
    verified = (merge_meta(source) or {}).get("verify", {})
    if verified.get("ok") is False:
        log.warning("%s failed its merge verification (relative logit difference %.3g > tolerance %.3g, "
                    "qlora_ds_merge.json): it does not compute what base + adapter did; merge again", source.model,
                    verified.get("rel_diff", float("nan")), verified.get("tolerance", float("nan")))
    if view == "exact":
        log.info("scoring the exact merge of the GPTQ export %s (its codes with the fp32 scales/zeros of %s); GPTQ "
                 "loaders read the kernel view (integer zeros, fp16 scales): --gptq-view kernel", source.model,
                 EXACT_NAME)
    elif view == "kernel":
        log.info("scoring the kernel view of the GPTQ export %s (integer zeros, fp16 scales: what GPTQ loaders read)",
                 source.model)
    if view is not None:
        model = read_gptq_checkpoint(source.model, exact=view == "exact", dtype=dtype)
        return _to_device(model, device), tokenizer
    return _to_device(AutoModelForCausalLM.from_pretrained(source.model, dtype=dtype).eval(), device), tokenizer
