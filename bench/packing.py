"""Tokens/s and step peak of padding-free packing vs padded group-by-length batches, on real corpora.

    python -m bench packing                     # SmolLM2-135M, chatterbot + chitchat, max_len 512
    python -m bench packing --quick             # tiny Llama, 48 chatterbot examples (smoke test)

The same examples (a fixed random sample of each corpus, response-only labels, truncated to ``--max-len``) are
trained on once per mode, each mode in its own subprocess: ``padded`` — ``GroupByLengthBatches`` of
``--batch`` examples, right-padded to a multiple of 16 (finetune's defaults); ``packed`` — rows of ``--max-len``
tokens from ``qlora_ds.data.packing``, ``--rows`` rows per step (default 2), width to a multiple of 16 (as finetune
collates), attention within each example (``check_packing_supported``, as finetune). Both use the chunked loss, LoRA r 16 on every linear,
checkpointing, torch AdamW, the machine's compute dtype; one warm-up step is not timed. tokens/s counts real
(non-padding) tokens; the step peak is the resident high-water mark above the loaded model (warm-up included). chitchat needs ``pip install --no-deps chitchat-dataset`` (or ``--chitchat-path`` to its
``dataset.json``); without it that corpus is skipped.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

import torch

from bench import _train_loop as tl
from bench.common import REPO, RowWriter, default_device, describe_machine, format_table, peak_fields, rss_file

MiB = 1 << 20


def chitchat_records(path: str | None) -> list[dict] | None:
    if path is None:
        spec = importlib.util.find_spec("chitchat_dataset")
        if spec is None or not spec.submodule_search_locations:
            return None
        path = os.path.join(list(spec.submodule_search_locations)[0], "dataset.json")
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    records = []
    for conv in data.values():      # turns alternate speakers: user, assistant, user, …
        msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": " ".join(u["text"] for u in turn)}
                for i, turn in enumerate(conv["messages"])]
        if len(msgs) >= 2:
            records.append({"messages": msgs})
    return records


def corpus(name: str, chitchat_path: str | None) -> list[dict] | None:
    if name == "chatterbot":
        from qlora_ds.packaged import chatterbot_pairs
        return [{"messages": [{"role": "user", "content": p["instruction"]},
                              {"role": "assistant", "content": p["response"]}]} for p in chatterbot_pairs()]
    return chitchat_records(chitchat_path)


def worker(args) -> dict:
    from qlora_ds.data import GroupByLengthBatches, collate, tokenize_records
    from qlora_ds.data.batching import batch_tokens
    from qlora_ds.data.packing import collate_packed, pack_examples
    from qlora_ds.hardware import resolve_dtype
    from qlora_ds.inject import from_pretrained
    from qlora_ds.loss import causal_lm_loss
    from qlora_ds.nn import QLoRAConfig

    device = default_device()
    dtype = resolve_dtype("auto", device)
    tok = tl.load_tokenizer(args.model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    records = corpus(args.corpus, args.chitchat_path)
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(1234)).tolist()[:args.examples]
    examples = tokenize_records([records[i] for i in order], tok, args.max_len)
    if args.worker == "packed":
        from qlora_ds.data.packing import check_packing_supported
        from transformers import AutoConfig
        check_packing_supported(AutoConfig.from_pretrained(args.model))   # + attention per example (as finetune)
        rows = pack_examples(examples, args.max_len)
        # widths to a multiple of 16 as finetune collates them: a new width per row costs CPU kernels a new
        # shape each step (measured: packed rows at their own widths ran 1.00x of padded on chatterbot)
        batches = [collate_packed(rows[i:i + args.rows], pad, 16, args.max_len) for i in range(0, len(rows), args.rows)]
    else:
        sampler = GroupByLengthBatches([e["input_ids"].numel() for e in examples], args.batch, seed=0)
        batches = [collate([examples[i] for i in idx], pad, 16, args.max_len) for idx in sampler.epoch(0)]
    torch.manual_seed(0)
    model = from_pretrained(args.model, QLoRAConfig(r=16, alpha=16, dropout=0.0, compute_dtype=dtype),
                            torch_dtype=dtype).to(device)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step(b):
        b = {k: v.to(device) for k, v in b.items()}
        loss = causal_lm_loss(model, b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    # the peak counts from before the warm-up step: a warm-up batch that is the widest would otherwise leave its
    # memory cached (resident) and hide the mode's real peak
    before = tl.rss() if device.type == "cpu" else torch.cuda.memory_allocated()
    before_file = rss_file() if device.type == "cpu" else None
    tl.reset_peak()
    step(batches[0])                       # warm-up, not timed
    tl._sync(device)
    t0 = time.perf_counter()
    real = slots = 0
    for b in batches[1:]:
        step(b)
        real += batch_tokens(b, pad)
        slots += b["input_ids"].numel()
    tl._sync(device)
    secs = time.perf_counter() - t0
    peak = tl.peak_rss() if device.type == "cpu" else tl.cuda_peak()
    # the anonymous part of that peak (file-backed pages resident at the end taken out, as of ``before``)
    anon = peak_fields("peak", peak) if device.type == "cpu" else {}
    anon_step = (anon["peak_anon"] - (before - before_file)
                 if anon.get("peak_anon") is not None and before_file is not None else None)
    return {"corpus": args.corpus, "mode": args.worker, "examples": len(examples), "steps": len(batches) - 1,
            "real_tokens": real, "token_slots": slots, "padding_fraction": 1 - real / max(slots, 1),
            "seconds": secs, "tokens_per_s": real / secs, "peak_step": peak - before,
            "peak_step_anon": anon_step, "peak_rss_file": anon.get("peak_rss_file"),
            "dtype": str(dtype).replace("torch.", ""), "batch": args.rows if args.worker == "packed" else args.batch,
            "max_len": args.max_len,
            "mean_len": sum(e["input_ids"].numel() for e in examples) / len(examples)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--model", default=None)
    p.add_argument("--corpora", nargs="*", default=["chatterbot", "chitchat"])
    p.add_argument("--chitchat-path", default=None)
    p.add_argument("--examples", type=int, default=None, help="examples per corpus (default 160; --quick 48)")
    p.add_argument("--batch", type=int, default=8, help="padded baseline's micro batch")
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--rows", type=int, default=2,
                   help="packed rows of --max-len per step (2: still below the padded baseline's peak on chatterbot)")
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--worker", choices=["padded", "packed"], help=argparse.SUPPRESS)
    p.add_argument("--corpus", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.examples is None:
        args.examples = 48 if args.quick else 160
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return 0
    from qlora_ds.hardware import resolve_dtype

    model = tl.model_path(args.quick, given=args.model)
    device = default_device()
    writer = RowWriter("packing", device, compute_dtype=resolve_dtype("auto", device))
    print(describe_machine(device), flush=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    table = []
    for name in args.corpora:
        if corpus(name, args.chitchat_path) is None:
            print(f"{name}: not installed (pip install --no-deps chitchat-dataset); skipped", flush=True)
            continue
        got = {}
        for mode in ("padded", "packed"):
            cmd = [sys.executable, "-m", "bench.packing", "--worker", mode, "--corpus", name, "--model", model,
                   "--examples", str(args.examples), "--batch", str(args.batch), "--max-len", str(args.max_len),
                   "--rows", str(args.rows)]
            if args.chitchat_path:
                cmd += ["--chitchat-path", args.chitchat_path]
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode or not lines:
                print(f"{name} {mode}: failed: {(proc.stderr or proc.stdout)[-500:]}", flush=True)
                continue
            got[mode] = json.loads(lines[-1])
            writer.write(**got[mode])
            print(json.dumps(got[mode]), flush=True)
        if len(got) == 2:
            pad, pk = got["padded"], got["packed"]
            anon = lambda r: "-" if r.get("peak_step_anon") is None else f"{r['peak_step_anon'] / MiB:.0f}"  # noqa
            table.append([name, pad["examples"], f"{pad['mean_len']:.0f}", f"{pad['tokens_per_s']:.0f}",
                          f"{pk['tokens_per_s']:.0f}", f"{pk['tokens_per_s'] / pad['tokens_per_s']:.2f}",
                          f"{pad['peak_step'] / MiB:.0f}", f"{pk['peak_step'] / MiB:.0f}", anon(pad), anon(pk),
                          f"{pad['padding_fraction']:.2f}"])
    print(format_table(["corpus", "examples", "mean len", "padded tok/s", "packed tok/s", "packed/padded",
                        "padded peak MiB", "packed peak MiB", "padded anon peak MiB", "packed anon peak MiB",
                        "padded pad frac"], table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
