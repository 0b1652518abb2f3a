"""Read a safetensors checkpoint (single file or sharded with an index) one tensor at a time.

Everything is validated from the headers first (shard files present, key → shape/dtype), without
reading tensor data. Each tensor is then read with plain file reads into memory it owns, not through
a memory map: tensors that are kept as they are (embeddings, norms, pre-quantized bytes) would
otherwise keep the whole mapping alive, and every page touched while quantizing would stay in the
process's resident set (a 16-bit checkpoint's full size on top of the 4-bit model).
"""
from __future__ import annotations

import json
import os
import struct
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open

from ..errors import QLoRADSError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
BNB_STATE = ".quant_state.bitsandbytes__"
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def inside(folder: str, name: str) -> bool:
    """Whether ``name`` (from a downloaded file) is a plain relative path whose file resolves inside ``folder``, or,
    where ``folder`` is a Hugging Face cache snapshot, inside that cache's ``blobs`` (its files link there): not an
    absolute path, no ``..``, no symlink out to another model's or the system's files."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or os.path.normpath(name) != name \
            or ".." in name.split(os.sep):
        return False
    roots = [os.path.realpath(folder)]
    if os.path.basename(os.path.dirname(os.path.abspath(folder))) == "snapshots":
        roots.append(os.path.realpath(os.path.join(folder, os.pardir, os.pardir, "blobs")))
    target = os.path.realpath(os.path.join(folder, name))
    return any(os.path.commonpath([root, target]) == root for root in roots)


def _data_layout(file: str) -> tuple[int, dict]:
    """(byte offset of the data section, header) of a safetensors file; the header is already
    validated by ``safe_open``."""
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


class Checkpoint:
    def __init__(self, path: str):
        self.path = path
        index = os.path.join(path, INDEX_NAME)
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
                if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                               for k, v in weight_map.items()):
                    raise ValueError("its weight_map is not a mapping of tensor names to shard file names")
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise QLoRADSError(f"{index} is not a valid safetensors index ({err}); re-save the checkpoint with "
                                   f"save_pretrained(..., safe_serialization=True)") from None
        elif os.path.isfile(os.path.join(path, SINGLE_NAME)):
            weight_map = None
        else:
            raise QLoRADSError(f"no {SINGLE_NAME} or {INDEX_NAME} in {path!r}; save the model with "
                               f"save_pretrained(dir, safe_serialization=True) (PyTorch .bin files are not read)")
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE_NAME]
        outside = [f for f in files if not inside(path, f)]
        if outside:
            raise QLoRADSError(f"{INDEX_NAME if weight_map else SINGLE_NAME} in {path!r} points outside the checkpoint "
                               f"directory ({outside[0]!r}): shard files must be plain names of files in it, so a "
                               f"downloaded index cannot pull in another model's or the system's files. Fix the "
                               f"index (or the symlink), or download the checkpoint again")
        missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
        if missing:
            raise QLoRADSError(f"checkpoint {path!r} is incomplete: shard(s) {missing} listed in {INDEX_NAME} are "
                               f"missing; copy or download all {len(files)} shards again")
        self.file_of: dict[str, str] = {}
        self.shape: dict[str, tuple[int, ...]] = {}
        self._layout: dict[str, tuple[int, dict]] = {}
        for fname in files:
            try:
                with safe_open(os.path.join(path, fname), framework="pt") as f:
                    for key in f.keys():
                        self.file_of[key] = fname
                        self.shape[key] = tuple(f.get_slice(key).get_shape())
                self._layout[fname] = _data_layout(os.path.join(path, fname))
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

    def rename(self, rename: Callable[[str], str]) -> None:
        """Map every key through ``rename`` (checkpoint name -> model name: transformers' legacy names, e.g.
        GPT-NeoX's ``embed_out`` → ``lm_head``, or a missing base-model prefix) so lookups use the model's names."""
        stored, file_of, shape = {}, {}, {}
        for key, orig in self.stored.items():
            new = rename(key)
            if new in stored:
                raise QLoRADSError(f"checkpoint {self.path!r} holds both {stored[new]!r} and {orig!r}, which name the "
                                   f"same model tensor {new!r}; keep one of them (re-save with save_pretrained)")
            stored[new], file_of[new], shape[new] = orig, self.file_of[key], self.shape[key]
        self.stored, self.file_of, self.shape = stored, file_of, shape

    def dtype_name(self, key: str) -> str:
        """The safetensors dtype of ``key`` as its header gives it ("BF16", "I8", …), without reading the data."""
        return self._layout[self.file_of[key]][1][self.stored[key]]["dtype"]

    def __contains__(self, key: str) -> bool:
        return key in self.file_of

    def keys(self):
        return self.file_of.keys()

    @property
    def bnb_quantized(self) -> bool:
        return any(BNB_STATE in k for k in self.file_of)

    def get(self, key: str) -> torch.Tensor:
        """The tensor ``key``, read into fresh memory (no reference to the file remains)."""
        fname = self.file_of[key]
        if fname != self._open_name:
            self.close()
            self._open = open(os.path.join(self.path, fname), "rb", buffering=0)
            self._open_name = fname
        start, header = self._layout[fname]
        entry = header[self.stored[key]]
        dtype = DTYPES.get(entry["dtype"])
        if dtype is None:
            raise QLoRADSError(f"{key} in {fname} has dtype {entry['dtype']}, which qlora-ds does not read; "
                               f"convert the checkpoint to bf16/fp16/fp32 first")
        begin, end = entry["data_offsets"]
        buf = torch.empty(end - begin, dtype=torch.uint8)
        view, got = memoryview(buf.numpy()), 0
        while got < len(view):          # one read returns at most ~2 GiB on Linux
            n = os.preadv(self._open.fileno(), [view[got:]], start + begin + got)
            if n == 0:
                break
            got += n
        if got != end - begin:
            raise QLoRADSError(f"{fname} in {self.path!r} ended after {got} of {end - begin} bytes of {key}; it is "
                               f"truncated: copy it again from the original checkpoint")
        return buf.view(dtype).reshape(entry["shape"])

    def close(self) -> None:
        if self._open is not None:
            self._open.close()
        self._open = self._open_name = None
