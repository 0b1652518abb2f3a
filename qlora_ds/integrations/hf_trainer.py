"""Drop qlora-ds into a Hugging Face ``transformers.Trainer`` (or TRL's ``SFTTrainer``) run with ``--deepspeed``.

Four pieces, each usable alone:

- :func:`trainer_ds_config` — the ds_config as the Trainer should see it: our optimizer section (``PagedAdamW``…,
  which DeepSpeed cannot build) popped from a *copy*, and ``_comment``-style keys dropped; plus that section.
- :func:`optimizer_cls_and_kwargs` / :func:`make_optimizer` — our optimizer from that section.
  Under DeepSpeed, transformers 5.23's ``deepspeed_init`` sets ``trainer.optimizer = None`` and calls
  ``trainer.create_optimizer()`` whenever the ds_config has no optimizer section, so an instance passed as
  ``Trainer(optimizers=(opt, None))`` is silently replaced by the default AdamW. The path that survives is
  ``Trainer(optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(cfg))``; :func:`make_optimizer` (an instance) is
  for a Trainer without DeepSpeed or for custom loops.
- :func:`prepare_for_trainer` — :func:`qlora_ds.from_pretrained` with the ds_config taken from the
  ``TrainingArguments``, so a ZeRO-3 config builds the model under ``deepspeed.zero.Init`` (packed bytes sharded).
- :func:`precision_defaults` / :func:`trainer_dtype` — the compute dtype: ``auto`` is the hardware's choice
  (:mod:`qlora_ds.hardware`: bf16 where native, fp16 on pre-Ampere GPUs, fp32 on CPUs without native bf16) as
  ``--bf16``/``--fp16`` defaults, checked against the ds_config; the model then computes in what the Trainer trains.
- :func:`qlora_trainer_class` / :class:`QLoRATrainer` — a Trainer whose ``save_model`` writes the PEFT-format
  adapter (``<dir>/adapter``) instead of ``save_pretrained`` of the whole state dict (which would dump the packed
  4-bit base, and under ZeRO-3 first gather it on rank 0); its training loss is the chunked LM-head loss
  (``chunked_loss=False`` for the full logits).
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil

import torch

from ..ds_config import read_ds_config
from ..errors import QLoRADSError

__all__ = ["ADAPTER_DIR", "QLoRATrainer", "ds_training_defaults", "make_optimizer", "optimizer_cls_and_kwargs",
           "precision_defaults", "prepare_for_trainer", "qlora_trainer_class", "trainer_ds_config", "trainer_dtype"]

log = logging.getLogger(__name__)
ADAPTER_DIR = "adapter"
AUTO = "auto"   # HF's ds_config placeholder: the value comes from TrainingArguments
_ARG_KEYS = ("lr", "betas", "eps", "weight_decay")   # optimizer params TrainingArguments also set


def trainer_ds_config(ds_config) -> tuple[dict, dict | None]:
    """(copy of ``ds_config`` without our optimizer section and ``_``-prefixed notes, that section or None).

    A section naming a DeepSpeed optimizer (``AdamW``, ``Adam``…) is left in place and None is returned.
    """
    from ..optim.deepspeed_registration import split_ds_config

    cfg = {k: v for k, v in read_ds_config(ds_config).items() if not k.startswith("_")}
    try:
        return split_ds_config(cfg)
    except ValueError as err:
        raise QLoRADSError(f"ds_config optimizer section: {err}") from None


def precision_defaults(dtype="auto", ds_config=None, device=None) -> dict:
    """``{"bf16": …, "fp16": …}`` for ``TrainingArguments``: ``dtype`` (auto|bf16|fp16|fp32, ``auto`` decided by
    :mod:`qlora_ds.hardware` for ``device``, default the local GPU else the CPU) checked against the ds_config's
    explicit bf16/fp16 sections ("auto" or absent follow the dtype; a conflict is a QLoRADSError)."""
    from ..hardware import fold_ds_precision, resolve_device, resolve_dtype

    device = resolve_device("auto") if device is None else torch.device(device)
    resolved = resolve_dtype(dtype, device)
    cfg = fold_ds_precision(trainer_ds_config(ds_config)[0] if ds_config is not None else {}, resolved, str(dtype))
    return {"bf16": cfg["bf16"]["enabled"], "fp16": cfg["fp16"]["enabled"]}


def trainer_dtype(training_args) -> torch.dtype:
    """The compute dtype a Trainer run uses: ``--bf16`` → bf16, ``--fp16`` → fp16, neither → fp32."""
    if getattr(training_args, "bf16", False):
        return torch.bfloat16
    return torch.float16 if getattr(training_args, "fp16", False) else torch.float32


def ds_training_defaults(ds_config, dtype="auto", device=None) -> dict:
    """``TrainingArguments`` values the ds_config fixes (use them as parser defaults so the two agree).

    transformers checks these keys against the arguments and refuses a mismatch; taking them as defaults means a
    user who passes only ``--deepspeed`` gets the ds_config's batch sizes, clipping and optimizer settings, and
    one who passes a different value explicitly still gets transformers' clear mismatch error. ``bf16``/``fp16``
    come from :func:`precision_defaults` (``dtype``, default auto: the hardware's choice).
    """
    cfg, section = trainer_ds_config(ds_config)
    out = {}
    for ds_key, arg in (("train_micro_batch_size_per_gpu", "per_device_train_batch_size"),
                        ("gradient_accumulation_steps", "gradient_accumulation_steps"),
                        ("gradient_clipping", "max_grad_norm")):
        if isinstance(cfg.get(ds_key), (int, float)):
            out[arg] = cfg[ds_key]
    out.update(precision_defaults(dtype, cfg, device))
    params = (section or {}).get("params") or {}
    for key, arg in (("lr", "learning_rate"), ("eps", "adam_epsilon"), ("weight_decay", "weight_decay")):
        if key in params and params[key] != AUTO:      # "auto": the TrainingArguments decide, no default here
            out[arg] = params[key]
    if params.get("betas", AUTO) != AUTO:
        out["adam_beta1"], out["adam_beta2"] = _betas(params["betas"])
    return out


def _betas(value) -> tuple:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise QLoRADSError(f"ds_config optimizer.params.betas must be [beta1, beta2] or \"auto\", got {value!r}")
    return tuple(value)


def _section_kwargs(section: dict, training_args=None) -> dict:
    """The section's params, completed from ``training_args``: Trainer.create_optimizer passes these kwargs as they
    are and its param groups carry only weight_decay, so a missing lr/betas/eps would be the class default."""
    kwargs = dict(section.get("params") or {})
    auto = sorted(k for k in _ARG_KEYS if kwargs.get(k) == AUTO)
    if kwargs.get("betas", AUTO) != AUTO:
        kwargs["betas"] = _betas(kwargs["betas"])
    if training_args is None:
        if auto:
            raise QLoRADSError(f"the ds_config's {section['type']} params {auto} are \"auto\", which takes them "
                               f"from TrainingArguments: pass training_args, or write numbers in optimizer.params")
        return kwargs
    want = {"lr": training_args.learning_rate, "eps": training_args.adam_epsilon,
            "weight_decay": training_args.weight_decay,
            "betas": (training_args.adam_beta1, training_args.adam_beta2)}
    # transformers compares these with the ds_config's optimizer section; that section is gone from the config it
    # sees, so compare here: a silent override of the learning rate would be worse than an error.
    bad = [f"{k}: ds_config {kwargs[k]!r} vs TrainingArguments {v!r}" for k, v in want.items()
           if k in kwargs and kwargs[k] != AUTO and kwargs[k] != v]
    if bad:
        raise QLoRADSError(f"the ds_config's {section['type']} settings disagree with TrainingArguments "
                           f"({'; '.join(bad)}); set them in one place (e.g. drop --learning_rate, or edit "
                           f"optimizer.params)")
    for k, v in want.items():       # absent or "auto": the TrainingArguments' value
        if kwargs.get(k, AUTO) == AUTO:
            kwargs[k] = v
    return kwargs


def optimizer_cls_and_kwargs(ds_config, training_args=None) -> tuple[type, dict] | None:
    """``(PagedAdamW…, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=…)``; None if the ds_config names no
    optimizer of ours. With ``training_args``, the section's lr/betas/eps/weight_decay must agree with them, and
    those it leaves out or sets to ``"auto"`` are taken from them; without, ``"auto"`` is a QLoRADSError."""
    from ..optim.deepspeed_registration import OPTIMIZERS, register_with_deepspeed

    _, section = trainer_ds_config(ds_config)
    if section is None:
        return None
    register_with_deepspeed()
    kwargs = _section_kwargs(section, training_args)
    cls = OPTIMIZERS[section["type"].lower()]
    if cls.__name__ == "PagedAdamW" and ({"blocksize", "min_8bit_size"} & set(kwargs)):
        raise QLoRADSError(f"{section['type']!r} keeps 32-bit state: blocksize/min_8bit_size apply only to "
                           f"PagedAdamW8bit / AdamW8bit")
    return cls, kwargs


def make_optimizer(model: torch.nn.Module, ds_config,
                   training_args=None) -> tuple[torch.optim.Optimizer | None, dict]:
    """(our optimizer over ``model``'s trainable parameters, the ds_config without its optimizer section).

    The optimizer is None when the ds_config names a DeepSpeed optimizer (it then stays in the returned config).
    For ``Trainer(optimizers=(opt, None))`` *without* DeepSpeed, or a custom loop; under ``--deepspeed`` use
    :func:`optimizer_cls_and_kwargs` (see the module doc), which also says what ``training_args`` do.
    ``ds_config`` itself is never modified.
    """
    spec = optimizer_cls_and_kwargs(ds_config, training_args)
    cfg, _ = trainer_ds_config(ds_config)
    if spec is None:
        return None, cfg
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise QLoRADSError("the model has no trainable parameters; load it with qlora_ds.from_pretrained")
    cls, kwargs = spec
    return cls(params, **kwargs), cfg


def prepare_for_trainer(model_path: str, config, training_args, torch_dtype: torch.dtype | str = "auto",
                        policy=None) -> torch.nn.Module:
    """Load ``model_path`` quantized with LoRA for a Trainer run described by ``training_args``.

    ``torch_dtype`` "auto" (and a config's ``compute_dtype="auto"``) take the Trainer's precision
    (:func:`trainer_dtype`: ``--bf16``/``--fp16``, else fp32), so the layers compute in what DeepSpeed trains.

    Under a ZeRO-3 ``training_args.deepspeed`` the model is built under ``deepspeed.zero.Init`` (rank 0 reads and
    quantizes; every rank keeps 1/N of the packed bytes), with the config's ``"auto"`` values filled from
    ``training_args`` as the Trainer fills them. Gradient checkpointing, if asked for, is left to the Trainer
    (``--gradient_checkpointing``), non-reentrant unless its kwargs say otherwise; the KV cache is switched off.
    """
    import dataclasses

    from ..inject import from_pretrained, zero_stage

    if torch_dtype == "auto":
        torch_dtype = trainer_dtype(training_args)
    if getattr(config, "compute_dtype", None) == "auto":
        config = dataclasses.replace(config, compute_dtype=torch_dtype)
    ds_config = None
    if getattr(training_args, "deepspeed", None):
        # the config transformers filled from the arguments: zero.Init's DeepSpeedConfig cannot read HF's "auto"
        # batch sizes (TypeError '>' between str and int)
        hf_config = getattr(training_args, "hf_deepspeed_config", None)
        ds_config, _ = trainer_ds_config(training_args.deepspeed if hf_config is None else hf_config.config)
    # below ZeRO-3 each module goes to the Trainer's GPU as it is filled: host memory holds one, not the model
    device = training_args.device if zero_stage(ds_config) < 3 and training_args.device.type == "cuda" else None
    model = from_pretrained(model_path, config, ds_config=ds_config, torch_dtype=torch_dtype, policy=policy,
                            device=device)
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False
    if getattr(training_args, "activation_checkpointing", False):
        # transformers 5.23 reads only activation_checkpointing_kwargs (gradient_checkpointing_kwargs is an alias
        # resolved into it in __post_init__); without use_reentrant torch falls back to reentrant checkpointing
        kwargs = training_args.activation_checkpointing_kwargs or {}
        training_args.activation_checkpointing_kwargs = {"use_reentrant": False, **kwargs}
    return model


def qlora_trainer_class(base: type) -> type:
    """A subclass of ``base`` (``transformers.Trainer``, TRL's ``SFTTrainer``…) that saves adapters, not models.

    ``save_model(dir)`` — called by the Trainer at every checkpoint and by the user at the end — writes the
    PEFT-format adapter to ``dir/adapter`` from rank 0, plus the tokenizer and ``training_args.bin`` as the Trainer
    does; with ``--push_to_hub`` the upload of ``output_dir`` holds the adapter (a checkpoint push first copies
    ``checkpoint-N/adapter`` there). As with the stock Trainer, under ZeRO-3 every rank must call ``save_model``:
    the LoRA tensors are gathered, a collective, so a call on rank 0 only (``if trainer.is_world_process_zero():``)
    waits forever. Without ZeRO-3 it has no collective and rank 0 alone may call it. Under DeepSpeed the engine
    checkpoint written next to it leaves out the frozen (packed) base. ``resume_from_checkpoint`` and
    ``load_best_model_at_end`` load ``dir/adapter`` (without DeepSpeed) or that engine checkpoint, the base coming
    from the model being trained.
    """
    from ..inject.zero import save_adapter
    from ..optim.deepspeed_registration import undo_fp16_warmup_step

    class QLoRATrainerOf(base):
        # the LM head + cross-entropy over token chunks (qlora_ds.loss): no [tokens, vocab] logits in training.
        # Set ``chunked_loss=False`` (constructor keyword or attribute) for the model's own full-logits loss.
        chunked_loss = True

        def __init__(self, *args, chunked_loss: bool | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            if chunked_loss is not None:
                self.chunked_loss = chunked_loss

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            from ..loss import causal_lm_loss, chunked_supported

            if (not self.chunked_loss or return_outputs or "labels" not in inputs
                    or self.label_smoother is not None or self.compute_loss_func is not None):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            why = chunked_supported(model)
            if why is not None:             # the model's own loss, as with chunked_loss=False; said once, not per step
                if not getattr(self, "_said_why_not_chunked", False):
                    log.warning("chunked LM-head loss not used: %s; computing the full logits", why)
                    self._said_why_not_chunked = True
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            n = num_items_in_batch if self.model_accepts_loss_kwargs else None
            loss = causal_lm_loss(model, inputs, num_items_in_batch=n)
            if self.args.average_tokens_across_devices and n is not None:   # as Trainer.compute_loss scales it
                loss = loss * (self.accelerator.num_processes // self.get_tp_size() if self.args.n_gpu <= 1
                               else self.args.n_gpu)
            return loss

        def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
            output_dir = output_dir or self.args.output_dir
            engine = self.model_wrapped if getattr(self, "is_deepspeed_enabled", False) else self.model
            base_path = getattr(getattr(self.model, "config", None), "_name_or_path", None) or None
            # no barrier: outside ZeRO-3 nothing here is collective, so a save on rank 0 only does not hang
            save_adapter(engine, os.path.join(output_dir, ADAPTER_DIR), base_model_name_or_path=base_path,
                         barrier=False)
            if self.args.should_save:
                tokenizer = self.processing_class or getattr(self.data_collator, "tokenizer", None)
                if tokenizer is not None:
                    tokenizer.save_pretrained(output_dir)
                torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
            if self.args.push_to_hub and not _internal_call:      # as Trainer.save_model: a user's save pushes
                self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

        def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
            # the Trainer copies only top-level model/adapter files from the checkpoint into output_dir, the folder
            # it uploads; ours are in <ckpt>/adapter. Copy them when it will push (its own conditions).
            from transformers.trainer_utils import HubStrategy

            adapter = os.path.join(checkpoint_folder, ADAPTER_DIR)
            in_progress = getattr(self, "push_in_progress", None)
            if (self.is_world_process_zero() and self.args.hub_strategy != HubStrategy.END
                    and os.path.isdir(adapter) and (self.args.hub_always_push or in_progress is None
                                                    or in_progress.is_done())):
                shutil.copytree(adapter, os.path.join(self.args.output_dir, ADAPTER_DIR), dirs_exist_ok=True)
            super()._push_from_checkpoint(checkpoint_folder)

        # Checkpoints hold the LoRA weights only (<ckpt>/adapter, and the DeepSpeed engine checkpoint without the
        # frozen base): a resumed or best-model load takes the base from the model being trained, which was built
        # from the same base model.
        def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
            if not self.is_deepspeed_enabled:
                return super()._save_optimizer_and_scheduler(output_dir)
            # transformers passes exclude_frozen_parameters only for PEFT models; without it every checkpoint
            # carries the whole packed base (~35 GB at 65B)
            with _without_frozen_aliases(self.model_wrapped):
                self.model_wrapped.save_checkpoint(output_dir, exclude_frozen_parameters=True)
            from accelerate.utils import DeepSpeedSchedulerWrapper
            if self.args.should_save and not isinstance(self.lr_scheduler, DeepSpeedSchedulerWrapper):
                torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, "scheduler.pt"))

        def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
            if not (self.is_deepspeed_enabled and resume_from_checkpoint is not None):
                out = super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
                if self.is_deepspeed_enabled:       # fp16 without ZeRO: DeepSpeed's setup step on zero gradients
                    undo_fp16_warmup_step(self.model_wrapped)
                return out
            # transformers loads the engine checkpoint strictly here, which fails without the frozen base
            model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, None)
            undo_fp16_warmup_step(self.model_wrapped)
            self._load_engine_checkpoint(resume_from_checkpoint)
            self._load_optimizer_and_scheduler(resume_from_checkpoint)
            self._load_scaler(resume_from_checkpoint)
            return model, train_dataloader

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
            adapter = os.path.join(resume_from_checkpoint, ADAPTER_DIR)
            if self.is_deepspeed_enabled or self.is_fsdp_enabled or not os.path.isdir(adapter):
                return super()._load_from_checkpoint(resume_from_checkpoint, model)
            _load_checkpoint_adapter(model if model is not None else self.model, adapter)

        def _load_best_model(self) -> None:
            best = self.state.best_model_checkpoint
            if self.is_deepspeed_enabled:
                self._load_engine_checkpoint(best)
            elif not self.is_fsdp_enabled and os.path.isdir(os.path.join(best, ADAPTER_DIR)):
                _load_checkpoint_adapter(self.model, os.path.join(best, ADAPTER_DIR))
            else:
                super()._load_best_model()

        def _load_engine_checkpoint(self, path: str) -> None:
            """The DeepSpeed engine checkpoint in ``path``, without the frozen parameters it may leave out."""
            engine = self.model_wrapped
            frozen = {n for n, p in engine.module.named_parameters(remove_duplicate=False) if not p.requires_grad}

            def load(src, dst):
                result = dst.load_state_dict(src, strict=False)
                missing = sorted(set(result.missing_keys) - frozen)
                if missing or result.unexpected_keys:
                    raise QLoRADSError(f"the DeepSpeed checkpoint in {path} does not match this model (missing "
                                       f"trainable {missing[:3]}, unexpected {result.unexpected_keys[:3]}); resume "
                                       f"with the base model and LoRA settings it was trained with")

            if not any(name.startswith("global_step") for name in os.listdir(path)):
                raise QLoRADSError(f"{path} holds no DeepSpeed engine checkpoint (global_step*/); resume under "
                                   f"--deepspeed only from a checkpoint written under --deepspeed")
            load_path, _ = engine.load_checkpoint(path, load_module_strict=False, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True, custom_load_fn=load)
            if load_path is None:
                raise QLoRADSError(f"DeepSpeed could not load the checkpoint in {path} (no 'latest' tag file?)")

    QLoRATrainerOf.__name__ = QLoRATrainerOf.__qualname__ = f"QLoRA{base.__name__}"
    return QLoRATrainerOf


@contextlib.contextmanager
def _without_frozen_aliases(engine):
    """DeepSpeed's ``exclude_frozen_parameters`` drops frozen parameters by their first name only: a tied
    ``lm_head.weight`` (the embedding under a second name) stayed in every checkpoint. Drop every name."""
    frozen = {n for n, p in engine.module.named_parameters(remove_duplicate=False) if not p.requires_grad}
    own = engine.module_state_dict

    def module_state_dict(*args, **kwargs):
        state = own(*args, **kwargs)
        if kwargs.get("exclude_frozen_parameters"):
            for name in frozen:
                state.pop(name, None)
        return state

    engine.module_state_dict = module_state_dict
    try:
        yield
    finally:
        del engine.module_state_dict


def _load_checkpoint_adapter(model: torch.nn.Module, directory: str) -> None:
    """A checkpoint's adapter into ``model``; it must cover every LoRA layer (a partial one is another model's)."""
    from ..adapters import lora_layers
    from ..inject import load_adapter
    from ..inject.zero import unwrap

    loaded = load_adapter(model, directory)
    left = sorted(set(lora_layers(unwrap(model))) - set(loaded))
    if left:
        raise QLoRADSError(f"the checkpoint adapter {directory} has no weights for {len(left)} LoRA layers (e.g. "
                           f"{left[0]}); resume with the base model and LoRA targets it was trained with")


def __getattr__(name):  # lazy: importing this module must not import transformers
    if name == "QLoRATrainer":
        from transformers import Trainer
        cls = qlora_trainer_class(Trainer)
        globals()["QLoRATrainer"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
