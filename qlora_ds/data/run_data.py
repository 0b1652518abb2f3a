"""The data of a finetune run (launch/finetune.py): records -> tokenized examples -> training / held-out split ->
this rank's batches."""
from __future__ import annotations

import argparse
import hashlib
import logging
from typing import NamedTuple

import torch

from .batching import GroupByLengthBatches
from .records import load_records
from .tokenize import check_vocab, tokenize_records

log = logging.getLogger(__name__)


def build_data(args, tokenizer, model_config, rank: int, world: int, micro: int) -> "Data":
    """Records (a file, or 'chatterbot') tokenized as chat with response-only labels, without repeats (``args.dedup``),
    split into training and held-out examples by ``args.seed`` (the same split on every rank and on a resume), the
    training examples packed into rows with ``args.packing``, and this rank's group-by-length batches and held-out
    shard."""
    records = dataset_records(args.dataset)
    check_vocab(tokenizer, model_config.vocab_size)
    ctx = getattr(model_config, "max_position_embeddings", None)
    # False: a run from before the option, resumed with its own tokenization
    examples = tokenize_records(records, tokenizer, args.max_len, ctx, args.train_on_prompt,
                                getattr(args, "plain_bos", True), getattr(args, "text_windows", True))
    dedup = getattr(args, "dedup", True)      # False: a run from before --dedup, resumed with its own split
    eval_ex, train_ex, dropped = split_heldout(examples, args.eval_size, args.seed, dedup,
                                               getattr(args, "heldout_groups", True))
    if dropped and rank == 0:
        log.info("left out %d of %d examples whose tokens repeat an earlier example's (the held-out examples would "
                 "otherwise be in training too)", dropped, len(examples))
    if args.packing:
        from .packing import check_packing_supported, pack_examples

        check_packing_supported(model_config)
        train_ex = pack_examples(train_ex, args.max_len)
    batches = GroupByLengthBatches([e["input_ids"].numel() for e in train_ex], micro, world, rank, args.seed,
                                   group_by_length=args.group_by_length)
    return Data(train_ex, eval_ex[rank::world], len(eval_ex), batches)


def add_data_arguments(group) -> None:
    """finetune's options of how records become examples (each recorded in run_config.json, so a resumed run keeps
    its first run's examples, split and order)."""
    group.add_argument("--train-on-prompt", action="store_true", help="also train on prompt tokens")
    group.add_argument("--dedup", action=argparse.BooleanOptionalAction, default=True,
                       help="leave out examples whose tokens repeat an earlier one's before the held-out split, so no "
                            "held-out example is trained on (--no-dedup: runs from before this option)")
    group.add_argument("--heldout-groups", action=argparse.BooleanOptionalAction, default=True,
                       help="hold out chats that open alike (a conversation stored once per turn) together, and the "
                            "last windows of texts when no whole text fits the held-out share (--no-heldout-groups: "
                            "runs from before this option)")
    group.add_argument("--plain-bos", action=argparse.BooleanOptionalAction, default=True,
                       help="without a chat template (the '### Role:' format of base checkpoints), start each example "
                            "with the tokenizer's own leading tokens (BOS for Llama / Mistral), as pretraining and "
                            "text records did (--no-plain-bos: runs from before this option)")
    group.add_argument("--text-windows", action=argparse.BooleanOptionalAction, default=True,
                       help="split a text record longer than --max-len into --max-len windows (overlapping by one "
                            "token) instead of cutting it (--no-text-windows: runs from before this option)")


def dataset_records(dataset: str) -> list[dict]:
    """The records of ``dataset``: a .jsonl/.json/.txt file, or "chatterbot" (the packaged corpus, as chats)."""
    if dataset != "chatterbot":
        return load_records(dataset)
    from ..packaged import chatterbot_pairs
    return [{"messages": [{"role": "user", "content": p["instruction"]},
                          {"role": "assistant", "content": p["response"]}]} for p in chatterbot_pairs()]


def split_heldout(examples: list, eval_size: int, seed: int, dedup: bool = True,
                  heldout_groups: bool = True) -> tuple[list, list, int]:
    """(held-out, training, duplicates left out): up to ``eval_size`` (at most a tenth) of the examples held out by
    a ``seed`` permutation of units, each held out or trained on whole so that no held-out target is trained on: an
    example; the windows of one long text (the same ``record``: a held-out window beside trained windows of its text
    would be half seen); the chats that open alike (the same ``opening``: a conversation stored once per turn, or per
    branch, trains a held-out turn's answer in its later records). ``dedup`` first keeps only the first of the
    examples with the same input_ids.

    Where no unit fits (a .txt of one to a few long texts, each more than a tenth of all windows), the last windows of
    the texts are held out instead: only then does a text straddle the split, its held-out windows after its trained
    ones with one shared token that is never a held-out target. ``heldout_groups=False``: the split of runs from before
    --heldout-groups (no units of chats, no text tails); ``dedup=False``: that of runs from before --dedup."""
    n = len(examples)
    if dedup:
        first = {}
        for e in examples:      # keyed by a digest: a tuple of Python ints would take as much memory again
            first.setdefault(hashlib.blake2b(e["input_ids"].numpy().tobytes(), digest_size=16).digest(), e)
        examples = list(first.values())         # in order of first occurrence
    groups: dict = {}                           # one group per example, windowed record or chat opening
    for k, e in enumerate(examples):
        key = (("record", e["record"]) if "record" in e else
               ("opening", e["opening"]) if heldout_groups and "opening" in e else k)
        groups.setdefault(key, []).append(e)
    units = list(groups.values())
    order = torch.randperm(len(units), generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = min(eval_size, len(examples) // 10)
    held, train = [], []
    for i in order:         # a group that would overshoot n_eval trains (single examples: the first n_eval held out)
        (held if len(held) + len(units[i]) <= n_eval else train).extend(units[i])
    if heldout_groups and n_eval and not held:
        held, train = _text_tails(units, order, n_eval)
    if eval_size > 0 and not held:
        log.warning("no held-out examples although --eval-size %d: %s; no held-out loss and no best checkpoint this "
                    "run", eval_size, f"{len(examples)} examples (a tenth at most is held out)" if n_eval == 0 else
                    f"the {len(examples)} examples form {len(units)} units held out whole (the windows of a text, the "
                    f"chats that open alike), each more than a tenth of them; give more texts or chats")
    return held, train, n - len(examples)


def _text_tails(units: list, order: list, n_eval: int) -> tuple[list, list]:
    """(held-out, training) where every unit is larger than ``n_eval``: the last windows of the texts, about
    ``n_eval`` in all, shared among the texts (in ``order``) by their number of windows."""
    windows = sum(len(u) for u in units if "record" in u[0])
    held, train = [], []
    for i in order:
        unit, take = units[i], 0
        if "record" in unit[0] and len(held) < n_eval:
            take = min(n_eval - len(held), max(1, n_eval * len(unit) // windows), len(unit) - 1)
        train.extend(unit[:len(unit) - take])
        held.extend(unit[len(unit) - take:])
    return held, train


class Data(NamedTuple):
    train: list            # this run's training examples (packed rows with --packing)
    eval_shard: list       # this rank's share of the held-out examples (may be empty)
    eval_total: int        # held-out examples over all ranks: held-out runs on every rank iff this is > 0
    batches: object        # GroupByLengthBatches for this rank
