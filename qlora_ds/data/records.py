"""Read a dataset file into records, reporting bad lines by number.

Accepted: ``.jsonl`` (one JSON object per line) or ``.json`` (a list of objects, or JSON Lines as
``datasets.Dataset.to_json`` writes them), UTF-8 with or without a BOM, holding either prompt/response pairs (the
prompt ``instruction``, ``prompt`` or ``input``, with Alpaca's ``input`` or Dolly's ``context`` joined after an
``instruction``; the response ``response``, ``output`` or ``completion``), or chat turns (``messages``: [{"role",
"content"}, …], an assistant turn optionally with OpenAI's ``"weight": 0`` not to train on it); or ``.txt`` plain
text (one example per paragraph, trained on every token).
"""
from __future__ import annotations

import json
import os

from ..errors import QLoRADSError

PROMPT_KEYS = ("instruction", "prompt", "input")
CONTEXT_KEYS = ("input", "context")            # joined after an instruction (Alpaca, databricks-dolly-15k)
RESPONSE_KEYS = ("response", "output", "completion")
PAIR_KEYS = (*PROMPT_KEYS, "context", *RESPONSE_KEYS)


def _pair(obj, where: str) -> dict:
    """A prompt/response record as a two-turn chat. Each field used or refused: none is dropped silently."""
    # the first key that holds text (a table merged from several sources leaves the others "" or null)
    prompt_key = next((k for k in PROMPT_KEYS if not _blank(obj.get(k))),
                      next((k for k in PROMPT_KEYS if k in obj), None))
    response_key = next((k for k in RESPONSE_KEYS if not _blank(obj.get(k))),
                        next((k for k in RESPONSE_KEYS if k in obj), None))
    prompt, response = obj.get(prompt_key), obj.get(response_key)
    if not isinstance(prompt, str) or not isinstance(response, str) or not response.strip():
        raise QLoRADSError(f"{where}: needs non-empty string fields '{prompt_key or 'instruction'}' and "
                           f"'{response_key or 'response'}' (the prompt may also be 'prompt' or 'input', the "
                           f"response 'output' or 'completion')")
    used = {prompt_key, response_key}
    if prompt_key == "instruction":
        extra = [k for k in CONTEXT_KEYS if not _blank(obj.get(k))]
        if extra:
            if not isinstance(obj[extra[0]], str):
                raise QLoRADSError(f"{where}: field '{extra[0]}' must be a string")
            # "\n\n": the paragraph break between instruction and input in Alpaca's and Dolly's own prompt layouts,
            # without their "### Input:" headers, which the chat template's roles stand in for
            prompt = "\n\n".join(p for p in (prompt, obj[extra[0]]) if p.strip())
            used.add(extra[0])
    left = [k for k in PAIR_KEYS if k not in used and not _blank(obj.get(k))]
    if left:
        raise QLoRADSError(f"{where}: field '{left[0]}' is not used beside '{prompt_key}' and '{response_key}'; "
                           f"merge it into one of them or remove it (nothing is dropped silently)")
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]}


def _check_weights(msgs, where: str) -> None:
    """OpenAI's chat fine-tuning format: ``"weight": 0`` on an assistant message means do not train on it."""
    for m in msgs:
        if "weight" not in m:
            continue
        w = m["weight"]
        if m["role"] != "assistant" or isinstance(w, bool) or w not in (0, 1):
            raise QLoRADSError(f"{where}: 'weight' {w!r} on a {m['role']!r} message; only assistant messages take "
                               f"a weight, 0 (not trained on) or 1 (trained on)")


class Record(dict):
    """A record, equal to its plain dict, that keeps ``where`` it was read (``path:line``, ``path[i]``) for the errors
    found once it is tokenized."""
    where = ""


def _blank(value) -> bool:
    """A column a row does not use: null, "" or [] (tables merged from several sources write them for the others)."""
    return value is None or value == [] or (isinstance(value, str) and not value.strip())


def _normalise(obj, where: str) -> dict:
    if not isinstance(obj, dict):
        raise QLoRADSError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    rec = Record(_record(obj, where))
    rec.where = where
    return rec


def _record(obj: dict, where: str) -> dict:
    """The record's format from the columns it fills (messages, a prompt/response pair, text), else from those it has,
    to say what is wrong with them."""
    filled = {k for k, v in obj.items() if not _blank(v)}
    for keys in (filled, set(obj)):
        if "messages" in keys:
            return _chat(obj["messages"], where)
        if keys & set(PAIR_KEYS):
            return _pair(obj, where)
        if "text" in keys:
            text = obj["text"]
            if not isinstance(text, str) or not text.strip():
                got = "null" if text is None else f"{type(text).__name__} {str(text)[:40]!r}"
                raise QLoRADSError(f"{where}: field 'text' must be a non-empty string, got {got}; fix or drop the "
                                   f"record")
            return {"text": text}
    raise QLoRADSError(f"{where}: found keys {sorted(obj)}, expected a prompt ('instruction', 'prompt' or 'input') "
                       f"and a response ('response', 'output' or 'completion'), 'messages' or 'text'")


def _chat(msgs, where: str) -> dict:
    if not isinstance(msgs, list) or not msgs or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in msgs):
        raise QLoRADSError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} strings")
    if not any(m["role"] == "assistant" for m in msgs):
        raise QLoRADSError(f"{where}: the chat has no 'assistant' turn to train on; add one or drop the record")
    if any(m["role"] == "assistant" and not m["content"].strip() for m in msgs):
        raise QLoRADSError(f"{where}: an 'assistant' turn is empty (as a pair record's response may not be); "
                           f"fill it or drop the record")
    _check_weights(msgs, where)
    return {"messages": msgs}


def _json_lines(path: str) -> list[dict]:
    """One record per line; blank lines at the end (an editor's extra newline) are fine, one inside is an error
    (a sign of a file cut or joined by hand)."""
    records, blank = [], None
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")     # a BOM (Notepad, PowerShell 5)
            except UnicodeDecodeError as err:
                raise QLoRADSError(f"{path}:{lineno}: not UTF-8 text ({err.reason} at byte {err.start}); "
                                   f"re-encode the file as UTF-8") from None
            if not line.strip():
                blank = blank or lineno
                continue
            if blank is not None:
                raise QLoRADSError(f"{path}:{blank}: empty line; remove it (one JSON object per line)")
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise QLoRADSError(f"{path}:{lineno}: not valid JSON ({err.msg}); fix or remove the line") from None
            records.append(_normalise(obj, f"{path}:{lineno}"))
    return records


def load_records(path: str) -> list[dict]:
    """Records as ``{"messages": [...]}`` (chat, trained on assistant turns) or ``{"text": ...}``."""
    if not os.path.isfile(path):
        raise QLoRADSError(f"dataset file {path!r} does not exist; pass --dataset PATH to a .jsonl/.json/.txt file")
    records: list[dict] = []
    if path.endswith(".jsonl"):
        records = _json_lines(path)
    elif path.endswith(".json"):
        with open(path, encoding="utf-8-sig") as fh:
            try:
                data = json.load(fh)
            except json.JSONDecodeError as err:
                if err.msg == "Extra data" and err.lineno >= 2:   # JSON Lines, as Dataset.to_json writes by default
                    return _json_lines(path)
                raise QLoRADSError(f"{path}:{err.lineno}: not valid JSON ({err.msg}); fix the file") from None
            except UnicodeDecodeError as err:
                raise QLoRADSError(f"{path}: not UTF-8 text ({err.reason}); re-encode the file as UTF-8") from None
        if isinstance(data, dict):      # one record: a JSON Lines file of one line, or a lone object
            data = [data]
        if not isinstance(data, list):
            raise QLoRADSError(f"{path}: expected a JSON list of records (or JSON Lines: one record per line)")
        records = [_normalise(obj, f"{path}[{i}]") for i, obj in enumerate(data)]
    elif path.endswith(".txt"):
        with open(path, encoding="utf-8-sig") as fh:
            try:
                records = [{"text": p.strip()} for p in fh.read().split("\n\n") if p.strip()]
            except UnicodeDecodeError as err:
                raise QLoRADSError(f"{path}: not UTF-8 text ({err.reason}); re-encode the file as UTF-8") from None
    else:
        raise QLoRADSError(f"dataset {path!r}: unknown extension; use .jsonl, .json or .txt")
    if not records:
        raise QLoRADSError(f"dataset {path!r} holds no records; add at least one example")
    return records
