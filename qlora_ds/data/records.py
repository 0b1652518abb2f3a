"""Read a dataset file into records, reporting bad lines by number.

Accepted: ``.jsonl`` (one JSON object per line) or ``.json`` (a list of objects) holding either
instruction/response pairs (``instruction``/``response``, also ``prompt``/``completion``,
``input``/``output``), or chat turns (``messages``: [{"role", "content"}, …]); or ``.txt`` plain text
(one example per paragraph, trained on every token).
"""
from __future__ import annotations

import json
import os

from ..errors import QLoRADSError

PAIR_KEYS = (("instruction", "response"), ("prompt", "completion"), ("input", "output"))


def _normalise(obj, where: str) -> dict:
    if not isinstance(obj, dict):
        raise QLoRADSError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs):
            raise QLoRADSError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} strings")
        if not any(m["role"] == "assistant" for m in msgs):
            raise QLoRADSError(f"{where}: the chat has no 'assistant' turn to train on; add one or drop the record")
        if any(m["role"] == "assistant" and not m["content"].strip() for m in msgs):
            raise QLoRADSError(f"{where}: an 'assistant' turn is empty (as a pair record's response may not be); "
                               f"fill it or drop the record")
        return {"messages": msgs}
    for prompt_key, response_key in PAIR_KEYS:
        if prompt_key in obj or response_key in obj:
            prompt, response = obj.get(prompt_key), obj.get(response_key)
            if not isinstance(prompt, str) or not isinstance(response, str) or not response.strip():
                raise QLoRADSError(f"{where}: needs non-empty string fields '{prompt_key}' and '{response_key}'")
            return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]}
    if isinstance(obj.get("text"), str) and obj["text"].strip():
        return {"text": obj["text"]}
    raise QLoRADSError(f"{where}: found keys {sorted(obj)}, expected 'instruction'/'response', "
                       f"'prompt'/'completion', 'input'/'output', 'messages' or 'text'")


def load_records(path: str) -> list[dict]:
    """Records as ``{"messages": [...]}`` (chat, trained on assistant turns) or ``{"text": ...}``."""
    if not os.path.isfile(path):
        raise QLoRADSError(f"dataset file {path!r} does not exist; pass --dataset PATH to a .jsonl/.json/.txt file")
    records: list[dict] = []
    if path.endswith(".jsonl"):
        with open(path, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise QLoRADSError(f"{path}:{lineno}: not UTF-8 text ({err.reason} at byte {err.start}); "
                                       f"re-encode the file as UTF-8") from None
                if not line.strip():
                    raise QLoRADSError(f"{path}:{lineno}: empty line; remove it (one JSON object per line)")
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise QLoRADSError(f"{path}:{lineno}: not valid JSON ({err.msg}); fix or remove the line") from None
                records.append(_normalise(obj, f"{path}:{lineno}"))
    elif path.endswith(".json"):
        with open(path, encoding="utf-8") as fh:
            try:
                data = json.load(fh)
            except json.JSONDecodeError as err:
                raise QLoRADSError(f"{path}:{err.lineno}: not valid JSON ({err.msg}); fix the file") from None
            except UnicodeDecodeError as err:
                raise QLoRADSError(f"{path}: not UTF-8 text ({err.reason}); re-encode the file as UTF-8") from None
        if not isinstance(data, list):
            raise QLoRADSError(f"{path}: expected a JSON list of records")
        records = [_normalise(obj, f"{path}[{i}]") for i, obj in enumerate(data)]
    elif path.endswith(".txt"):
        with open(path, encoding="utf-8") as fh:
            try:
                records = [{"text": p.strip()} for p in fh.read().split("\n\n") if p.strip()]
            except UnicodeDecodeError as err:
                raise QLoRADSError(f"{path}: not UTF-8 text ({err.reason}); re-encode the file as UTF-8") from None
    else:
        raise QLoRADSError(f"dataset {path!r}: unknown extension; use .jsonl, .json or .txt")
    if not records:
        raise QLoRADSError(f"dataset {path!r} holds no records; add at least one example")
    return records
