"""The data of a finetune run (launch/finetune.py): records -> tokenized examples -> training / held-out split ->
this rank's batches."""
from __future__ import annotations

from typing import NamedTuple

import torch

from .batching import GroupByLengthBatches
from .records import load_records
from .tokenize import check_vocab, tokenize_records


def build_data(args, tokenizer, model_config, rank: int, world: int, micro: int) -> "Data":
    """Records (a file, or 'chatterbot') tokenized as chat with response-only labels, split into training and
    held-out examples by ``args.seed`` (the same split on every rank and on a resume), the training examples packed
    into rows with ``args.packing``, and this rank's group-by-length batches and held-out shard."""
    from ..packaged import chatterbot_pairs

    if args.dataset == "chatterbot":
        records = [{"messages": [{"role": "user", "content": p["instruction"]},
                                 {"role": "assistant", "content": p["response"]}]} for p in chatterbot_pairs()]
    else:
        records = load_records(args.dataset)
    check_vocab(tokenizer, model_config.vocab_size)
    ctx = getattr(model_config, "max_position_embeddings", None)
    examples = tokenize_records(records, tokenizer, args.max_len, ctx, args.train_on_prompt)
    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(examples), generator=g).tolist()
    n_eval = min(args.eval_size, len(examples) // 10)
    eval_ex = [examples[i] for i in order[:n_eval]]
    train_ex = [examples[i] for i in order[n_eval:]]
    if args.packing:
        from .packing import check_packing_supported, pack_examples

        check_packing_supported(model_config)
        train_ex = pack_examples(train_ex, args.max_len)
    batches = GroupByLengthBatches([e["input_ids"].numel() for e in train_ex], micro, world, rank, args.seed,
                                   group_by_length=args.group_by_length)
    return Data(train_ex, eval_ex[rank::world], n_eval, batches)


class Data(NamedTuple):
    train: list            # this run's training examples (packed rows with --packing)
    eval_shard: list       # this rank's share of the held-out examples (may be empty)
    eval_total: int        # held-out examples over all ranks: held-out runs on every rank iff this is > 0
    batches: object        # GroupByLengthBatches for this rank
