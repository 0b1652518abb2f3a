"""Read a safetensors checkpoint (single file or sharded with an index) one tensor at a time.

Everything is validated from the headers first (shard files present, key → shape/dtype), without
reading tensor data. Data is read with ``safe_open`` one tensor at a time; at most one shard file
is open (its mapping is dropped when the reader moves on), so resident memory stays near one tensor.
"""
from __future__ import annotations

import json
import os
import re

import torch
from safetensors import SafetensorError, safe_open

from ..errors import QLoRADSError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
BNB_STATE = ".quant_state.bitsandbytes__"


class Checkpoint:
    def __init__(self, path: str):
        self.path = path
        index = os.path.join(path, INDEX_NAME)
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError) as err:
                raise QLoRADSError(f"{index} is not a valid safetensors index ({err}); re-save the checkpoint with "
                                   f"save_pretrained(..., safe_serialization=True)") from None
        elif os.path.isfile(os.path.join(path, SINGLE_NAME)):
            weight_map = None
        else:
            raise QLoRADSError(f"no {SINGLE_NAME} or {INDEX_NAME} in {path!r}; save the model with "
                               f"save_pretrained(dir, safe_serialization=True) (PyTorch .bin files are not read)")
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE_NAME]
        missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
        if missing:
            raise QLoRADSError(f"checkpoint {path!r} is incomplete: shard(s) {missing} listed in {INDEX_NAME} are "
                               f"missing; copy or download all {len(files)} shards again")
        self.file_of: dict[str, str] = {}
        self.shape: dict[str, tuple[int, ...]] = {}
        for fname in files:
            try:
                with safe_open(os.path.join(path, fname), framework="pt") as f:
                    for key in f.keys():
                        self.file_of[key] = fname
                        self.shape[key] = tuple(f.get_slice(key).get_shape())
            except SafetensorError as err:
                raise QLoRADSError(f"shard {fname} in {path!r} is not a readable safetensors file ({err}); it is "
                                   f"truncated or corrupt: copy it again from the original checkpoint") from None
        if weight_map:
            absent = sorted(k for k, f in weight_map.items() if self.file_of.get(k) != f)
            if absent:
                raise QLoRADSError(f"{len(absent)} tensor(s) listed in {INDEX_NAME} are not in their shard (first: "
                                   f"{absent[0]!r} in {weight_map[absent[0]]}); the shards are from another save")
        self.stored: dict[str, str] = {k: k for k in self.file_of}   # model name -> name in the file
        self._open_name: str | None = None
        self._open = None

    def rename(self, renamings: list[tuple[str, str]]) -> None:
        """Apply (regex, replacement) key renamings (transformers' legacy names, e.g. GPT-NeoX's
        ``embed_out`` → ``lm_head``) so lookups use the model's parameter names."""
        stored, file_of, shape = {}, {}, {}
        for key, orig in self.stored.items():
            new = key
            for pattern, repl in renamings:
                new = re.sub(pattern, repl, new, count=1)
            stored[new], file_of[new], shape[new] = orig, self.file_of[key], self.shape[key]
        self.stored, self.file_of, self.shape = stored, file_of, shape

    def __contains__(self, key: str) -> bool:
        return key in self.file_of

    def keys(self):
        return self.file_of.keys()

    @property
    def bnb_quantized(self) -> bool:
        return any(BNB_STATE in k for k in self.file_of)

    def get(self, key: str) -> torch.Tensor:
        fname = self.file_of[key]
        if fname != self._open_name:
            self.close()
            self._open = safe_open(os.path.join(self.path, fname), framework="pt")
            self._open.__enter__()
            self._open_name = fname
        return self._open.get_tensor(self.stored[key])

    def close(self) -> None:
        if self._open is not None:
            self._open.__exit__(None, None, None)
        self._open = self._open_name = None
