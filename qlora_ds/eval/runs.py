"""Load what a run produced (or any base / adapter / merged checkpoint) for inference.

``resolve(run=…)`` reads ``<run>/run_config.json`` (written by ``launch/finetune.py``) for the base
model and takes ``<run>/adapter``; ``resolve(model=…, adapter=…)`` takes them as given. The layer
config is read from the adapter itself (``adapter_config_from_dir``), with the run's settings (or
the command line's) for what a plain PEFT adapter leaves out.

``load(source, dtype, device)`` returns (model, tokenizer), the model on ``device`` (default: the local GPU
when there is one, else the CPU; ``qlora_ds.hardware.resolve_device``):

* base + adapter -> ``from_pretrained`` into QLoRA/QA-LoRA layers + ``load_adapter``;
* a checkpoint written by ``export_merged(fmt='gptq')`` -> ``read_gptq_checkpoint`` (exact);
* any other directory -> plain ``AutoModelForCausalLM.from_pretrained``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os

import torch

from ..errors import QLoRADSError
from ..run_dir import RUN_CONFIG

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Source:
    model: str                      # base (or merged) checkpoint directory
    adapter: str | None = None      # PEFT-format adapter directory, or None
    settings: dict = dataclasses.field(default_factory=dict)   # run/CLI settings (method, bits, …)


def resolve(run: str | None = None, model: str | None = None, adapter: str | None = None,
            **settings) -> Source:
    """A ``Source`` from a run directory or an explicit model (+ adapter); ``settings`` that are None
    are dropped, the rest override the run's."""
    settings = {k: v for k, v in settings.items() if v is not None}
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
        if not os.path.isdir(adapter):
            raise QLoRADSError(f"{adapter} does not exist: the run has not finished (no final adapter); wait for it "
                               f"or pass --adapter to a saved adapter")
        settings = {**run_cfg, **settings}
    if not model:
        raise QLoRADSError("pass --run DIR or --model PATH")
    if not os.path.isdir(model):
        raise QLoRADSError(f"model {model!r} is not a directory; pass a local checkpoint directory")
    if adapter is not None and not os.path.isdir(adapter):
        raise QLoRADSError(f"adapter {adapter!r} is not a directory")
    return Source(model=model, adapter=adapter, settings=settings)


def layer_config(source: Source, compute_dtype: torch.dtype = torch.bfloat16):
    from ..adapters.merge import adapter_config_from_dir

    return adapter_config_from_dir(source.adapter, compute_dtype=compute_dtype, fallback=source.settings)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base_and_adapter(source: Source, compute_dtype: torch.dtype = torch.bfloat16,
                          torch_dtype: torch.dtype | None = None, device: torch.device | str | None = None):
    """The quantized base with the adapter loaded (QLoRALinear / QALoRALinear layers), eval mode, on
    ``device`` (None: where the loader put it, the CPU). Loading reads and quantizes on the CPU one tensor at a
    time; the move copies the packed bytes as they are."""
    from ..adapters import load_adapter
    from ..inject import from_pretrained

    config = layer_config(source, compute_dtype)
    model = from_pretrained(source.model, config, torch_dtype=torch_dtype or compute_dtype)
    _read_generation_config(model, source.model)
    loaded = load_adapter(model, source.adapter)
    log.info("loaded %s + adapter %s (%d layers, %s)", source.model, source.adapter, len(loaded),
             type(config).__name__)
    return _to_device(model.eval(), device)


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


def load(source: Source, dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = "auto"):
    """(model, tokenizer) for generation / evaluation (see module doc); ``device`` ``"auto"``: the local GPU
    when there is one, else the CPU; None: leave the model where it was loaded (the CPU)."""
    from transformers import AutoModelForCausalLM

    from ..adapters.merge import MERGE_META, read_gptq_checkpoint
    from ..hardware import resolve_device

    device = resolve_device(device) if isinstance(device, str) else device
    tokenizer = load_tokenizer(source.model)
    if source.adapter:
        return load_base_and_adapter(source, compute_dtype=dtype, device=device), tokenizer
    meta_path = os.path.join(source.model, MERGE_META)
    if os.path.exists(meta_path):
        with open(meta_path) as fh:
            if json.load(fh).get("format") == "gptq":
                return _to_device(read_gptq_checkpoint(source.model, exact=True, dtype=dtype), device), tokenizer
    return _to_device(AutoModelForCausalLM.from_pretrained(source.model, dtype=dtype).eval(), device), tokenizer
