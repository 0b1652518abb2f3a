"""GroupByLengthBatches: every rank the same number of micro-batches, each example at most once per epoch over all
ranks, the same order on a resume, each epoch built once however often the loop asks, a clear error when the data
is smaller than one global batch."""
import pytest

from qlora_ds.data.batching import GroupByLengthBatches
from qlora_ds.errors import QLoRADSError

LENGTHS = [(7 * i) % 50 + 1 for i in range(103)]


@pytest.mark.parametrize("world, micro, group", [(1, 3, True), (3, 2, True), (4, 5, False)])
def test_ranks_agree_and_no_example_repeats_within_an_epoch(world, micro, group):
    ranks = [GroupByLengthBatches(LENGTHS, micro, world, r, seed=3, group_by_length=group) for r in range(world)]
    assert len({len(b) for b in ranks}) == 1 and len(ranks[0]) == len(LENGTHS) // (micro * world)
    for epoch in range(3):
        seen = [i for b in ranks for batch in b.epoch(epoch) for i in batch]
        assert len(seen) == len(set(seen)) == len(ranks[0]) * micro * world
        assert all(len(batch) == micro for b in ranks for batch in b.epoch(epoch))
    again = GroupByLengthBatches(LENGTHS, micro, world, world - 1, seed=3, group_by_length=group)
    assert again.epoch(2) == ranks[-1].epoch(2) and again.epoch(0) != again.epoch(1)


def test_an_epoch_is_built_once(monkeypatch):
    b = GroupByLengthBatches(LENGTHS, 2, 2, 1, seed=0)
    built = []
    real = b._build
    monkeypatch.setattr(b, "_build", lambda e: built.append(e) or real(e))
    for _ in range(5):                    # the loop asks for every micro-batch, and looks ahead into the next epoch
        b.epoch(0), b.epoch(1)
    b.epoch(2), b.epoch(1)
    assert built == [0, 1, 2]


def test_fewer_examples_than_a_global_batch_is_a_clear_error():
    with pytest.raises(QLoRADSError, match=r"3 training examples \(packed rows with --packing\), fewer than one "
                                           r"global batch \(2 per rank x 2 ranks\).*lower --micro-batch"):
        GroupByLengthBatches([5, 6, 7], 2, 2, 0)
