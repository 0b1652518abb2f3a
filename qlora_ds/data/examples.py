"""Tokenized examples as a run keeps them (on every rank, for the whole run): flat arrays, not a dict of two int64
tensors per example.

The ids of all examples lie one after another in the smallest dtype that holds them (uint16 up to id 65,535, else
int32), which tokens are trained in a bit per token (an example's labels are its ids where trained, else IGNORE),
and each example has its [begin, end) and its held-out unit (``record``: the text it is a window of; ``opening``: the
digest of a chat's first exchange). That is 2.125 B per token (4.125 with a vocabulary past 65,536) and 41 B per
example, where int64 ids and labels took 16 B per token and ~1.5 KB per example (the dict and two tensors).
``examples[i]`` makes the dict of int64 tensors the consumers take (collate, packing, the held-out loss), a batch at
a time.
"""
from __future__ import annotations

from array import array
from collections.abc import Sequence

import numpy as np
import torch

IGNORE = -100
NO_RECORD = -1


class Examples(Sequence):
    """Examples ``{"input_ids", "labels", "record" | "opening"}`` (int64 tensors) made on access from flat arrays;
    a slice or ``take`` is another ``Examples`` over the same arrays."""

    def __init__(self, ids: np.ndarray, trained: np.ndarray, begin: np.ndarray, end: np.ndarray,
                 record: np.ndarray, opening: np.ndarray, chat: np.ndarray):
        self.ids, self.trained = ids, trained          # all tokens; np.packbits of their trained flags
        self.begin, self.end, self.record, self.opening, self.chat = begin, end, record, opening, chat

    def __len__(self) -> int:
        return len(self.begin)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take(np.arange(len(self))[i])
        b, e = int(self.begin[i]), int(self.end[i])
        ids = torch.from_numpy(self.ids[b:e].astype(np.int64))
        out = {"input_ids": ids, "labels": ids.masked_fill(~torch.from_numpy(self._trained(b, e)), IGNORE)}
        if self.record[i] != NO_RECORD:
            out["record"] = int(self.record[i])
        elif self.chat[i]:
            out["opening"] = self.opening[i].tobytes()
        return out

    def __iter__(self):
        return (self[k] for k in range(len(self)))

    def _trained(self, b: int, e: int) -> np.ndarray:
        bits = np.unpackbits(self.trained[b >> 3:(e + 7) >> 3])
        return bits[b & 7:(b & 7) + e - b].astype(bool)

    def take(self, index) -> "Examples":
        """The examples at ``index`` (in that order), sharing the token arrays."""
        index = np.asarray(index, dtype=np.int64)
        return Examples(self.ids, self.trained, self.begin[index], self.end[index], self.record[index],
                        self.opening[index], self.chat[index])

    def lengths(self) -> np.ndarray:
        return self.end - self.begin

    def token_bytes(self, i: int) -> bytes:
        """Example ``i``'s ids as stored (equal for equal ids: dedup's key)."""
        return self.ids[int(self.begin[i]):int(self.end[i])].tobytes()

    def unit(self, i: int, heldout_groups: bool = True):
        """The held-out unit of example ``i`` beyond itself, as ``split_heldout`` keys it, or None."""
        if self.record[i] != NO_RECORD:
            return "record", int(self.record[i])
        return ("opening", self.opening[i].tobytes()) if heldout_groups and self.chat[i] else None

    def nbytes(self) -> int:
        """Bytes held for these examples (the token arrays counted whole: a ``take`` shares them)."""
        return sum(a.nbytes for a in (self.ids, self.trained, self.begin, self.end, self.record, self.opening,
                                      self.chat))


class ExamplesBuilder:
    """Collects examples into growing flat buffers (array.array: 2 or 4 B per id, no Python int per token)."""

    def __init__(self):
        self._ids = array("H")                         # widened to int32 at the first id past 65,535
        self._trained = bytearray()
        self._ends, self._record = array("q"), array("q")
        self._opening, self._chat = bytearray(), bytearray()

    def __len__(self) -> int:
        return len(self._ends)

    def add(self, ids: list[int], trained: list[int], record: int | None = None, opening: bytes | None = None):
        if ids and self._ids.typecode == "H" and max(ids) > 0xFFFF:
            self._ids = array("i", self._ids)
        self._ids.extend(ids)
        self._trained.extend(trained)
        self._ends.append(len(self._ids))
        self._record.append(NO_RECORD if record is None else record)
        self._chat.append(opening is not None)
        self._opening.extend(opening if opening is not None else bytes(16))

    def finish(self) -> Examples:
        dtype = np.uint16 if self._ids.typecode == "H" else np.int32
        ends = np.frombuffer(self._ends, dtype=np.int64)
        begin = np.concatenate([np.zeros(1, np.int64), ends])[:-1]     # no examples: none
        return Examples(np.frombuffer(self._ids, dtype=dtype),
                        np.packbits(np.frombuffer(self._trained, dtype=np.uint8)),
                        begin, ends, np.frombuffer(self._record, dtype=np.int64),
                        np.frombuffer(self._opening, dtype=np.uint8).reshape(-1, 16),
                        np.frombuffer(self._chat, dtype=bool))
