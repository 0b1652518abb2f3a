"""Padding-free packing: whole examples concatenated into rows of at most ``row_len`` tokens.

Each example keeps its own ``position_ids`` (0, 1, … from its first token), and the batch carries no
``attention_mask``: transformers 5.23 (``masking_utils.find_packed_sequence_indices``) then reads the example
boundaries from the position resets and builds a block-diagonal causal mask for SDPA/eager, and its flash-attention
path runs varlen over the same boundaries, so attention never crosses from one example into another; on SDPA,
``check_packing_supported`` installs ``qlora_ds.nn.packed_attention``, which attends within each example only
(examples batched by length across rows). The first token of every example is labelled IGNORE: it is never
a target in the unpacked run either (the shift drops it), and here it would otherwise be the target of the previous
example's last token. With that, every target token sees the same context and gets the same loss as unpacked.

Rows are filled best-fit-decreasing (an example is never split), deterministically from the example order.
"""
from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np
import torch

from ..errors import QLoRADSError
from .batching import padded_width
from .examples import IGNORE, Examples

# model types whose forward takes position_ids and whose mask honours packed position resets (tested per
# architecture in tests/test_packing.py; OPT's positions come from the attention mask, and BLOOM's ALiBi and
# Falcon's mask ignore position resets: those give other losses when packed)
PACKING_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "gpt_neox", "gpt2"})


def check_packing_supported(model_config) -> None:
    """Refuse model types that packing would change the loss of; else route SDPA over packed rows per example
    (``qlora_ds.nn.packed_attention``: the same result, ``Σ len²`` instead of ``T²`` attention per row)."""
    kind = getattr(model_config, "model_type", None)
    if kind not in PACKING_MODEL_TYPES:
        raise QLoRADSError(f"--packing is not supported for model_type {kind!r} (positions or masks do not follow "
                           f"position_ids resets); supported: {sorted(PACKING_MODEL_TYPES)}; drop --packing")
    attn = getattr(model_config, "_attn_implementation", None) or "sdpa"
    if attn not in ("sdpa", "eager"):
        # transformers' flash-attention path keeps packed examples apart only for a batch of one row
        raise QLoRADSError(f"--packing needs sdpa or eager attention, the model's config selects {attn!r}: packed "
                           f"examples would attend across their boundaries; set attn_implementation to \"sdpa\" "
                           f"or drop --packing")
    from ..nn.packed_attention import install
    install()


def pack_rows(lengths: list[int], row_len: int) -> list[list[int]]:
    """Indices of the examples in each row; best-fit decreasing, ties by original order."""
    if row_len < 1:
        raise QLoRADSError(f"packing row length must be >= 1, got {row_len}")
    too_long = [i for i, n in enumerate(lengths) if n > row_len]
    if too_long:
        raise QLoRADSError(f"{len(too_long)} example(s) are longer than the packing row ({row_len} tokens), e.g. "
                           f"#{too_long[0]} with {lengths[too_long[0]]}; truncate them (--max-len) first")
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []        # (space left, row id), sorted
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            space, r = free.pop(k)
        else:
            space, r = row_len, len(rows)
            rows.append([])
        rows[r].append(i)
        if space - n > 0:
            bisect.insort(free, (space - n, r))
    return rows


def pack_examples(examples: Sequence, row_len: int) -> "PackedRows":
    """Packed rows, each ``{"input_ids", "labels", "position_ids"}`` of its own length (≤ ``row_len``)."""
    lengths = (examples.lengths().tolist() if isinstance(examples, Examples) else
               [e["input_ids"].numel() for e in examples])
    rows = [sorted(members) for members in pack_rows(lengths, row_len)]
    return PackedRows(examples, rows, [sum(lengths[i] for i in r) for r in rows])


class PackedRows(Sequence):
    """Rows made on access (``rows[i]``) from the examples they hold (``Examples``, or dicts): packing copies no
    token."""

    def __init__(self, examples: Sequence, rows: list[list[int]], lengths: list[int]):
        self.examples = examples
        self.members = np.fromiter((i for r in rows for i in r), dtype=np.int64)     # the rows' examples in turn
        self.starts = np.cumsum([0] + [len(r) for r in rows])
        self._lengths = np.array(lengths, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._lengths)

    def __getitem__(self, r):
        if isinstance(r, slice):                       # a micro batch of rows (bench packing)
            return [self[k] for k in range(*r.indices(len(self)))]
        if not -len(self) <= r < len(self):
            raise IndexError(f"row {r} of {len(self)}")
        r %= len(self)
        parts = [self.examples[int(i)] for i in self.members[self.starts[r]:self.starts[r + 1]]]
        position_ids = torch.cat([torch.arange(e["input_ids"].numel()) for e in parts])
        labels = torch.cat([e["labels"] for e in parts])
        labels[position_ids == 0] = IGNORE
        return {"input_ids": torch.cat([e["input_ids"] for e in parts]), "labels": labels, "position_ids": position_ids}

    def __iter__(self):
        return (self[r] for r in range(len(self)))

    def lengths(self) -> np.ndarray:
        """Tokens per row."""
        return self._lengths


def collate_packed(rows: list[dict[str, torch.Tensor]], pad_id: int, pad_to_multiple_of: int = 1,
                   max_width: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad packed rows; no attention_mask (the mask comes from position_ids). The padding is one more
    segment (its positions restart at 0), labelled IGNORE, so it neither attends to nor is seen by real tokens."""
    rows = list(rows)
    width = padded_width(max(r["input_ids"].numel() for r in rows), pad_to_multiple_of, max_width)
    n = len(rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((n, width), dtype=torch.long)
    for i, r in enumerate(rows):
        k = r["input_ids"].numel()
        input_ids[i, :k], labels[i, :k], position_ids[i, :k] = r["input_ids"], r["labels"], r["position_ids"]
        position_ids[i, k:] = torch.arange(width - k)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
