"""Chat with a base model, base + adapter, or a merged checkpoint: a quick look at what training did.

    python launch/generate.py --run runs/demo --prompt "What is AI?"
    python launch/generate.py --model DIR [--adapter DIR] --prompt "…" --sample --temperature 0.7
    python launch/generate.py --run runs/demo            # interactive (stdin a terminal); /reset, /quit

Reads top to bottom: parse arguments once, then ``generate(args)``: load (see ``qlora_ds.eval.runs``),
tokenize the prompt as training does (``qlora_ds.data.tokenize.prompt_ids``), generate greedily (default)
or by sampling, print the reply.
"""
from __future__ import annotations

import argparse
import logging
import sys

import torch

from qlora_ds.cli import add_device_args, add_model_source_args, check_model_source, run_main, source_overrides
from qlora_ds.errors import QLoRADSError

log = logging.getLogger("generate")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_source_args(p)
    p.add_argument("--prompt", action="append", help="user message (repeatable); none: interactive")
    p.add_argument("--system", help="system message")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gptq-view", choices=["exact", "kernel"], default=None,
                   help="a --format gptq export: the exact merge (default) or the kernel view that GPTQ loaders read")
    add_device_args(p)
    args = p.parse_args(argv)
    check_model_source(p, args)
    # bad numbers fail here, not inside transformers after the (slow) model load
    if args.max_new_tokens < 1:
        p.error(f"--max-new-tokens must be 1 or more, got {args.max_new_tokens}")
    if not args.repetition_penalty > 0:
        p.error(f"--repetition-penalty must be above 0 (1.0: none), got {args.repetition_penalty}")
    if args.sample:
        if not args.temperature > 0:
            p.error(f"--temperature must be above 0 with --sample, got {args.temperature}; for greedy decoding "
                    f"leave out --sample")
        if not 0 < args.top_p <= 1:
            p.error(f"--top-p must be in (0, 1] (1: off), got {args.top_p}")
        if args.top_k < 0:
            p.error(f"--top-k must be 0 (off) or more, got {args.top_k}")
    return args


@torch.no_grad()
def reply(model, tokenizer, messages: list[dict], args, plain_bos: bool = True) -> str:
    """The reply to ``messages``; it ends at the checkpoint's EOS or the turn end training taught."""
    from qlora_ds.data.tokenize import prompt_ids
    from qlora_ds.eval.sampling import stop_token_ids

    ids = torch.tensor([prompt_ids(tokenizer, messages, plain_bos)], device=next(model.parameters()).device)
    kw = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample, pad_token_id=tokenizer.pad_token_id,
              repetition_penalty=args.repetition_penalty, eos_token_id=stop_token_ids(model, tokenizer))
    if args.sample:
        kw.update(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
        # seeded here, not only before the load (which draws random numbers): the same seed samples the same
        # reply from base + adapter and from its merge, and for a prompt asked alone or after others
        torch.manual_seed(args.seed)
    else:
        kw.update(temperature=None, top_p=None, top_k=None)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def generate(args) -> list[str]:
    from qlora_ds.eval.runs import load, resolve, tokenization
    from qlora_ds.hardware import resolve_device, resolve_dtype

    torch.manual_seed(args.seed)
    source = resolve(run=args.run, model=args.model, adapter=args.adapter, no_adapter=args.no_adapter,
                     **source_overrides(args))
    device = resolve_device(args.device)
    model, tokenizer = load(source, dtype=resolve_dtype(args.dtype, device), device=device, gptq_view=args.gptq_view)
    system = [{"role": "system", "content": args.system}] if args.system else []
    bos = tokenization(source).get("plain_bos", True)
    answers = []
    if args.prompt:
        for prompt in args.prompt:
            answers.append(reply(model, tokenizer, system + [{"role": "user", "content": prompt}], args, bos))
            sys.stdout.write(f"### User: {prompt}\n### Assistant: {answers[-1]}\n\n")
        return answers
    if not sys.stdin.isatty():
        raise QLoRADSError("no --prompt given and stdin is not a terminal; pass --prompt \"…\"")
    history: list[dict] = []
    log.info("interactive chat: empty line or /quit to stop, /reset to forget the conversation")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if line in ("", "/quit", "/exit"):
            break
        if line == "/reset":
            history = []
            continue
        history.append({"role": "user", "content": line})
        answer = reply(model, tokenizer, system + history, args, bos)
        history.append({"role": "assistant", "content": answer})
        sys.stdout.write(f"bot> {answer}\n")
        answers.append(answer)
    return answers


def main(argv=None) -> int:
    return run_main(generate, parse_args, argv)

if __name__ == "__main__":
    sys.exit(main())
