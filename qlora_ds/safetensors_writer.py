"""A ``.safetensors`` file written tensor by tensor, as the tensors become available.

``safetensors.torch.save_file`` needs every tensor at once. Where they are not on the host together — a ZeRO-3
model, gathered one module at a time; a model on the GPU — the caller would first have to copy the whole model
into host memory (``save_quantized`` did: under ZeRO-3 rank 0 held the whole model once more). Here the header is
built from names, dtypes and shapes alone, and each tensor's bytes go to the file as it is handed over (a CPU
tensor straight from its memory, another device's through one host copy of that tensor), so the host holds one
tensor at a time. The file is the format safetensors reads (8-byte little-endian header length, a JSON header
padded with spaces to 8 bytes, the data in header order with no gaps); ``tests/test_safetensors_writer.py`` reads
it back with safetensors itself.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Iterable

import torch

from .errors import QLoRADSError

DTYPES = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.uint16: "U16",
    torch.int32: "I32", torch.uint32: "U32", torch.int64: "I64", torch.uint64: "U64", torch.float16: "F16",
    torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


class SafetensorsWriter:
    """``with SafetensorsWriter(path, [(name, dtype, shape), ...]) as out: out.write(name, tensor) ...`` — every
    entry written once, in the order given; the file is flushed and fsynced on a clean exit, and a missing entry
    is an error (the caller's atomic directory then throws the partial file away)."""

    def __init__(self, path: str, entries: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self._order: list[tuple[str, torch.dtype, tuple[int, ...], int]] = []
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        for name, dtype, shape in entries:
            if dtype not in DTYPES:
                raise QLoRADSError(f"{name}: dtype {dtype} has no safetensors name; cast it before saving")
            if name in header:
                raise QLoRADSError(f"{name} is listed twice; a safetensors file holds each name once")
            shape = tuple(int(d) for d in shape)
            size = torch.Size(shape).numel() * dtype.itemsize
            header[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            self._order.append((name, dtype, shape, size))
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode("utf-8")
        text += b" " * (-len(text) % 8)
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(text)) + text)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._order) or self._order[self._next][0] != name:
            want = self._order[self._next][0] if self._next < len(self._order) else "nothing more"
            raise QLoRADSError(f"safetensors writer: got {name}, expected {want} (entries go in the header's order)")
        _, dtype, shape, size = self._order[self._next]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise QLoRADSError(f"{name}: {tensor.dtype} {tuple(tensor.shape)} does not match the header's "
                               f"{dtype} {shape}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        if data.numel():
            self._file.write(memoryview(data.numpy()))
        self._next += 1

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._file.close()
            return
        self.close()
        if self._next != len(self._order):
            raise QLoRADSError(f"safetensors writer: {len(self._order) - self._next} entries never written "
                               f"(first {self._order[self._next][0]})")
