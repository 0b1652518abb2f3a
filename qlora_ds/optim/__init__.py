"""Paged and 8-bit AdamW optimizers, their page manager, and DeepSpeed client-optimizer registration."""
from .adamw import AdamW8bit, PagedAdamW, PagedAdamW8bit, udynamic_code
from .deepspeed_registration import (OPTIMIZERS, deepspeed_initialize, optimizer_from_ds_config,
                                     register_with_deepspeed, split_ds_config)
from .page_manager import PageManager, PagingStats

__all__ = ["PagedAdamW", "PagedAdamW8bit", "AdamW8bit", "PageManager", "PagingStats", "OPTIMIZERS",
           "optimizer_from_ds_config", "register_with_deepspeed", "split_ds_config", "deepspeed_initialize",
           "udynamic_code"]
