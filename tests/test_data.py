"""Batch collation (right padding, pad-to-multiple, labels and mask of the padding) and response-only labels."""
import pytest
import torch

from qlora_ds.data import collate
from qlora_ds.data.tokenize import IGNORE


def _example(n: int, start: int = 1) -> dict:
    ids = torch.arange(start, start + n)
    return {"input_ids": ids, "labels": ids.clone()}


def test_pad_to_multiple_rounds_up_and_masks_the_padding():
    batch = collate([_example(5), _example(20, 100)], pad_id=0, pad_to_multiple_of=16)
    assert batch["input_ids"].shape == (2, 32)
    assert batch["attention_mask"].sum(1).tolist() == [5, 20]
    assert (batch["labels"][0, 5:] == IGNORE).all() and (batch["labels"][1, 20:] == IGNORE).all()
    assert torch.equal(batch["input_ids"][1, :20], torch.arange(100, 120))
    assert (batch["input_ids"][0, 5:] == 0).all()


def test_pad_to_multiple_never_exceeds_max_width_nor_cuts_an_example():
    assert collate([_example(20)], 0, pad_to_multiple_of=16, max_width=24)["input_ids"].shape == (1, 24)
    assert collate([_example(30)], 0, pad_to_multiple_of=16, max_width=24)["input_ids"].shape == (1, 30)
    assert collate([_example(20)], 0)["input_ids"].shape == (1, 20)            # default: no rounding
    assert collate([_example(32)], 0, pad_to_multiple_of=16)["input_ids"].shape == (1, 32)


# ------------------------------------------------------------------------------ response-only labels
# A template that renders the last assistant turn after the last user turn with an extra marker (as Qwen3 writes an
# empty <think></think> there only), and one that puts the system prompt into the last user turn (Mistral v0.3):
# neither renders a prefix of the chat as the start of the whole, which the prefix method assumes.
QWEN3_LIKE = ("{% set last = namespace(i=0) %}{% for m in messages %}{% if m['role'] == 'user' %}"
              "{% set last.i = loop.index0 %}{% endif %}{% endfor %}{% for m in messages %}<|{{ m['role'] }}|> "
              "{% if m['role'] == 'assistant' and loop.index0 > last.i %}<s> {% endif %}{{ m['content'] }} </s> "
              "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}")
MISTRAL_LIKE = ("{% set sys = messages[0]['content'] if messages[0]['role'] == 'system' else none %}"
                "{% for m in (messages[1:] if sys else messages) %}{% if m['role'] == 'user' %}<|user|> "
                "{% if loop.last and sys %}{{ sys }} {% endif %}{{ m['content'] }} {% else %}<|assistant|> "
                "{{ m['content'] }} </s> {% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}")
CHAT = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello, how are you?"},
        {"role": "user", "content": "What is AI?"}, {"role": "assistant", "content": "A branch of computer science."}]


def _word_tokenizer(tmp_path, template):
    from transformers import AutoTokenizer

    from .finetune_fixtures import CHAT_PAIRS, save_word_level_tokenizer
    save_word_level_tokenizer(CHAT_PAIRS, str(tmp_path), template)
    return AutoTokenizer.from_pretrained(str(tmp_path))


def _trained(tok, messages):
    from qlora_ds.data.tokenize import tokenize_records
    ex, = tokenize_records([{"messages": messages}], tok, 64)
    return tok.convert_ids_to_tokens([t for t in ex["labels"].tolist() if t != -100])


@pytest.mark.parametrize("template,messages", [
    (QWEN3_LIKE, CHAT),
    (MISTRAL_LIKE, [{"role": "system", "content": "Name a color"}, *CHAT[2:]]),
    (MISTRAL_LIKE, [{"role": "system", "content": "Name a color"}, *CHAT]),
])
def test_response_labels_with_templates_that_rerender_earlier_turns(tmp_path, template, messages):
    """Every assistant turn's words and its turn end are trained, nothing else: the rendering of the whole chat, not
    of its prefixes (which trained the second user turn under the Qwen3 template and nothing under Mistral's)."""
    want = [w for m in messages if m["role"] == "assistant" for w in [*m["content"].split(), "</s>"]]
    assert _trained(_word_tokenizer(tmp_path, template), messages) == want


def test_span_method_agrees_with_the_prefix_method_on_a_stable_template(tmp_path):
    from qlora_ds.data.tokenize import _chat_ids, _span_ids

    from .finetune_fixtures import WORD_TEMPLATE
    tok = _word_tokenizer(tmp_path, WORD_TEMPLATE)
    assert _chat_ids(tok, CHAT) == _span_ids(tok, CHAT)
    assert _trained(tok, CHAT) == [*CHAT[1]["content"].split(), "</s>", *CHAT[3]["content"].split(), "</s>"]


def test_template_errors_name_the_record_and_dropped_records_are_counted(tmp_path, caplog):
    from qlora_ds.data.tokenize import tokenize_records
    from qlora_ds.errors import QLoRADSError
    strict = ("{% for m in messages %}{% if loop.index0 % 2 == 0 and m['role'] != 'user' %}"
              "{{ raise_exception('roles must alternate') }}{% endif %}<|{{ m['role'] }}|> {{ m['content'] }} </s> "
              "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}")
    tok = _word_tokenizer(tmp_path, strict)
    bad = [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Hi"}]
    with pytest.raises(QLoRADSError, match="record #1: the tokenizer's chat template refused it .*roles must alternate"):
        tokenize_records([{"messages": CHAT[:2]}, {"messages": bad}], tok, 64)
    long = [{"role": "user", "content": " ".join(["Hi there"] * 20)}, {"role": "assistant", "content": "Blue"}]
    got = tokenize_records([{"messages": CHAT[:2]}, {"messages": long}, {"messages": long}], tok, 16)
    assert len(got) == 1 and "2 of 3 records lost their whole response to --max-len 16" in caplog.text


# the system prompt goes into the last user turn (Mistral v0.3 as a chat goes on), rendered wherever that turn is
MISTRAL_LAST_USER = ("{% set sys = messages[0]['content'] if messages[0]['role'] == 'system' else none %}"
                     "{% set convo = messages[1:] if sys else messages %}{% set ns = namespace(last=-1) %}"
                     "{% for m in convo %}{% if m['role'] == 'user' %}{% set ns.last = loop.index0 %}{% endif %}"
                     "{% endfor %}{% for m in convo %}{% if m['role'] == 'user' %}<|user|> "
                     "{% if loop.index0 == ns.last and sys %}{{ sys }} {% endif %}{{ m['content'] }} {% else %}"
                     "<|assistant|> {{ m['content'] }} </s> {% endif %}{% endfor %}"
                     "{% if add_generation_prompt %}<|assistant|> {% endif %}")


def _assistant_turns(tokens):
    """1 for the tokens of an assistant turn's content and its </s>, read off the rendering's structure."""
    inside, mask = False, []
    for t in tokens:
        inside = inside or t == "<|assistant|>"
        mask.append(int(inside and t not in ("<|assistant|>", "<s>")))
        inside = inside and t != "</s>"
    return mask


@pytest.mark.parametrize("template,messages", [
    # the last answer's words are also the system prompt, which renders before that answer
    (MISTRAL_LAST_USER, [{"role": "system", "content": "Blue is a color."}, {"role": "user", "content": "Name a color"},
                         {"role": "assistant", "content": "One two three."},
                         {"role": "user", "content": "Name a color"},
                         {"role": "assistant", "content": "Blue is a color."}]),
    # the last answer repeats the first one and the question before it
    (QWEN3_LIKE, [CHAT[0], CHAT[1], {"role": "user", "content": CHAT[1]["content"]}, CHAT[1]]),
])
def test_response_labels_are_the_assistant_turns_even_when_their_words_occur_earlier(tmp_path, template, messages):
    """An answer whose words also occur earlier in the chat: its own turn is trained, not the earlier occurrence
    (text.find from the previous answer found the system prompt / the question instead)."""
    from qlora_ds.data.tokenize import tokenize_records
    tok = _word_tokenizer(tmp_path, template)
    ex, = tokenize_records([{"messages": messages}], tok, 64)
    tokens = tok.convert_ids_to_tokens(ex["input_ids"].tolist())
    assert [int(t != IGNORE) for t in ex["labels"].tolist()] == _assistant_turns(tokens)
    assert sum(_assistant_turns(tokens)) == sum(len(m["content"].split()) + 1 for m in messages
                                                if m["role"] == "assistant")


def test_span_method_falls_back_to_a_unique_occurrence_and_refuses_an_ambiguous_one(tmp_path):
    """A template that renders a content otherwise than a plain string (here: a marker before it, as Qwen3 rewrites
    reasoning): the content is located by its text only where that text occurs once."""
    from qlora_ds.data.tokenize import _span_ids
    from qlora_ds.errors import QLoRADSError
    marked = ("{% for m in messages %}<|{{ m['role'] }}|> {% if 'color.' in m['content'] %}<|system|> {% endif %}"
              "{{ m['content'] }} </s> {% endfor %}")
    tok = _word_tokenizer(tmp_path, marked)
    chat = [{"role": "user", "content": "Name a color"}, {"role": "assistant", "content": "Blue is a color."}]
    ids, mask = _span_ids(tok, chat)
    assert tok.convert_ids_to_tokens([t for t, m in zip(ids, mask) if m]) == ["Blue", "is", "a", "color.", "</s>"]
    with pytest.raises(QLoRADSError, match="does not render assistant message 'Blue is a color.' verbatim in one"):
        _span_ids(tok, [{"role": "user", "content": "Blue is a color."}, chat[1]])


def test_records_without_a_target_past_the_first_token_are_left_out(tmp_path, caplog):
    """A one-token text paragraph (this tokenizer adds no BOS) labels position 0 only, which the shift drops: kept,
    it made a micro batch of 0 targets, a NaN loss and a "lower --lr" stop."""
    from qlora_ds.data.tokenize import tokenize_records
    from qlora_ds.errors import QLoRADSError
    tok = _word_tokenizer(tmp_path, QWEN3_LIKE)
    got = tokenize_records([{"text": "Blue"}, {"text": "Blue is a color."}], tok, 64)
    assert [tok.convert_ids_to_tokens(e["input_ids"].tolist()) for e in got] == [["Blue", "is", "a", "color."]]
    assert "1 of 2 records have no token to predict" in caplog.text and "--max-len" not in caplog.text
    with pytest.raises(QLoRADSError, match="the first token is never a target.*add records longer than one token"):
        tokenize_records([{"text": "Blue"}], tok, 64)
