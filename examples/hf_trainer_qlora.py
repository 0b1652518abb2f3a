"""QLoRA through a plain Hugging Face ``Trainer`` with ``--deepspeed``: qlora-ds as a drop-in.

    DS_ACCELERATOR=cpu deepspeed --num_accelerators 2 examples/hf_trainer_qlora.py \
        --deepspeed configs/ds_cpu_demo.json --model DIR --dataset FILE --output_dir OUT --max_steps 10

All ``TrainingArguments`` flags work (``--save_steps``, ``--logging_steps``, ``--gradient_checkpointing``,
``--resume_from_checkpoint`` …). Batch sizes, clipping and the optimizer's settings default to the
ds_config's values; passing a different one is an error, as in transformers. ``--dtype auto`` (default) sets the
``--bf16``/``--fp16`` defaults for the hardware (fp32 on CPUs without native bf16) and checks the ds_config's. The adapter lands in
``OUT/adapter`` (and ``OUT/checkpoint-N/adapter``) in PEFT format.

What differs from a stock Trainer script is three lines:

    model = prepare_for_trainer(path, QLoRAConfig(...), training_args)     # 4-bit + LoRA, zero.Init under ZeRO-3
    spec = optimizer_cls_and_kwargs(ds_config, training_args)              # PagedAdamW from the ds_config
    trainer = QLoRATrainer(..., optimizer_cls_and_kwargs=spec)             # saves adapters, not the 4-bit base

TRL: ``SFTTrainer`` is a ``Trainer``; take ``qlora_trainer_class(SFTTrainer)`` and pass it the same model and
``optimizer_cls_and_kwargs`` (and no ``peft_config``: the LoRA layers are already in the model).
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field

import torch

from transformers import HfArgumentParser, TrainingArguments

from qlora_ds.data import collate, tokenize_records
from qlora_ds.data.run_data import dataset_records, model_limits, tokenizer_and_config
from qlora_ds.data.tokenize import check_vocab
from qlora_ds.distributed import shutdown
from qlora_ds.errors import QLoRADSError
from qlora_ds.integrations import (QLoRATrainer, ds_training_defaults, optimizer_cls_and_kwargs,
                                   precision_defaults, prepare_for_trainer, trainer_ds_config)
from qlora_ds.nn import QLoRAConfig

log = logging.getLogger("hf_trainer_qlora")


@dataclass
class ModelDataArguments:
    model: str = field(metadata={"help": "Hugging Face checkpoint dir (safetensors)"})
    dataset: str = field(metadata={"help": "JSON/JSONL/TXT file of instruction/response pairs, chats or text; or "
                                           "'chatterbot' (the packaged corpus)"})
    max_len: int = field(default=512, metadata={"help": "tokens per example (longer ones are truncated)"})
    lora_r: int = field(default=64)
    lora_alpha: float = field(default=16)
    lora_dropout: float = field(default=0.1)
    quant_type: str = field(default="nf4", metadata={"help": "nf4 | fp4"})
    quantize_experts: bool = field(default=True, metadata={"help": "MoE models: the fused experts in 4 bit too "
                                                                   "(frozen); --quantize_experts false: 16-bit"})
    lora_experts: bool = field(default=False, metadata={"help": "MoE models: LoRA on the 4-bit experts too (PEFT's "
                                                                "target_parameters; needs --lora_dropout 0)"})
    dtype: str = field(default="auto", metadata={"help": "auto | bf16 | fp16 | fp32: the defaults of --bf16/--fp16 "
                                                         "(auto: bf16 where native, fp16 on older GPUs, else fp32)"})


def parse(argv=None) -> tuple[ModelDataArguments, TrainingArguments, str | None]:
    """(model/data arguments, training arguments, the --deepspeed config as given — with its optimizer section)."""
    parser = HfArgumentParser((ModelDataArguments, TrainingArguments))
    first, _ = parser.parse_known_args(argv)
    ds_config = None
    parser.set_defaults(**precision_defaults(first.dtype))     # --bf16/--fp16 from the hardware's choice
    if first.deepspeed:
        # the ds_config's batch sizes, clipping and lr become the defaults (its bf16/fp16 sections must agree with
        # the dtype); the optimizer section (PagedAdamW, which DeepSpeed cannot build) is taken out of the config
        parser.set_defaults(**ds_training_defaults(first.deepspeed, first.dtype))
        ds_config, _ = trainer_ds_config(first.deepspeed)
    if not torch.cuda.is_available():
        parser.set_defaults(use_cpu=True)     # transformers refuses bf16 without a GPU unless use_cpu is set
    values = vars(parser.parse_args(argv))
    if ds_config is not None:
        values["deepspeed"] = ds_config
    data_args, training_args = parser.parse_dict(values)
    return data_args, training_args, first.deepspeed


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    data_args, training_args, ds_source = parse(argv)
    try:
        return train(data_args, training_args, ds_source)
    except QLoRADSError as err:                           # bad input: one line per rank, no traceback
        log.error("%s", err)
        shutdown()
        return 2


def train(data_args, training_args, ds_source) -> int:
    # the data before the model (minutes for a large one): a bad dataset fails in seconds
    tokenizer, model_config = tokenizer_and_config(data_args.model)
    vocab, ctx = model_limits(model_config)
    check_vocab(tokenizer, vocab)
    examples = tokenize_records(dataset_records(data_args.dataset), tokenizer, data_args.max_len, ctx)
    config = QLoRAConfig(quant_type=data_args.quant_type, r=data_args.lora_r, alpha=data_args.lora_alpha,
                         dropout=data_args.lora_dropout, compute_dtype="auto",
                         quantize_experts=data_args.quantize_experts, lora_experts=data_args.lora_experts)
    model = prepare_for_trainer(data_args.model, config, training_args)    # computes in --bf16/--fp16/fp32

    # PagedAdamW from the ds_config's optimizer section (None: the Trainer's --optim, or DeepSpeed's own optimizer)
    spec = optimizer_cls_and_kwargs(ds_source, training_args) if ds_source else None
    trainer = QLoRATrainer(model=model, args=training_args, train_dataset=examples, processing_class=tokenizer,
                           data_collator=lambda batch: collate(batch, tokenizer.pad_token_id, pad_to_multiple_of=16,
                                                               max_width=data_args.max_len),
                           optimizer_cls_and_kwargs=spec)
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()                                  # -> output_dir/adapter (PEFT format)
    if training_args.should_save:
        opt = trainer.optimizer
        while hasattr(opt, "optimizer"):                  # accelerate wrapper -> DeepSpeed ZeRO -> ours
            opt = opt.optimizer
        log.info("optimizer: %s", type(opt).__name__)
        log.info("train loss %.4f after %d steps; adapter: %s", result.training_loss, result.global_step,
                 os.path.join(training_args.output_dir, "adapter"))
    del trainer, model
    shutdown()                                            # avoids gloo's SIGABRT at exit
    return 0


if __name__ == "__main__":
    sys.exit(main())
