"""Tokenize records; labels are -100 everywhere but on the assistant's tokens (train on the response only)."""
from __future__ import annotations

import hashlib
import json
import logging
import os

from ..errors import QLoRADSError
from .examples import IGNORE, Examples, ExamplesBuilder  # noqa: F401 (IGNORE is imported from here too)

log = logging.getLogger(__name__)


def _chat_ids(tokenizer, messages, marked=None) -> tuple[list[int], list[int]]:
    """Token ids of a chat and a mask of the tokens of its ``marked`` assistant messages (default: those trained). By
    rendering prefixes of the chat where the template renders each prefix as the start of the next (ChatML, Llama 3,
    …); else by locating the assistant turns in the rendering of the whole chat (``_span_ids``: Qwen3 drops earlier
    turns' reasoning, Mistral v0.3 moves the system prompt into the last user turn)."""
    marked = marked or _trained
    ids: list[int] = []
    mask: list[int] = []
    for i, msg in enumerate(messages):
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False,
                                             add_generation_prompt=False)
        full = tokenizer(upto, add_special_tokens=False)["input_ids"]
        if full[:len(ids)] != ids:
            return _span_ids(tokenizer, messages, marked)
        new = full[len(ids):]
        if marked(msg) and i == 0:
            return _span_ids(tokenizer, messages, marked)   # an opening assistant turn: no prompt to render before it
        if marked(msg):
            # the assistant header belongs to the prompt; train on what follows it
            prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            if full[:len(prompt_ids)] != prompt_ids:
                return _span_ids(tokenizer, messages, marked)
            head = max(0, len(prompt_ids) - len(ids))
            mask += [0] * min(head, len(new)) + [1] * max(0, len(new) - head)
        else:
            mask += [0] * len(new)
        ids = full
    return ids, mask


def _trained(msg) -> bool:
    """An assistant message not marked ``"weight": 0`` (OpenAI's fine-tuning format: do not learn this answer)."""
    return msg["role"] == "assistant" and msg.get("weight", 1) != 0


def _never(msg) -> bool:
    return False


def _weight_0(msg) -> bool:
    """An assistant message marked ``"weight": 0``: untrained even with --train-on-prompt."""
    return msg["role"] == "assistant" and msg.get("weight", 1) == 0


PROBE = "qlora-ds probe answer"


def _turn_end(tokenizer) -> str:
    """What the template writes after an assistant message's content (e.g. ``<|im_end|>\n``, ``</s>``)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": PROBE}],
                                         tokenize=False)
    at = text.rfind(PROBE)
    return text[at + len(PROBE):] if at >= 0 else ""


def _span_ids(tokenizer, messages, marked=None) -> tuple[list[int], list[int]]:
    """The whole chat rendered once; masked: the tokens overlapping a ``marked`` (default: trained) assistant message's
    content and the turn end the template writes after it."""
    marked = marked or _trained
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    if not getattr(tokenizer, "is_fast", False):
        raise QLoRADSError("this chat template renders earlier turns differently once the chat goes on, so the "
                           "assistant tokens are found by character offsets, which needs a fast tokenizer; load it "
                           f"with use_fast=True{'' if marked is _weight_0 else ' or pass --train-on-prompt'}")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    end_text, spans, mark = _turn_end(tokenizer), [], "qlora-ds answer"
    while mark in text:
        mark += "!"
    for i, msg in enumerate(messages):
        if marked(msg):
            start, end = _locate(tokenizer, messages, i, text, mark)
            spans.append((start, _past_turn_end(text, end, end_text, enc["offset_mapping"])))
    mask = [int(any(a < e and b > s for s, e in spans)) for a, b in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


def _past_turn_end(text: str, end: int, end_text: str, offsets) -> int:
    """``end`` (of an assistant message's content in ``text``) moved past the turn end the template writes after it:
    all of ``end_text`` where that follows; else the part of it that follows, up to a token's end. (Phi-3 writes EOS
    after the whole chat only: the last turn ends '<|end|>\\n<|endoftext|>', an earlier one '<|end|>\\n<|user|>'.)"""
    if not end_text or text.startswith(end_text, end):
        return end + len(end_text)
    shared = len(os.path.commonprefix([end_text, text[end:end + len(end_text)]]))
    cut = max((b for _, b in offsets if end < b <= end + shared), default=end)
    return cut if text[end:cut].strip() else end


def _locate(tokenizer, messages, i, text: str, mark: str) -> tuple[int, int]:
    """Where assistant message ``i``'s content is in ``text`` (the whole chat's rendering): the chat is rendered
    again with ``mark`` as that content, and the template's text around the mark is around the content too. Searching
    the text for the content instead finds the same words in a system prompt or a question first."""
    content = messages[i]["content"]
    marked = tokenizer.apply_chat_template([*messages[:i], {**messages[i], "content": mark}, *messages[i + 1:]],
                                           tokenize=False)
    at = marked.find(mark)
    head, tail = marked[:at], marked[at + len(mark):]
    if at >= 0 and mark not in tail and len(head) + len(tail) <= len(text) and text.startswith(head) \
            and text.endswith(tail) and text[len(head):len(text) - len(tail)] in (content, content.strip()):
        return len(head), len(text) - len(tail)
    # the template renders this content otherwise than a plain string (Qwen3 splits off <think> reasoning): the
    # content's text, where it occurs just once
    content = content.strip()
    if content and text.count(content) == 1:
        start = text.find(content)
        return start, start + len(content)
    raise QLoRADSError(f"the chat template does not render assistant message {messages[i]['content'][:40]!r} "
                       f"verbatim in one place, so its tokens cannot be found; {_span_fix(messages[i])}")


def _span_fix(msg) -> str:
    """What lets a chat whose ``msg`` cannot be found in its rendering train: under --train-on-prompt only weight-0
    answers are looked for."""
    if _weight_0(msg):
        return "drop that answer's \"weight\": 0 (or the record), or use another template"
    return "pass --train-on-prompt or use another template"


def _leading_specials(tokenizer) -> list[int]:
    """What the tokenizer itself puts before a text: BOS for Llama / Mistral base checkpoints (pretrained with it at
    position 0), nothing for GPT-2 / Qwen."""
    body = list(tokenizer("x", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("x", add_special_tokens=True)["input_ids"])
    return next((full[:at] for at in range(len(full) - len(body) + 1) if full[at:at + len(body)] == body), [])


def _plain_ids(tokenizer, messages, lead: list[int], marked=None) -> tuple[list[int], list[int]]:
    """The ``### Role:`` format (no chat template) after ``lead``: the tokenizer's own leading specials
    (``_leading_specials``), or none for runs from before --plain-bos. The mask: as ``_chat_ids``'."""
    marked = marked or _trained
    ids: list[int] = list(lead)
    mask: list[int] = [0] * len(ids)
    for msg in messages:
        text = (f"### {msg['role'].capitalize()}:\n{msg['content']}\n\n")
        new = tokenizer(text, add_special_tokens=False)["input_ids"]
        if marked(msg):
            head = len(tokenizer(f"### {msg['role'].capitalize()}:\n", add_special_tokens=False)["input_ids"])
            mask += [0] * head + [1] * (len(new) - head)
        else:
            mask += [0] * len(new)
        ids += new
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
        mask.append(int(bool(messages) and marked(messages[-1])))   # the end of a marked answer, nothing else
    return ids, mask


def prompt_ids(tokenizer, messages, plain_bos: bool = True) -> list[int]:
    """The ids that prompt the assistant's reply to ``messages``, tokenized as training tokenizes a chat: the chat
    template with its generation prompt, or else the tokenizer's leading specials (``plain_bos``), the plain
    ``### Role:`` messages one by one (byte-level BPE and SentencePiece tokenize a message differently alone than
    inside the whole text) and the assistant header."""
    if getattr(tokenizer, "chat_template", None) is not None:
        from jinja2 import TemplateError

        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except TemplateError as err:
            roles = [m["role"] for m in messages]
            hint = " (drop --system: this template takes no system message)" if "system" in roles else ""
            raise QLoRADSError(f"the tokenizer's chat template refused a chat of roles {roles}: {err}{hint}") from None
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    ids, _ = _plain_ids(tokenizer, messages, _leading_specials(tokenizer) if plain_bos else [])
    if tokenizer.eos_token_id is not None:
        ids = ids[:-1]                                    # the eos _plain_ids appends after the last message
    return ids + list(tokenizer("### Assistant:\n", add_special_tokens=False)["input_ids"])


def tokenize_records(records, tokenizer, max_len: int, model_max_len: int | None = None,
                     train_on_prompt: bool = False, plain_bos: bool = True,
                     text_windows: bool = True, weight0_untrained: bool = True) -> Examples:
    """input_ids/labels per record, cut at ``max_len`` (counted in a warning); a text record longer than that split
    into windows of ``max_len`` (``text_windows``; False: cut, as runs from before --text-windows). ``plain_bos``: see
    ``_plain_ids``. ``train_on_prompt``: every token but those of weight-0 answers is trained (every token at all with
    ``weight0_untrained`` False, as runs from before --weight0-untrained). A max_len beyond the model's context is
    refused."""
    if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 2:
        raise QLoRADSError(f"--max-len {max_len!r} must be an integer >= 2 (a prompt token and a response token); "
                           f"QLoRA uses 512 to 1024")
    if model_max_len is not None and max_len > model_max_len:
        raise QLoRADSError(f"--max-len {max_len} exceeds the model's context of {model_max_len} tokens; "
                           f"lower --max-len to at most {model_max_len}")
    from jinja2 import TemplateError

    use_template = getattr(tokenizer, "chat_template", None) is not None
    lead = _leading_specials(tokenizer) if plain_bos and not use_template else []
    examples, truncated, targetless, unweighted = ExamplesBuilder(), 0, 0, 0
    cut, cut_tokens, total_tokens, split, windows, no_system = 0, 0, 0, 0, 0, 0
    for i, rec in enumerate(records):
        where = getattr(rec, "where", "")       # path:line of a loaded record (records.Record)
        if "text" in rec:
            ids = tokenizer(rec["text"], add_special_tokens=True)["input_ids"]
            mask = [1] * len(ids)
        elif not train_on_prompt and not any(_trained(m) for m in rec["messages"]):
            unweighted += 1
            continue
        else:
            # the mask is inverted below; an older run's --train-on-prompt (no weight0_untrained) trains every token
            marked = (_weight_0 if weight0_untrained else _never) if train_on_prompt else _trained
            try:
                if use_template:
                    ids, mask = _chat_ids(tokenizer, rec["messages"], marked)
                    no_system += _drops_system(tokenizer, rec["messages"])
                else:
                    ids, mask = _plain_ids(tokenizer, rec["messages"], lead, marked)
            except QLoRADSError as err:                # (a ValueError) from _span_ids: not the template's
                at = where or f"record #{i} (counting from 0)"
                raise QLoRADSError(f"{at}: {err}") from None
            except (TemplateError, ValueError) as err:   # transformers raises ValueError for some chats itself
                at, note = (where, "") if where else (f"record #{i}", "; counting records from 0")
                raise QLoRADSError(f"{at}: the tokenizer's chat template refused it ({err}{note}); fix or drop that "
                                   f"record") from None
            if train_on_prompt:      # the prompts too, but never an answer of weight 0 (nor its turn end)
                mask = [1 - m for m in mask]
        total_tokens += len(ids)
        pieces = [(ids, mask)]
        if "text" in rec and text_windows and len(ids) > max_len:
            # windows overlapping by one token: each token but the record's first is a target once (run_clm's
            # group_texts, less the target that each window's first token would lose)
            pieces = [(ids[s:s + max_len], mask[s:s + max_len]) for s in range(0, len(ids) - 1, max_len - 1)]
            split, windows = split + 1, windows + len(pieces)
        # split_heldout's units: the windows of one text, the chats of one opening
        record = i if "text" in rec and len(pieces) > 1 else None
        opening = None if "text" in rec else _opening(rec)
        for ids, mask in pieces:
            # position 0 is never a target (the causal shift drops it): a record without a later label has a 0/0 loss
            if not any(mask[1:max_len]):
                truncated += any(mask[1:])
                targetless += not any(mask[1:])
                continue
            if len(ids) > max_len:
                cut, cut_tokens = cut + 1, cut_tokens + len(ids) - max_len
            examples.add(ids[:max_len], mask[:max_len], record, opening)
    if not examples:
        fixes = ["raise --max-len"] * bool(truncated) + ["add records longer than one token"] * bool(targetless) + [
            f"{unweighted} chats have only weight-0 answers: give those to learn weight 1"] * bool(unweighted)
        raise QLoRADSError(f"no example kept a response token within --max-len {max_len} (the first token is never "
                           f"a target); " + "; ".join(fixes))
    if cut:
        log.warning("%d of %d records were cut at --max-len %d (%d of %d tokens dropped, %.1f%%; a cut answer "
                    "loses its turn end); raise --max-len to keep them", cut, len(records), max_len, cut_tokens,
                    total_tokens, 100 * cut_tokens / total_tokens)
    if split:
        log.info("%d text records longer than --max-len %d were split into %d windows of up to %d tokens", split,
                 max_len, windows, max_len)
    if truncated:
        log.warning("%d of %d records lost their whole response to --max-len %d and are left out; raise --max-len "
                    "to keep them", truncated, len(records), max_len)
    if targetless:
        log.warning("%d of %d records have no token to predict (e.g. a one-token text paragraph: the first token "
                    "is never a target) and are left out", targetless, len(records))
    if unweighted:
        log.warning("%d of %d records are chats whose every answer has weight 0 (nothing to train on) and are left "
                    "out", unweighted, len(records))
    if no_system:
        log.warning("the chat template leaves the system message out of the training text of %d of %d records (as "
                    "Mistral v0.3's writes it only into a chat's final user turn, which a training chat does not end "
                    "with): they train without it; fold the system text into the first user message to keep it",
                    no_system, len(records))
    return examples.finish()


def _opening(rec) -> bytes:
    """A digest of a chat's messages up to its first exchange (the first user message and the assistant answer after
    it, the system prompt included): the records of a conversation stored once per turn, or once per branch, share
    it, while pairs that only ask the same question (with other answers) stay apart, as they were split before."""
    msgs = rec["messages"]
    user = next((j for j, m in enumerate(msgs) if m["role"] == "user"), 0)
    upto = next((j for j, m in enumerate(msgs) if m["role"] == "assistant" and j > user), len(msgs) - 1)
    return hashlib.blake2b(json.dumps(msgs[:upto + 1], sort_keys=True).encode(), digest_size=16).digest()


def _drops_system(tokenizer, messages) -> bool:
    """Whether the template's rendering of the whole chat (the training text) lacks a system message's content."""
    system = [m["content"].strip() for m in messages if m["role"] == "system" and m["content"].strip()]
    if not system:
        return False
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    return any(s not in text for s in system)


def check_vocab(tokenizer, model_vocab: int) -> None:
    """A tokenizer with more tokens than the model's embedding would index out of range mid-run."""
    if len(tokenizer) > model_vocab:
        raise QLoRADSError(f"the tokenizer has {len(tokenizer)} tokens but the model's embedding has {model_vocab}; "
                           f"use the tokenizer saved with this model (or resize the embeddings first)")
