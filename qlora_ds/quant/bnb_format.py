"""bitsandbytes' serialised 4-bit state-dict keys, both ways.

A 4-bit weight saved by bitsandbytes / transformers is ``{p}`` (packed uint8, shape (n/2, 1)) plus
``{p}.absmax``, ``{p}.quant_map`` and, with double quantization, ``{p}.nested_absmax`` and
``{p}.nested_quant_map``, and ``{p}.quant_state.bitsandbytes__{nf4|fp4}``: a uint8 tensor holding
JSON with the non-tensor fields (same layout as ``QuantState.as_dict(packed=True)``).
"""
from __future__ import annotations

import json

import torch

from ..errors import QLoRADSError
from .. import codebooks as codes
from .nf4 import QuantizedTensor

_STATE_KEY = "quant_state.bitsandbytes__"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def to_bnb_state_dict(qt: QuantizedTensor, prefix: str = "weight") -> dict[str, torch.Tensor]:
    meta = {"quant_type": qt.quant_type, "blocksize": qt.blocksize, "dtype": _dtype_name(qt.dtype),
            "shape": list(qt.shape)}
    sd = {prefix: qt.packed.view(-1, 1), f"{prefix}.absmax": qt.absmax,
          f"{prefix}.quant_map": codes.code4(qt.quant_type, qt.device).clone()}
    if qt.double_quant:
        sd[f"{prefix}.nested_absmax"] = qt.absmax2
        sd[f"{prefix}.nested_quant_map"] = codes.dynamic_code(qt.device).clone()
        meta.update(nested_blocksize=qt.nested_blocksize, nested_dtype="float32", nested_offset=qt.offset)
    sd[f"{prefix}.{_STATE_KEY}{qt.quant_type}"] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    return sd


def _fail(prefix: str, problem: str) -> QLoRADSError:
    return QLoRADSError(f"bitsandbytes 4-bit state for {prefix!r}: {problem}. The checkpoint is corrupt or was not "
                        f"written by bitsandbytes/transformers/qlora-ds; re-export it from the original model")


def has_bnb_state(state_dict: dict, prefix: str = "weight") -> bool:
    return any(k.startswith(f"{prefix}.{_STATE_KEY}") for k in state_dict)


def from_bnb_state_dict(state_dict: dict[str, torch.Tensor], prefix: str = "weight") -> QuantizedTensor:
    state_keys = [k for k in state_dict if k.startswith(f"{prefix}.{_STATE_KEY}")]
    if len(state_keys) != 1:
        raise _fail(prefix, f"expected exactly one '{prefix}.{_STATE_KEY}<nf4|fp4>' entry, found {state_keys}")
    quant_type = state_keys[0].rsplit("__", 1)[1]
    if quant_type not in codes.QUANT_TYPES:
        raise _fail(prefix, f"quant type {quant_type!r} is not nf4 or fp4")
    try:
        meta = json.loads(bytes(state_dict[state_keys[0]].to("cpu", torch.uint8).tolist()).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _fail(prefix, f"its quant_state JSON does not parse ({err})") from None
    for key in ("quant_type", "blocksize", "dtype", "shape"):
        if key not in meta:
            raise _fail(prefix, f"quant_state lacks {key!r}")
    if meta["quant_type"] != quant_type or meta["dtype"] not in _DTYPES:
        raise _fail(prefix, f"quant_state says quant_type={meta['quant_type']!r}, dtype={meta['dtype']!r}")
    for key in ("", ".absmax", ".quant_map"):
        if prefix + key not in state_dict:
            raise _fail(prefix, f"missing tensor {prefix + key!r}")
    quant_map = state_dict[f"{prefix}.quant_map"]
    if not torch.equal(quant_map.float().cpu(), codes.code4(quant_type)):
        raise _fail(prefix, "its quant_map is not the standard bitsandbytes code table")
    packed = state_dict[prefix].contiguous().view(-1).view(torch.uint8) if state_dict[prefix].dtype != torch.uint8 \
        else state_dict[prefix].contiguous().view(-1)
    nested = f"{prefix}.nested_absmax" in state_dict
    extra = {}
    if nested:
        if "nested_offset" not in meta or f"{prefix}.nested_quant_map" not in state_dict:
            raise _fail(prefix, "nested_absmax present but nested_offset / nested_quant_map missing")
        if not torch.equal(state_dict[f"{prefix}.nested_quant_map"].float().cpu(), codes.dynamic_code()):
            raise _fail(prefix, "its nested_quant_map is not bitsandbytes' dynamic 8-bit map")
        extra = dict(absmax2=state_dict[f"{prefix}.nested_absmax"].float(),
                     offset=float(torch.tensor(float(meta["nested_offset"]), dtype=torch.float32)),
                     nested_blocksize=int(meta.get("nested_blocksize", 256)))
    try:
        return QuantizedTensor(packed=packed, absmax=state_dict[f"{prefix}.absmax"], shape=torch.Size(meta["shape"]),
                               dtype=_DTYPES[meta["dtype"]], blocksize=int(meta["blocksize"]),
                               quant_type=quant_type, **extra)
    except QLoRADSError as err:
        raise _fail(prefix, str(err)) from None
