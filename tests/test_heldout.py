"""The held-out loss of a distributed run (qlora_ds.eval.sharded): token-weighted over examples, batched by length."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from qlora_ds.data import collate
from qlora_ds.eval.sharded import sharded_heldout_loss
from qlora_ds.loss import causal_lm_loss

from .tiny_models import VOCAB, tiny_model


class _Engine(torch.nn.Module):
    """What sharded_heldout_loss needs of a DeepSpeed engine: the call, .module, .device, eval()/train()."""

    def __init__(self, model):
        super().__init__()
        self.module, self.device = model, torch.device("cpu")

    def forward(self, **kw):
        return self.module(**kw)


def _example(n: int, prompt: int, g: torch.Generator) -> dict:
    ids = torch.randint(1, VOCAB, (n,), generator=g)
    labels = ids.clone()
    labels[:prompt] = -100                      # response-only: the prompt has no target
    return {"input_ids": ids, "labels": labels}


@pytest.mark.parametrize("chunked", [True, False])
def test_heldout_loss_is_token_weighted_and_batched_by_length(tmp_path, chunked):
    g = torch.Generator().manual_seed(0)
    examples = [_example(n, 2, g) for n in (17, 3, 16, 4, 15, 5)]
    model = tiny_model("llama")
    engine = _Engine(model)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        loss, widths = sharded_heldout_loss(engine, examples, 0, 2, chunked=chunked)
    finally:
        dist.destroy_process_group()
    # each example alone, weighted by its targets: padding and batching change nothing
    with torch.no_grad():
        per = [(causal_lm_loss(model, collate([e], 0)).item(), int((e["labels"][1:] != -100).sum()))
               for e in examples]
    want = sum(l * n for l, n in per) / sum(n for _, n in per)
    assert loss == pytest.approx(want, rel=1e-5)
    # batches of similar lengths: (3, 4), (5, 15), (16, 17), not the given order's (17, 3), (16, 4), (15, 5)
    assert widths == {4, 15, 17}
    assert engine.training                      # handed back in training mode


def _ids(*seqs) -> list[dict]:
    return [{"input_ids": torch.tensor(s), "labels": torch.tensor(s)} for s in seqs]


def test_split_leaves_out_repeated_examples_before_holding_out():
    """Examples with the same tokens: only the first is kept, so no held-out example is also a training example
    (without this, 33 of the 64 held-out examples of the packaged chatterbot data were)."""
    from qlora_ds.data.run_data import split_heldout
    examples = _ids(*[[1, 2, i % 25] for i in range(75)])            # 25 distinct, each 3 times
    held, train, dropped = split_heldout(examples, 64, seed=42)
    assert dropped == 50 and len(held) == 2 and len(train) == 23
    keys = [tuple(e["input_ids"].tolist()) for e in held + train]
    assert len(set(keys)) == 25 and {k[2] for k in keys} == set(range(25))
    assert all(any(e is f for f in examples[:25]) for e in held + train)   # the first of each, deterministically
    again, _, _ = split_heldout(examples, 64, seed=42)
    assert [e["input_ids"].tolist() for e in again] == [e["input_ids"].tolist() for e in held]


def test_split_without_dedup_is_the_split_of_runs_from_before_it():
    """dedup=False (a run from before --dedup, resumed): its held-out examples are the ones it was evaluated on."""
    from qlora_ds.data.run_data import split_heldout
    examples = _ids(*[[1, i % 7] for i in range(40)])
    held, train, dropped = split_heldout(examples, 64, seed=3, dedup=False)
    order = torch.randperm(40, generator=torch.Generator().manual_seed(3)).tolist()
    assert dropped == 0 and [id(e) for e in held] == [id(examples[i]) for i in order[:4]]
    assert [id(e) for e in train] == [id(examples[i]) for i in order[4:]]


def test_build_data_held_out_examples_are_not_trained_on(tmp_path, caplog):
    """A dataset with repeated records, through the run's data path: no held-out example is in training, on any
    rank, and the number left out is logged."""
    import json
    import logging
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from qlora_ds.data.run_data import build_data

    from .finetune_fixtures import CHAT_PAIRS, save_word_level_tokenizer
    vocab = save_word_level_tokenizer(CHAT_PAIRS, str(tmp_path / "tok"))
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    questions = [q for q, _ in CHAT_PAIRS]
    records = [{"instruction": f"{a} {b} {c}", "response": CHAT_PAIRS[k][1]}
               for k, a in enumerate(questions) for b in questions for c in questions]        # 64 distinct
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records * 2))
    args = SimpleNamespace(dataset=str(tmp_path / "data.jsonl"), max_len=64, train_on_prompt=False, seed=42,
                           eval_size=64, packing=False, group_by_length=True)
    cfg = SimpleNamespace(vocab_size=vocab, max_position_embeddings=256, model_type="llama")
    with caplog.at_level(logging.INFO, logger="qlora_ds.data.run_data"):
        shards = [build_data(args, tok, cfg, rank, 2, 1) for rank in range(2)]
    train = {tuple(e["input_ids"].tolist()) for e in shards[0].train}
    held = [tuple(e["input_ids"].tolist()) for d in shards for e in d.eval_shard]
    assert not train & set(held)
    assert shards[0].eval_total == 6 and len(held) == 6 and len(train) == len(shards[0].train) == 58
    assert "left out 64 of 128 examples whose tokens repeat" in caplog.text
