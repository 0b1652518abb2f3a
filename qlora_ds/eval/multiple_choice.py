"""Multiple-choice accuracy in MMLU's format, scored as the QLoRA repository's MMLU evaluation does.

Records (one question each, four choices A–D, the answer letter, an optional subject):

* JSONL: ``{"question": str, "choices": [a, b, c, d], "answer": "A"|…|"D" (or 0–3), "subject": str}``;
  the choices may also be given as keys ``"A"``, ``"B"``, ``"C"``, ``"D"``.
* CSV: MMLU's own files (no header: question, A, B, C, D, answer; the subject comes from the file
  name, ``abstract_algebra_test.csv`` -> "abstract algebra"), or a header row
  ``question,A,B,C,D,answer[,subject]``.

Prompt (k-shot, the shots taken from a dev split, same subject first, in file order)::

    The following are multiple choice questions (with answers) about {subject}.\\n\\n
    {question}\\nA. {a}\\nB. {b}\\nC. {c}\\nD. {d}\\nAnswer: {X}\\n\\n     (× k shots)
    {question}\\nA. …\\nD. {d}\\nAnswer:

Scoring: the next-token logits at the end of the prompt, restricted to the four tokens " A", " B",
" C", " D" (each must be a single token of the tokenizer); the prediction is their argmax. If a
prompt is longer than ``max_len``, shots are dropped one at a time (as MMLU's evaluation does).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
from collections import defaultdict

import torch

from ..errors import QLoRADSError

log = logging.getLogger(__name__)

LETTERS = ("A", "B", "C", "D")


@dataclasses.dataclass(frozen=True)
class MCRecord:
    question: str
    choices: tuple[str, str, str, str]
    answer: str                 # "A" … "D"
    subject: str = ""


# ---------------------------------------------------------------------------------------- records
def _answer(value, where: str) -> str:
    if isinstance(value, bool):
        value = None
    if isinstance(value, str) and value.strip() in ("0", "1", "2", "3"):     # a CSV column holds strings
        value = int(value)
    if isinstance(value, int) and 0 <= value < 4:
        return LETTERS[value]
    if isinstance(value, str) and value.strip().upper() in LETTERS:
        return value.strip().upper()
    raise QLoRADSError(f"{where}: answer {value!r} must be one of A, B, C, D (or 0–3)")


def _record(obj, where: str, subject: str = "") -> MCRecord:
    if not isinstance(obj, dict):
        raise QLoRADSError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    q = obj.get("question")
    if not isinstance(q, str) or not q.strip():
        raise QLoRADSError(f"{where}: needs a non-empty string 'question'")
    if "choices" in obj:
        choices = obj["choices"]
    elif all(k in obj for k in LETTERS):
        choices = [obj[k] for k in LETTERS]
    else:
        raise QLoRADSError(f"{where}: needs 'choices' (a list of 4 strings) or keys 'A', 'B', 'C', 'D'")
    if not isinstance(choices, list) or len(choices) != 4 or not all(isinstance(c, str) for c in choices):
        n = len(choices) if isinstance(choices, list) else type(choices).__name__
        raise QLoRADSError(f"{where}: 'choices' must be a list of exactly 4 strings (got {n})")
    if "answer" not in obj:
        raise QLoRADSError(f"{where}: needs an 'answer' letter (A–D)")
    subj = obj.get("subject", subject)
    if not isinstance(subj, str):
        raise QLoRADSError(f"{where}: 'subject' must be a string")
    return MCRecord(q.strip(), tuple(c.strip() for c in choices), _answer(obj["answer"], where), _subject(subj))


def _subject(name: str) -> str:
    """"abstract_algebra" (cais/mmlu, file names) and "abstract algebra" are one subject, written as MMLU's header
    writes it, so a JSONL test set finds its subject's shots in MMLU's dev CSVs."""
    return " ".join(name.replace("_", " ").split())


def _subject_from_name(path: str) -> str:
    stem = os.path.splitext(os.path.basename(path))[0]
    for suffix in ("_test", "_dev", "_val"):
        stem = stem.removesuffix(suffix)
    return stem.replace("_", " ")


def load_mc(path: str) -> list[MCRecord]:
    """Records from a .jsonl or .csv file; malformed lines raise a QLoRADSError naming path:line."""
    if os.path.isdir(path):
        raise QLoRADSError(f"multiple-choice file {path!r} is a directory; pass one file (MMLU's <subject>_test.csv, "
                           f"or a .jsonl of all subjects)")
    if not os.path.isfile(path):
        raise QLoRADSError(f"multiple-choice file {path!r} does not exist")
    records: list[MCRecord] = []
    try:  # utf-8-sig: a CSV saved by Excel starts with a byte-order mark, which would hide its header
        if path.endswith(".jsonl"):
            with open(path, encoding="utf-8-sig") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise QLoRADSError(f"{path}:{lineno}: not valid JSON ({err.msg}); fix or remove the "
                                           f"line") from None
                    records.append(_record(obj, f"{path}:{lineno}"))
        elif path.endswith(".csv"):
            with open(path, encoding="utf-8-sig", newline="") as fh:
                rows = list(csv.reader(fh))
            header = [c.strip().lower() for c in rows[0]] if rows else []
            has_header = bool(header) and header[0] == "question"
            subject = _subject_from_name(path)
            for i, row in enumerate(rows[1:] if has_header else rows, 2 if has_header else 1):
                if not any(c.strip() for c in row):
                    continue
                where = f"{path}:{i}"
                if has_header:
                    if len(row) != len(header):
                        raise QLoRADSError(f"{where}: {len(row)} columns, the header has {len(header)}")
                    obj = dict(zip(header, row))
                    obj = {k.upper() if k in ("a", "b", "c", "d") else k: v for k, v in obj.items()}
                else:
                    if len(row) != 6:
                        raise QLoRADSError(f"{where}: {len(row)} columns; MMLU rows are question,A,B,C,D,answer")
                    obj = {"question": row[0], "choices": row[1:5], "answer": row[5]}
                records.append(_record(obj, where, subject))
        else:
            raise QLoRADSError(f"multiple-choice file {path!r}: use .jsonl or .csv")
    except UnicodeDecodeError as err:
        raise QLoRADSError(f"multiple-choice file {path!r} is not UTF-8 text ({err.reason} at byte {err.start}); "
                           f"save it as UTF-8") from None
    if not records:
        raise QLoRADSError(f"multiple-choice file {path!r} holds no questions")
    return records


# ----------------------------------------------------------------------------------------- prompts
def format_question(rec: MCRecord, with_answer: bool) -> str:
    text = rec.question + "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, rec.choices))
    return text + "\nAnswer:" + (f" {rec.answer}\n\n" if with_answer else "")


def header(subject: str) -> str:
    about = f" about {subject}" if subject else ""
    return f"The following are multiple choice questions (with answers){about}.\n\n"


def select_shots(rec: MCRecord, dev: list[MCRecord], k: int) -> list[MCRecord]:
    """k dev examples: the question's own subject first (file order), then others; never the question."""
    if k <= 0:
        return []
    pool = [d for d in dev if (d.question, d.choices) != (rec.question, rec.choices)]   # whatever its subject says
    same = [d for d in pool if d.subject == rec.subject]
    other = [d for d in pool if d.subject != rec.subject]
    return (same + other)[:k]


def build_prompt(rec: MCRecord, shots: list[MCRecord]) -> str:
    return header(rec.subject) + "".join(format_question(s, True) for s in shots) + format_question(rec, False)


def choice_token_ids(tokenizer) -> list[int]:
    """The token that follows "Answer:" for " A" … " D", as the prompt tokenizes it (a SentencePiece tokenizer may
    split a bare " A" otherwise); each must be exactly one token."""
    ids = []
    stem = tokenizer("Answer:", add_special_tokens=False)["input_ids"]
    for letter in LETTERS:
        toks = tokenizer("Answer: " + letter, add_special_tokens=False)["input_ids"]
        if len(toks) != len(stem) + 1 or toks[:len(stem)] != stem:
            raise QLoRADSError(f"the tokenizer writes 'Answer: {letter}' as {toks} after 'Answer:' = {stem}: not one "
                               f"token per letter, which the choice-letter scoring needs")
        ids.append(toks[-1])
    if len(set(ids)) != 4:
        raise QLoRADSError(f"choice letters map to repeated token ids {ids}")
    return ids


# ----------------------------------------------------------------------------------------- scoring
def _encode(tokenizer, rec, shots, max_len):
    """The prompt's ids, the shots dropped from the last until it fits: BOS where the tokenizer puts one, never an EOS
    after "Answer:" (a tokenizer with add_eos_token had every question scored after its end of sequence)."""
    shots = list(shots)
    while True:
        ids = _without_appended_specials(tokenizer, build_prompt(rec, shots))
        if max_len is None or len(ids) <= max_len:
            return ids, len(shots)
        if not shots:
            raise QLoRADSError(f"a 0-shot prompt of {len(ids)} tokens exceeds the limit of {max_len} (--max-len, "
                               f"else the model's context) (question: {rec.question[:60]!r}…); raise --max-len "
                               f"where the model's context allows, or leave the question out")
        shots.pop()


def _without_appended_specials(tokenizer, text: str) -> list[int]:
    """``text``'s ids with the special tokens the tokenizer puts in front (BOS) but none it appends (EOS)."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]
    for k in range(len(ids) - len(plain) + 1):
        if ids[k:k + len(plain)] == plain:
            return ids[:k + len(plain)]
    return plain


def _last_token_logits(model, ids: torch.Tensor, mask: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """(batch, vocab) logits at each row's last real token. The LM head runs on those positions only
    (transformers' ``logits_to_keep`` with one index per row): b rows instead of b·width, which on a
    5-shot prompt is most of the head's compute and its largest tensor. Models that do not take it
    (or ignore it) return every position, and the rows are picked here."""
    rows = torch.arange(ids.shape[0], device=ids.device)
    try:   # no KV cache: none is reused, and the cache of a 5-shot prompt is most of the peak memory
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=last.view(-1, 1), use_cache=False).logits
    except TypeError:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    if logits.shape[1] == 1 and ids.shape[1] > 1:
        return logits[:, 0]
    return logits[rows, last.to(logits.device)]


@torch.no_grad()
def evaluate_mc(model, tokenizer, records: list[MCRecord], dev: list[MCRecord] | None = None, shots: int = 5,
                batch_size: int = 4, max_len: int | None = None, return_predictions: bool = False) -> dict:
    """Accuracy overall (micro), per subject, and the subjects' macro average."""
    if shots and not dev:
        raise QLoRADSError(f"{shots}-shot evaluation needs a dev split (--mc-dev FILE); or pass --shots 0")
    cfg = getattr(model, "config", None)
    if max_len is None:
        max_len = getattr(cfg, "max_position_embeddings", None)
    letter_ids = torch.tensor(choice_token_ids(tokenizer))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    dev_param = next(model.parameters()).device
    encoded, used = zip(*[_encode(tokenizer, r, select_shots(r, dev or [], shots), max_len) for r in records]) \
        if records else ((), ())
    if shots and sum(used) < shots * len(records):   # a short dev split, or prompts over the length limit
        log.warning("%d-shot asked, %.2f examples per question used on average (dev split of %d; prompts cut to "
                    "%s tokens: --max-len, else the model's context)", shots, sum(used) / max(1, len(records)),
                    len(dev or []), max_len)
    preds: list[str] = []
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(encoded), batch_size):
            chunk = encoded[i:i + batch_size]
            width = max(len(c) for c in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for j, c in enumerate(chunk):          # right padding: a real token never sees a pad
                ids[j, :len(c)], mask[j, :len(c)] = torch.tensor(c), 1
            last = torch.tensor([len(c) - 1 for c in chunk], device=dev_param)
            logits = _last_token_logits(model, ids.to(dev_param), mask.to(dev_param), last)
            scores = logits[:, letter_ids.to(logits.device)]
            preds += [LETTERS[k] for k in scores.float().argmax(-1).tolist()]
    finally:
        model.train(was_training)
    per: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for rec, pred in zip(records, preds):
        per[rec.subject][0] += int(pred == rec.answer)
        per[rec.subject][1] += 1
    correct = sum(c for c, _ in per.values())
    result = {
        "accuracy": correct / len(records), "correct": correct, "total": len(records), "shots": shots,
        "shots_used_mean": sum(used) / len(records),
        "subjects": {s: {"accuracy": c / n, "correct": c, "total": n} for s, (c, n) in sorted(per.items())},
        "macro_accuracy": sum(c / n for c, n in per.values()) / len(per),
    }
    if return_predictions:
        result["predictions"] = preds
    return result
