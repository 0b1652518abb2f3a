"""The memory a run's examples hold on every rank for the whole run (qlora_ds.data.examples): bytes per token and per
example, measured with tracemalloc (numpy and array.array buffers are traced), and the examples they give back."""
from __future__ import annotations

import gc
import random
import tracemalloc

import pytest
import torch

from qlora_ds.data.examples import IGNORE
from qlora_ds.data.packing import pack_examples
from qlora_ds.data.run_data import split_heldout
from qlora_ds.data.tokenize import tokenize_records


class _NumberTokenizer:
    """Text of decimal ids -> those ids (fast: the test measures storage, not tokenization); no chat template."""
    chat_template, eos_token_id = None, 2

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [int(w) for w in text.split() if w.isdigit()]}


def _texts(n: int, length: int, vocab: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"text": " ".join(str(rng.randrange(3, vocab)) for _ in range(length))} for _ in range(n)]


def _held(build) -> tuple[object, int]:
    """(what ``build()`` returns, the bytes it still holds once built)."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        out = build()
        gc.collect()
        return out, tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("vocab,per_token", [(32_000, 2.125), (128_256, 4.125)])
@pytest.mark.parametrize("length", [200, 12])
def test_bytes_per_token_and_per_example(vocab, per_token, length):
    """ids in 2 B (4 B past a 65,536-token vocabulary), a trained bit per token, 41 B per example; the int64 ids and
    labels kept before took 16 B per token and ~1.5 KB per example (a dict and two tensors, RSS measured)."""
    n = 40_000 // length
    records = _texts(n, length, vocab)
    tokenize_records(records[:2], _NumberTokenizer(), length)        # imports and caches: not the examples'
    examples, held = _held(lambda: tokenize_records(records, _NumberTokenizer(), length))
    tokens = int(examples.lengths().sum())
    assert len(examples) == n and tokens == n * length
    assert examples.nbytes() == pytest.approx(per_token * tokens + 41 * n, abs=8)
    assert held <= 1.1 * per_token * tokens + 48 * n + 4096, (held / tokens, held / n)


def test_examples_give_back_their_ids_labels_and_units():
    """Every example as the consumers take it (int64 ids, IGNORE off its trained tokens), with ids past 65,535
    arriving after the first examples were stored in 16 bits; a split and packing share the stored tokens."""
    rng = random.Random(1)
    records = [{"text": " ".join(str(rng.randrange(3, 60_000)) for _ in range(9))} for _ in range(30)]
    records += [{"text": "70000 3 4 5 99999"}, {"text": " ".join(str(k) for k in range(3, 40))}]
    records += [{"messages": [{"role": "user", "content": "5 6"}, {"role": "assistant", "content": "7 8"}]}]
    examples = tokenize_records(records, _NumberTokenizer(), 16)
    assert examples.ids.dtype.itemsize == 4
    want = [[int(w) for w in r["text"].split()] for r in records[:31]]
    assert [e["input_ids"].tolist() for e in examples[:31]] == want
    assert all(e["input_ids"].dtype == e["labels"].dtype == torch.int64 for e in examples)
    assert all(torch.equal(e["labels"], e["input_ids"]) for e in examples[:-1])         # text: every token
    chat = examples[-1]
    assert chat["labels"].tolist() == [IGNORE, IGNORE, 7, 8, 2] and "opening" in chat and "record" not in chat
    windows = [e for e in examples if "record" in e]
    assert len(windows) == 3 and {e["record"] for e in windows} == {31}
    held, train, _ = split_heldout(examples, 3, seed=0)
    assert held.ids is train.ids is examples.ids and len(held) + len(train) == len(examples)
    rows = pack_examples(train, 32)
    assert rows.lengths().sum() == train.lengths().sum() == sum(r["input_ids"].numel() for r in rows)


def test_packed_rows_slice_into_a_micro_batch_and_an_empty_store_is_empty():
    """A slice of packed rows is those rows (bench packing collates rows[i:i + k]); a store without examples has
    none (its first begin must not make one)."""
    from qlora_ds.data.examples import ExamplesBuilder
    from qlora_ds.data.packing import collate_packed

    b = ExamplesBuilder()
    for n in (3, 5, 2, 6, 4):
        b.add(list(range(10, 10 + n)), [1] * n)
    rows = pack_examples(b.finish(), 8)
    got = rows[0:2]
    assert len(got) == 2 and all(torch.equal(g["input_ids"], rows[k]["input_ids"]) for k, g in enumerate(got))
    assert collate_packed(got, 0, 8, 8)["input_ids"].shape == (2, 8)
    assert [r["input_ids"].tolist() for r in rows[-1:]] == [rows[len(rows) - 1]["input_ids"].tolist()]
    empty = ExamplesBuilder().finish()
    assert len(empty) == 0 and list(empty) == []
    held, train, dropped = split_heldout(empty, 4, seed=0)
    assert len(held) == len(train) == dropped == 0


def test_the_batch_order_costs_12_bytes_per_example_and_python_objects_only_per_batch():
    """GroupByLengthBatches keeps the lengths and this rank's batches of two epochs as int32 tensors (it kept Python
    int lists: ~100 B per example on every rank); a batch becomes a list of ints only when it is read."""
    from qlora_ds.data.batching import GroupByLengthBatches
    n = 100_000
    lengths = torch.randint(1, 512, (n,), generator=torch.Generator().manual_seed(0))
    tracemalloc.start()
    sampler = GroupByLengthBatches(lengths, 4, world_size=2, rank=1, seed=3)
    epochs = [sampler.epoch(0), sampler.epoch(1)]
    python_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    tensor_bytes = sampler.lengths.nbytes + sum(e.rows.nbytes for e in epochs)
    assert tensor_bytes == 4 * n + 2 * 4 * (n // 2) and python_bytes < 0.5 * n     # 8 B per example and rank
    first = epochs[0][0]
    assert isinstance(first, list) and all(isinstance(i, int) for i in first) and len(first) == 4
    assert lengths[first].tolist() == sorted(lengths[first].tolist(), reverse=True)       # grouped by length
