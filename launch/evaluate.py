"""Held-out loss / perplexity and MMLU-format multiple-choice accuracy of a model, base + adapter, or a merge.

    python launch/evaluate.py --run runs/demo --heldout data/val.jsonl
    python launch/evaluate.py --model DIR [--adapter DIR] --mc mmlu/test.jsonl --mc-dev mmlu/dev.jsonl --shots 5
    … --json results.json       # also write the results

Reads top to bottom: parse arguments once, then ``evaluate(args)``: load (``qlora_ds.eval.runs``),
perplexity over the held-out records (tokenized as training does: chat template, response-only
labels), multiple-choice accuracy (k-shot prompts, scored by the logits of " A"…" D"), then print
the results as JSON (and write them to --json). A ``--format gptq`` export is scored as its exact merge unless
``--gptq-view kernel``; the results say which (``gptq_view``).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from qlora_ds.cli import add_device_args, add_model_source_args, check_model_source, run_main, source_overrides

log = logging.getLogger("evaluate")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_source_args(p)
    p.add_argument("--heldout", help="records file (.jsonl/.json/.txt, as for finetune --dataset)")
    p.add_argument("--max-len", type=int, default=None,
                   help="truncation, as finetune --max-len (default: the run's with --run, else 512 or the model's "
                        "context if shorter)")
    p.add_argument("--train-on-prompt", action=argparse.BooleanOptionalAction, default=None,
                   help="score prompt tokens too (default: the run's setting with --run, else off)")
    p.add_argument("--mc", help="multiple-choice questions (.jsonl or MMLU .csv)")
    p.add_argument("--mc-dev", help="dev split for the k-shot examples")
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--gptq-view", choices=["exact", "kernel"], default=None,
                   help="a --format gptq export: score the exact merge (default; qlora_ds_intn.safetensors' fp32 "
                        "scales/zeros) or the kernel view that GPTQ loaders read (integer zeros, fp16 scales)")
    add_device_args(p)
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    check_model_source(p, args)
    if not args.heldout and not args.mc:
        p.error("nothing to evaluate: pass --heldout FILE and/or --mc FILE")
    # bad numbers and a missing dev split fail here, not after the (slow) model load
    for name, value, low in (("shots", args.shots, 0), ("batch_size", args.batch_size, 1),
                             ("max_len", args.max_len, 2)):
        if value is not None and value < low:
            p.error(f"--{name.replace('_', '-')} must be {low} or more, got {value}")
    if args.mc and args.shots and not args.mc_dev:
        p.error(f"--mc with --shots {args.shots} (default 5) takes its examples from a dev split: pass --mc-dev FILE, "
                f"or --shots 0")
    return args


def evaluate(args) -> dict:
    from qlora_ds.atomic import atomic_write_text
    from qlora_ds.eval import evaluate_mc, heldout_loss, load_mc
    from qlora_ds.eval.runs import load, resolve, scored_gptq_view, tokenization
    from qlora_ds.hardware import dtype_name, resolve_device, resolve_dtype

    source = resolve(run=args.run, model=args.model, adapter=args.adapter, no_adapter=args.no_adapter,
                     **source_overrides(args))
    test = load_mc(args.mc) if args.mc else None             # bad files fail before the model loads
    dev = load_mc(args.mc_dev) if args.mc and args.mc_dev else None
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    view = scored_gptq_view(source, args.gptq_view)
    model, tokenizer = load(source, dtype=dtype, device=device, gptq_view=args.gptq_view)
    results: dict = {"model": source.model, "adapter": None if source.base_only else source.adapter,
                     "device": str(device), "dtype": dtype_name(dtype)}
    if view is not None:
        results["gptq_view"] = view
    if source.base_only:
        results["quantized_base_of"] = source.adapter or args.run
    if args.heldout:
        # a run's own --max-len and --train-on-prompt unless given here: its held-out loss is then the run's
        max_len = args.max_len if args.max_len is not None else source.settings.get("max_len")
        on_prompt = args.train_on_prompt if args.train_on_prompt is not None else \
            bool(source.settings.get("train_on_prompt", False))
        results["heldout"] = heldout_loss(model, tokenizer, args.heldout, max_len, args.batch_size, on_prompt,
                                          **tokenization(source))
        log.info("held-out loss %.4f, perplexity %.3f over %d tokens", results["heldout"]["loss"],
                 results["heldout"]["perplexity"], results["heldout"]["tokens"])
    if test is not None:
        mc = evaluate_mc(model, tokenizer, test, dev, shots=args.shots, batch_size=args.batch_size,
                         max_len=args.max_len)
        results["multiple_choice"] = {"file": os.path.abspath(args.mc), **mc}
        log.info("multiple choice (%d-shot): accuracy %.4f (%d/%d), macro over %d subjects %.4f", args.shots,
                 mc["accuracy"], mc["correct"], mc["total"], len(mc["subjects"]), mc["macro_accuracy"])
    text = json.dumps(results, indent=2)
    sys.stdout.write(text + "\n")
    if args.json:
        atomic_write_text(args.json, text + "\n")
    return results


def main(argv=None) -> int:
    return run_main(evaluate, parse_args, argv)

if __name__ == "__main__":
    sys.exit(main())
