"""The shared ``main`` of the launch scripts: logging, one argument parse, and errors turned into exit codes
with a message that names the rank (so a multi-rank job says which rank failed and why); a ``--recipe`` file's
values as parser defaults, and the argument groups the inference scripts share."""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable

from .errors import QLoRADSError
from .preemption import Preempted

log = logging.getLogger("qlora_ds")


def run_main(body: Callable[[Any], Any], parse_args: Callable[[Any], Any], argv=None,
             exit_code: Callable[[Any], int] = lambda result: 0) -> int:
    """Exit 0 (or ``exit_code(result)``); 2 for bad input/config (QLoRADSError); 128 + the signal for a run stopped by
    SIGTERM / SIGUSR1 after saving its checkpoint (qlora_ds.preemption: 143 / 138, what Slurm and k8s requeue); 1 for
    any other failure."""
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    args = parse_args(argv)
    who = f"rank {os.environ['RANK']}" if "RANK" in os.environ else "qlora-ds"
    try:
        result = body(args)
    except QLoRADSError as err:
        log.error("%s: %s", who, err)
        return 2
    except Preempted as err:
        log.warning("%s: %s", who, err)
        return err.exit_code
    except Exception as err:  # noqa: BLE001 - name the rank and the cause, then fail the whole job
        log.exception("%s failed: %s: %s", who, type(err).__name__, err)
        return 1
    return exit_code(result)


# what one command does, not how a run trains: never taken from a recipe
COMMAND_ONLY = frozenset({"overwrite", "resume", "local_rank", "deepspeed", "recipe", "help"})


def read_recipe(path: str, parser) -> dict:
    """A ``--recipe`` JSON file's values as ``parser`` defaults (keys spelled as the options' dests or with dashes;
    keys starting with "_" are comments); an unknown key, or one of COMMAND_ONLY, is refused."""
    with open(path, encoding="utf-8") as fh:
        recipe = json.load(fh)
    known = {a.dest for a in parser._actions}
    values = {k.replace("-", "_"): v for k, v in recipe.items() if not k.startswith("_")}
    unknown = sorted(set(values) - known)
    if unknown:
        raise QLoRADSError(f"recipe {path} has unknown keys {unknown}; see `launch/finetune.py --help`")
    actions = sorted(set(values) & COMMAND_ONLY)
    if actions:             # a shared recipe must not delete or take over a run the user did not name on the command
        raise QLoRADSError(f"recipe {path} sets {actions}: these say what one command does, not how a run trains; "
                           f"remove them from the recipe and pass --{actions[0].replace('_', '-')} on the command line")
    return values


def add_model_source_args(parser) -> None:
    """``--run`` / ``--model`` / ``--adapter`` / ``--no-adapter`` / ``--method``: the model an inference script loads
    (``qlora_ds.eval.runs``); one of --run and --model is required (``check_model_source``)."""
    parser.add_argument("--run", help="finetune output dir (base model + adapter)")
    parser.add_argument("--model", help="base, or merged, checkpoint dir")
    parser.add_argument("--adapter", help="PEFT-format adapter dir")
    parser.add_argument("--no-adapter", action="store_true",
                        help="with --run or --adapter: the quantized base it trained on, without the adapter (the "
                             "model before training; a run still in progress has it too)")
    add_adapter_format_args(parser)


def add_adapter_format_args(parser) -> None:
    """What an adapter without qlora-ds' side file (a plain PEFT one) cannot say about the base's quantization:
    ``--method``, ``--quant-type``, ``--no-double-quant``, ``--bits``, ``--group-size``, ``--train-dtype``
    (``source_overrides``)."""
    from .hardware import DTYPE_NAMES

    q = parser.add_argument_group("for adapters without qlora-ds' side file (plain PEFT)")
    q.add_argument("--method", choices=["qlora", "qalora"])
    q.add_argument("--quant-type", choices=["nf4", "fp4"])
    q.add_argument("--no-double-quant", dest="double_quant", action="store_false", default=None)
    q.add_argument("--quantize-experts", action="store_true", default=None,
                   help="the base's MoE experts were 4-bit in training (qlora-ds finetune's default; a plain PEFT "
                        "adapter from transformers + bitsandbytes trained on 16-bit experts)")
    q.add_argument("--bits", type=int, help="QA-LoRA bits (PEFT files do not record them)")
    q.add_argument("--group-size", type=int, help="QA-LoRA group size, where the adapter has no qalora_group_size")
    q.add_argument("--train-dtype", choices=list(DTYPE_NAMES),
                   help="the --dtype the adapter was trained with, where its side file does not say (an fp16/fp32 "
                        "checkpoint's quantized base depends on it; default: the --run's dtype, else --dtype)")


def source_overrides(args) -> dict:
    """``add_adapter_format_args``' values as ``qlora_ds.eval.runs.resolve`` keywords."""
    return {"method": args.method, "quant_type": args.quant_type, "double_quant": args.double_quant,
            "quantize_experts": args.quantize_experts,
            "bits": args.bits, "group_size": args.group_size, "dtype": args.train_dtype}


def check_model_source(parser, args) -> None:
    if not args.run and not args.model:
        parser.error("pass --run DIR or --model PATH")
    if getattr(args, "no_adapter", False) and not args.run and not args.adapter:
        parser.error("--no-adapter drops the adapter of --run or --adapter (keeping the quantized base it trained on); "
                     "with --model alone leave it out")


def add_device_args(parser, dtype_default: str = "auto", dtype_help: str = "compute dtype") -> None:
    """``--device`` and ``--dtype``, shared by the inference scripts (resolved by ``qlora_ds.hardware``)."""
    from .hardware import DTYPE_CHOICES

    parser.add_argument("--device", default="auto",
                        help="auto (default: the local GPU if there is one, else cpu), cpu, cuda or cuda:N")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default=dtype_default,
                        help=f"{dtype_help}; auto: bf16 where the device computes it natively, fp16 on older "
                             f"GPUs, fp32 on CPUs without native bf16 (default {dtype_default})")
