"""qlora_ds.safetensors_writer: files safetensors itself reads back, tensor for tensor, and clear errors."""
from __future__ import annotations

import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qlora_ds.errors import QLoRADSError
from qlora_ds.safetensors_writer import DTYPES, SafetensorsWriter


def save_tensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None) -> None:
    with SafetensorsWriter(path, [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()], metadata) as out:
        for k, t in tensors.items():
            out.write(k, t)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for i, dtype in enumerate(DTYPES):
        x = torch.randn(3, 5, generator=g) * 100
        if dtype == torch.bool:
            x = x > 0
        out[f"t{i}.{str(dtype).removeprefix('torch.')}"] = x.to(dtype)
    out["scalar"] = torch.tensor(2.5, dtype=torch.bfloat16)
    out["empty"] = torch.zeros(0, 7, dtype=torch.float16)
    out["strided"] = torch.arange(24, dtype=torch.int32).view(4, 6).t()       # not contiguous
    out["odd"] = torch.arange(3, dtype=torch.uint8)                           # data offsets not multiples of 8
    return out


def test_every_dtype_round_trips_through_safetensors(tmp_path):
    tensors = _tensors()
    path = str(tmp_path / "ours.safetensors")
    save_tensors(tensors, path, {"format": "pt", "note": "x"})
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"format": "pt", "note": "x"}
        assert set(f.keys()) == set(tensors)
        for k, t in tensors.items():
            got = f.get_tensor(k)
            assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), k
    with open(path, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
    assert n % 8 == 0                                     # the header padded to 8 bytes, as safetensors writes it
    # the same tensors as safetensors' own writer, read back by the same reader
    theirs = str(tmp_path / "theirs.safetensors")
    save_file({k: t.contiguous() for k, t in tensors.items()}, theirs)
    ref = load_file(theirs)
    assert all(torch.equal(load_file(path)[k], ref[k]) for k in tensors)


def test_entries_must_come_as_announced(tmp_path):
    a, b = torch.ones(2, dtype=torch.float32), torch.zeros(3, dtype=torch.int8)
    entries = [("a", a.dtype, (2,)), ("b", b.dtype, (3,))]
    with pytest.raises(QLoRADSError, match="got b, expected a"):
        with SafetensorsWriter(str(tmp_path / "order"), entries) as out:
            out.write("b", b)
    with pytest.raises(QLoRADSError, match=r"a: torch.float16 \(2,\) does not match the header's torch.float32"):
        with SafetensorsWriter(str(tmp_path / "dtype"), entries) as out:
            out.write("a", a.half())
    with pytest.raises(QLoRADSError, match="1 entries never written \\(first b\\)"):
        with SafetensorsWriter(str(tmp_path / "short"), entries) as out:
            out.write("a", a)
    with pytest.raises(QLoRADSError, match="listed twice"):
        SafetensorsWriter(str(tmp_path / "twice"), entries + [("a", a.dtype, (2,))])
    with pytest.raises(QLoRADSError, match="complex64 has no safetensors name"):
        SafetensorsWriter(str(tmp_path / "complex"), [("c", torch.complex64, (1,))])
