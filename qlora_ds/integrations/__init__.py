"""Glue for other training frameworks; importing this package imports none of them."""
from .hf_trainer import (ADAPTER_DIR, ds_training_defaults, make_optimizer, optimizer_cls_and_kwargs,
                         precision_defaults, prepare_for_trainer, qlora_trainer_class, trainer_ds_config,
                         trainer_dtype)

__all__ = ["ADAPTER_DIR", "QLoRATrainer", "ds_training_defaults", "make_optimizer", "optimizer_cls_and_kwargs",
           "precision_defaults", "prepare_for_trainer", "qlora_trainer_class", "trainer_ds_config", "trainer_dtype"]


def __getattr__(name):  # QLoRATrainer subclasses transformers.Trainer: built on first use
    if name == "QLoRATrainer":
        from . import hf_trainer
        return hf_trainer.QLoRATrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
