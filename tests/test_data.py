"""Batch collation: right padding, pad-to-multiple, labels and mask of the padding."""
import torch

from qlora_ds.data import collate
from qlora_ds.data.tokenize import IGNORE


def _example(n: int, start: int = 1) -> dict:
    ids = torch.arange(start, start + n)
    return {"input_ids": ids, "labels": ids.clone()}


def test_pad_to_multiple_rounds_up_and_masks_the_padding():
    batch = collate([_example(5), _example(20, 100)], pad_id=0, pad_to_multiple_of=16)
    assert batch["input_ids"].shape == (2, 32)
    assert batch["attention_mask"].sum(1).tolist() == [5, 20]
    assert (batch["labels"][0, 5:] == IGNORE).all() and (batch["labels"][1, 20:] == IGNORE).all()
    assert torch.equal(batch["input_ids"][1, :20], torch.arange(100, 120))
    assert (batch["input_ids"][0, 5:] == 0).all()


def test_pad_to_multiple_never_exceeds_max_width_nor_cuts_an_example():
    assert collate([_example(20)], 0, pad_to_multiple_of=16, max_width=24)["input_ids"].shape == (1, 24)
    assert collate([_example(30)], 0, pad_to_multiple_of=16, max_width=24)["input_ids"].shape == (1, 30)
    assert collate([_example(20)], 0)["input_ids"].shape == (1, 20)            # default: no rounding
    assert collate([_example(32)], 0, pad_to_multiple_of=16)["input_ids"].shape == (1, 32)
