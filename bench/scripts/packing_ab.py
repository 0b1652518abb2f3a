"""Packed rows against padded group-by-length batches in one process: the same model, the same examples, the two
alternated in rounds, real (non-padding) tokens per second of fwd+bwd (no optimizer). Cross-process figures
(``python -m bench packing``) drift by ±10% on a shared 2-core box; this A/B takes that drift out of the ratio
(bench/RESULTS.md, "Packing"):

    python bench/scripts/packing_ab.py --corpus chitchat --chitchat-path …/dataset.json --examples 96 --rows 4
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", choices=["chatterbot", "chitchat"], default="chatterbot")
    ap.add_argument("--chitchat-path", default=None)
    ap.add_argument("--examples", type=int, default=160)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--rows", type=int, default=2, help="packed rows per step")
    ap.add_argument("--batch", type=int, default=8, help="padded examples per step")
    ap.add_argument("--steps", type=int, default=3, help="steps of each kind per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny Llama (smoke test)")
    args = ap.parse_args()

    from bench import _train_loop as tl
    from bench.common import default_device, describe_machine
    from bench.packing import corpus
    from qlora_ds.data import GroupByLengthBatches, collate, tokenize_records
    from qlora_ds.data.batching import batch_tokens
    from qlora_ds.data.packing import check_packing_supported, collate_packed, pack_examples
    from qlora_ds.hardware import resolve_dtype
    from qlora_ds.inject import from_pretrained
    from qlora_ds.loss import causal_lm_loss
    from qlora_ds.nn import QLoRAConfig
    from transformers import AutoConfig

    device = default_device()
    dtype = resolve_dtype("auto", device)
    print(describe_machine(device) + f"; compute {str(dtype).replace('torch.', '')}", flush=True)
    model_path = tl.model_path(args.quick)
    tok = tl.load_tokenizer(model_path)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    records = corpus(args.corpus, args.chitchat_path)
    if records is None:
        sys.exit("chitchat: not installed (pip install --no-deps chitchat-dataset) and no --chitchat-path")
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(1234)).tolist()[:args.examples]
    examples = tokenize_records([records[i] for i in order], tok, args.max_len)
    check_packing_supported(AutoConfig.from_pretrained(model_path))
    rows = pack_examples(examples, args.max_len)
    packed = [collate_packed(rows[i:i + args.rows], pad, 16, args.max_len) for i in range(0, len(rows), args.rows)]
    sampler = GroupByLengthBatches([e["input_ids"].numel() for e in examples], args.batch, seed=0)
    padded = [collate([examples[i] for i in idx], pad, 16, args.max_len) for idx in sampler.epoch(0)]
    torch.manual_seed(0)
    model = from_pretrained(model_path, QLoRAConfig(r=16, alpha=16, dropout=0.0, compute_dtype=dtype),
                            torch_dtype=dtype).to(device)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()

    def ms_per_token(batches) -> float:
        t0, real = time.perf_counter(), 0
        for b in batches:
            causal_lm_loss(model, {k: v.to(device) for k, v in b.items()}).backward()
            real += batch_tokens(b, pad)
        model.zero_grad(set_to_none=True)
        return (time.perf_counter() - t0) / real * 1e3

    n = args.steps
    ms_per_token(packed[:1]), ms_per_token(padded[:1])                    # warm-up: kernels, shapes
    got = {"packed": [], "padded": []}
    for r in range(args.rounds):
        # a different slice each round (wrapping), the order flipped every round
        pk = [packed[(r * n + i) % len(packed)] for i in range(n)]
        pd = [padded[(r * n + i) % len(padded)] for i in range(n)]
        for name, batches in (("packed", pk), ("padded", pd)) if r % 2 == 0 else (("padded", pd), ("packed", pk)):
            got[name].append(ms_per_token(batches))
        print(f"round {r}: packed {got['packed'][-1]:.3f} ms/token, padded {got['padded'][-1]:.3f} ms/token",
              flush=True)
    ratio = statistics.median(b / a for a, b in zip(got["packed"], got["padded"]))
    print(f"{args.corpus}, {args.examples} examples, {args.rows} packed rows vs {args.batch} padded per step: "
          f"packed/padded tokens per s {ratio:.2f} (median of {args.rounds} rounds)")


if __name__ == "__main__":
    main()
