"""The data of a finetune run (launch/finetune.py): records -> tokenized examples -> training / held-out split ->
this rank's batches."""
from __future__ import annotations

import argparse
import hashlib
import logging
from collections.abc import Sequence
from typing import NamedTuple

import torch

from ..errors import QLoRADSError
from .batching import GroupByLengthBatches
from .examples import Examples
from .records import load_records
from .tokenize import check_vocab, tokenize_records

log = logging.getLogger(__name__)


def tokenizer_and_config(model_dir: str):
    """(tokenizer, ``AutoConfig``) of a checkpoint, all ``build_data`` needs of it: finetune builds the data before
    loading the model (minutes for 65B), so a bad dataset fails in seconds. The tokenizer pads with EOS where it has
    no pad token."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, AutoConfig.from_pretrained(model_dir)


def model_limits(model_config) -> tuple[int, int | None]:
    """(vocabulary size, context length) of a model's config: the text model's for a composite config (Gemma 3, Llava,
    Mistral 3: ``AutoConfig`` of such a checkpoint has neither at its top level)."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    vocab = getattr(text, "vocab_size", None) or getattr(model_config, "vocab_size", None)
    if vocab is None:
        raise QLoRADSError(f"the model's config ({getattr(model_config, 'model_type', None)!r}) gives no vocab_size to "
                           f"check the tokenizer against; give a checkpoint whose config.json has one")
    ctx = getattr(text, "max_position_embeddings", None) or getattr(model_config, "max_position_embeddings", None)
    return vocab, ctx


def build_data(args, tokenizer, model_config, rank: int, world: int, micro: int) -> "Data":
    """Records (a file, or 'chatterbot') tokenized as chat with response-only labels, without repeats (``args.dedup``),
    split into training and held-out examples by ``args.seed`` (the same split on every rank and on a resume), the
    training examples packed into rows with ``args.packing``, and this rank's group-by-length batches and held-out
    shard. ``model_config``: the checkpoint's (``tokenizer_and_config``) or the loaded model's config."""
    records = dataset_records(args.dataset)
    vocab, ctx = model_limits(model_config)
    check_vocab(tokenizer, vocab)
    # False: a run from before the option, resumed with its own tokenization
    examples = tokenize_records(records, tokenizer, args.max_len, ctx, args.train_on_prompt,
                                getattr(args, "plain_bos", True), getattr(args, "text_windows", True),
                                getattr(args, "weight0_untrained", True))
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
    batches = GroupByLengthBatches(train_ex.lengths().tolist(), micro, world, rank, args.seed,
                                   group_by_length=args.group_by_length)
    return Data(train_ex, eval_ex[rank::world], len(eval_ex), batches)


def add_data_arguments(group) -> None:
    """finetune's options of how records become examples (each recorded in run_config.json, so a resumed run keeps
    its first run's examples, split and order)."""
    group.add_argument("--train-on-prompt", action="store_true",
                       help="also train on prompt tokens (answers marked \"weight\": 0 stay untrained)")
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
    group.add_argument("--weight0-untrained", action=argparse.BooleanOptionalAction, default=True,
                       help="with --train-on-prompt, still leave the answers marked \"weight\": 0 untrained "
                            "(--no-weight0-untrained: runs from before this option, which trained them)")


def dataset_records(dataset: str) -> list[dict]:
    """The records of ``dataset``: a .jsonl/.json/.txt file, or "chatterbot" (the packaged corpus, as chats)."""
    if dataset != "chatterbot":
        return load_records(dataset)
    from ..packaged import chatterbot_pairs
    return [{"messages": [{"role": "user", "content": p["instruction"]},
                          {"role": "assistant", "content": p["response"]}]} for p in chatterbot_pairs()]


def split_heldout(examples: Sequence, eval_size: int, seed: int, dedup: bool = True,
                  heldout_groups: bool = True) -> tuple[Sequence, Sequence, int]:
    """(held-out, training, duplicates left out), as ``Examples`` for ``Examples`` (else lists of the given dicts): up
    to ``eval_size`` (at most a tenth) of the examples held out by a ``seed`` permutation of units, each held out or
    trained on whole so that no held-out target is trained on: an example; the windows of one long text (the same
    ``record``: a held-out window beside trained windows of its text would be half seen); the chats that open alike
    (the same ``opening``: a conversation stored once per turn, or per branch, trains a held-out turn's answer in its
    later records). ``dedup`` first keeps only the first of the examples with the same input_ids.

    Where no unit fits (a .txt of one to a few long texts, each more than a tenth of all windows), the last windows of
    the texts are held out instead: only then does a text straddle the split, its held-out windows after its trained
    ones with one shared token that is never a held-out target. ``heldout_groups=False``: the split of runs from before
    --heldout-groups (no units of chats, no text tails); ``dedup=False``: that of runs from before --dedup."""
    n = len(examples)
    source = examples if isinstance(examples, Examples) else _Dicts(examples)
    kept = range(n)
    if dedup:
        first: dict = {}
        for k in range(n):      # keyed by a digest: a tuple of Python ints would take as much memory again
            first.setdefault(hashlib.blake2b(source.token_bytes(k), digest_size=16).digest(), k)
        kept = list(first.values())             # in order of first occurrence
    groups: dict = {}                           # one group per example, windowed record or chat opening
    for k in kept:
        groups.setdefault(source.unit(k, heldout_groups) or k, []).append(k)
    units = list(groups.values())
    order = torch.randperm(len(units), generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = min(eval_size, len(kept) // 10)
    held, train = [], []
    for i in order:         # a group that would overshoot n_eval trains (single examples: the first n_eval held out)
        (held if len(held) + len(units[i]) <= n_eval else train).extend(units[i])
    if heldout_groups and n_eval and not held:
        texts = [source.unit(u[0], heldout_groups=False) is not None for u in units]    # the windows of a text
        held, train = _text_tails(units, texts, order, n_eval)
    if eval_size > 0 and not held:
        log.warning("no held-out examples although --eval-size %d: %s; no held-out loss and no best checkpoint this "
                    "run", eval_size, f"{len(kept)} examples (a tenth at most is held out)" if n_eval == 0 else
                    f"the {len(kept)} examples form {len(units)} units held out whole (the windows of a text, the "
                    f"chats that open alike), each more than a tenth of them; give more texts or chats")
    return source.take(held), source.take(train), n - len(kept)


class _Dicts:
    """What ``split_heldout`` reads of ``Examples``, of examples given as dicts (built in code); its split holds the
    same objects."""

    def __init__(self, examples: list):
        self.examples = examples

    def token_bytes(self, k: int) -> bytes:
        return self.examples[k]["input_ids"].numpy().tobytes()

    def unit(self, k: int, heldout_groups: bool = True):
        e = self.examples[k]
        if "record" in e:
            return "record", e["record"]
        return ("opening", e["opening"]) if heldout_groups and "opening" in e else None

    def take(self, index) -> list:
        return [self.examples[k] for k in index]


def _text_tails(units: list, texts: list, order: list, n_eval: int) -> tuple[list, list]:
    """(held-out, training) where every unit is larger than ``n_eval``: the last windows of the texts (the units
    where ``texts``), about ``n_eval`` in all, shared among the texts (in ``order``) by their number of windows."""
    windows = sum(len(u) for u, text in zip(units, texts) if text)
    held, train = [], []
    for i in order:
        unit, take = units[i], 0
        if texts[i] and len(held) < n_eval:
            take = min(n_eval - len(held), max(1, n_eval * len(unit) // windows), len(unit) - 1)
        train.extend(unit[:len(unit) - take])
        held.extend(unit[len(unit) - take:])
    return held, train


class Data(NamedTuple):
    train: Sequence        # this run's training examples (Examples; PackedRows with --packing)
    eval_shard: Sequence   # this rank's share of the held-out examples (Examples; may be empty)
    eval_total: int        # held-out examples over all ranks: held-out runs on every rank iff this is > 0
    batches: object        # GroupByLengthBatches for this rank
